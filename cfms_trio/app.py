"""What every request handler can reach: the server's settings, paths and services.

`App` is built once by the composition root (`server.serve`) and never changes afterwards. It
holds no nursery and starts nothing: the services in it that run in the background were started
by `serve` before the first connection was accepted.
"""

from __future__ import annotations

import dataclasses
import time

import trio

from .backup.scheduler import BackupScheduler
from .backup.supervisor import ImportSupervisor
from .cluster import ClusterRelay
from .config import Settings
from .events import EventHub
from .paths import Paths
from .reaper import FileReaper
from .storage import Store
from .transfer.registry import TransferRegistry
from .transfer.sweeper import UploadSweeper


@dataclasses.dataclass(frozen=True)
class App:
    settings: Settings
    paths: Paths
    store: Store
    hub: EventHub
    relay: ClusterRelay  # messages to and from the other instances on the same database
    transfers: TransferRegistry  # transfers running now, so one task has one at a time
    # Disk and crypto work of short requests: transfer chunks, removing files. Long jobs never
    # take these slots, so a download never waits behind an import.
    io_limiter: trio.CapacityLimiter
    # The long jobs: unpacking imports, writing exports. More of them wait (FIFO) for a slot.
    bulk_io_limiter: trio.CapacityLimiter
    reaper: FileReaper
    # Where contents live (`content`): local files under `paths.content`, or an S3 bucket.
    content: object
    imports: ImportSupervisor
    sweeper: UploadSweeper
    backups: BackupScheduler  # schedules, the catalogue's verification and pruning, failures
    started_time: float = dataclasses.field(default_factory=time.time)

    def now(self) -> float:
        return time.time()
