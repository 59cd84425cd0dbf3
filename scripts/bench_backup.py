#!/usr/bin/env python3
"""Backup, restore and transfer benchmarks (issue 7), each figure next to a baseline measured
in the same run, since the machines these run on are shared and noisy.

    .venv/bin/python scripts/bench_backup.py            # full sizes: 1 GiB file, 100k documents
    .venv/bin/python scripts/bench_backup.py --quick    # small sizes, well under a minute

Datasets are written straight into server roots through the storage layer
(scripts/bench_dataset.py); every server runs as a subprocess
(`python -m cfms_trio serve --root R --port 0`) so its resident memory can be sampled with
psutil, and is driven through the API over wss on loopback by the client library. Figures:

1. export throughput (MB/s of file bytes), `generate_backup`, vs
   `tar -cf - FILES | openssl enc -aes-256-ctr -pbkdf2 > /dev/null`;
2. import throughput, `start_backup_import` until the `backup_import_completed` event, vs
   `openssl enc -d ... | tar -xf -` of an archive of the same files;
3. peak RSS of the server during export and during import (upload + restore) of the mixed set,
   vs the same server's RSS when idle;
4. p50/p99/max latency of `server_info` from a second connection while an import runs, vs idle;
5. metadata-heavy set: export and import wall time and rows/s, vs the same tar/openssl pipes;
6. upload and download throughput of the largest file over wss, vs a TLS socket copy of the
   same file between two Python processes on loopback (1 MiB sendall/recv_into, written to disk);
   with the client library, and with a third-party client written here on the `websockets`
   library (its C speedups) and pycryptodome, speaking SPEC §6 itself; `server_info` latency
   from a second connection meanwhile;
7. the scale set of issue 13 (100k / 300k / 1M documents): export and import time, peak RSS
   and `server_info` latency, against absolute goals;
8. the large-file set of issue 15 (six 50 MiB files): export, and import against both
   `openssl enc -d | tar -x` and a `dd conv=fsync` write of the same bytes.

Every wait is bounded; servers are stopped and the temporary roots removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "scripts"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import psutil  # noqa: E402
import trio  # noqa: E402

import bench_dataset  # noqa: E402
from cfms_trio.client import Client, file_sha256, open_client  # noqa: E402

MB = 1_000_000
MiB = 1024 * 1024
ADMIN_PASSWORD = "bench-admin-password"
SERVER_START_TIMEOUT_S = 60
SERVER_STOP_TIMEOUT_S = 15
RSS_SAMPLE_INTERVAL_S = 0.01
LATENCY_PROBE_INTERVAL_S = 0.01
IDLE_LATENCY_SAMPLES = 200
TLS_COPY_BYTES = 1 * MiB
# Creating files right after deleting 100,000 ran thirty times slower for half a minute on the
# VM these figures come from (ext4 with online discard): whichever step came next paid for the
# previous step's clean-up. So trees of many files are moved aside and deleted only at the end
# (`Bench.discard`), and each timed step first waits until a probe creates files this fast.
SETTLED_CREATE_S = 150e-6
SETTLE_PROBE_FILES = 200
OPENSSL_CIPHER = ["-aes-256-ctr", "-pass", "pass:x", "-pbkdf2"]

FULL = {"large_mib": [1024, 64, 64], "small_files": 2000, "meta_documents": 100_000,
        "meta_folders": 10_000, "scale_documents": [100_000, 300_000, 1_000_000],
        "big_set_mib": [50] * 6}
QUICK = {"large_mib": [16], "small_files": 200, "meta_documents": 2000, "meta_folders": 200,
         "scale_documents": [2000, 4000], "big_set_mib": [8] * 2}
# The scale set (issue 13): documents in documents/10 folders, a file on every tenth, 1000
# users and 10,000 audit entries; its goals are absolute, next to idle figures of the run.
SCALE_FILE_SHARE = 0.1
SCALE_USERS = 1000
SCALE_AUDIT_ENTRIES = 10_000
SCALE_RSS_GOAL_MIB = 256
SCALE_IMPORT_GOAL_S = 120
SCALE_EXPORT_GOAL_S = 60
# Issue 15's goals.
TRANSFER_GOAL_MBPS = 250
EXPORT_GOAL_MBPS = 700
IMPORT_GOAL_RATIO = 0.5  # of openssl enc -d | tar -x
IMPORT_GOAL_DD_TIMES = 2.0  # at most this many times the dd conv=fsync write


# -- results -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Figure:
    name: str
    value: str
    baseline: str
    ratio: float | None
    goal: str
    met: bool | None  # None: no goal

    def row(self) -> list[str]:
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}x"
        met = "" if self.met is None else ("yes" if self.met else "NO")
        return [self.name, self.value, self.baseline, ratio, self.goal, met]


def print_table(figures: list[Figure], out=sys.stdout) -> None:
    header = ["figure", "value", "baseline", "ratio", "goal", "met?"]
    rows = [header] + [f.row() for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    print(line, file=out)
    for index, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |", file=out)
        if index == 0:
            print(line, file=out)
    print(line, file=out, flush=True)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- server subprocesses ---------------------------------------------------------------------------

class ServerProcess:
    """`python -m cfms_trio serve` on a root, port 0; knows its URL, pid and certificate."""

    def __init__(self, root: Path, workdir: Path, name: str):
        self.root = root
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    @property
    def cafile(self) -> Path:
        return self.root / "content" / "tls" / "cert.pem"

    def start(self) -> "ServerProcess":
        env = dict(os.environ, CFMS_ADMIN_PASSWORD=ADMIN_PASSWORD, PYTHONUNBUFFERED="1")
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cfms_trio", "serve", "--root", str(self.root),
                 "--port", "0"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        found: dict[str, str] = {}

        def read_stdout() -> None:
            for line in self.proc.stdout:
                match = re.search(r"listening on (\S+)", line)
                if match:
                    found["url"] = match.group(1)
                    break
            # Keep draining so the server never blocks on a full pipe.
            for _ in self.proc.stdout:
                pass

        threading.Thread(target=read_stdout, daemon=True).start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while "url" not in found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server {self.name} did not start:\n{self.stderr_tail()}")
            time.sleep(0.02)
        self.url = found["url"].replace("localhost", "127.0.0.1")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(SERVER_STOP_TIMEOUT_S)


class RssSampler:
    """Samples a process's RSS in a background thread; `peak` is the largest seen."""

    def __init__(self, pid: int):
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(RSS_SAMPLE_INTERVAL_S)

    def __enter__(self) -> "RssSampler":
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# -- baselines -----------------------------------------------------------------------------------

def settle_filesystem(scratch: Path, timeout: float) -> float:
    """Wait (up to `timeout` seconds) until creating a file in `scratch` takes less than
    SETTLED_CREATE_S; return the seconds waited."""
    started = time.monotonic()
    os.sync()
    probes = scratch / ".settle-probes"
    try:
        for attempt in itertools.count():
            probe = probes / str(attempt)  # never deleting meanwhile: that is what slows it
            probe.mkdir(parents=True)
            began = time.perf_counter()
            for i in range(SETTLE_PROBE_FILES):
                (probe / str(i)).write_bytes(b"x")
            per_file = (time.perf_counter() - began) / SETTLE_PROBE_FILES
            waited = time.monotonic() - started
            if per_file < SETTLED_CREATE_S or waited >= timeout:
                return waited
            time.sleep(1)
    finally:
        shutil.rmtree(probes, ignore_errors=True)
    raise AssertionError("unreachable")


def run_shell(command: str, timeout: float) -> float:
    """Run a bash pipeline (pipefail) and return its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def tar_encrypt_seconds(content: Path, scratch: Path, timeout: float,
                        same_work: bool = False) -> float:
    """The export baseline of issue 7: tar the files folder, encrypt it with AES-256-CTR, throw
    it away. With `same_work` the pipeline also does what an export does on top: hash the
    plaintext (the exporter checks every file against its sha256), write the archive while
    hashing it, and fsync it."""
    encrypt = f"openssl enc {' '.join(OPENSSL_CIPHER)}"
    if not same_work:
        return run_shell(f"tar -cf - -C {content} files | {encrypt} > /dev/null", timeout)
    out = scratch / "baseline.out"
    try:
        return run_shell(f"tar -cf - -C {content} files | tee >(sha256sum > /dev/null) "
                         f"| {encrypt} | tee {out} | sha256sum > /dev/null && sync {out}", timeout)
    finally:
        out.unlink(missing_ok=True)


def decrypt_untar_seconds(content: Path, scratch: Path, timeout: float,
                          same_work: bool = False, discard=shutil.rmtree) -> float:
    """The import baseline of issue 7: an encrypted tar of the same files, decrypted and
    extracted. With `same_work` the plaintext is also hashed on the way, as an import checks
    every file against its sha256."""
    encrypted = scratch / "baseline.tar.enc"
    out = scratch / f"baseline-extract-{time.monotonic_ns()}"
    out.mkdir()
    run_shell(f"tar -cf - -C {content} files | openssl enc {' '.join(OPENSSL_CIPHER)} "
              f"-out {encrypted}", timeout)
    tee = "| tee >(sha256sum > /dev/null) " if same_work else ""
    try:
        return run_shell(f"openssl enc -d {' '.join(OPENSSL_CIPHER)} -in {encrypted} "
                         f"{tee}| tar -xf - -C {out}", timeout)
    finally:
        encrypted.unlink(missing_ok=True)
        discard(out)


def dd_fsync_seconds(nbytes: int, scratch: Path, timeout: float) -> float:
    """Writing `nbytes` to one file with dd, fsynced before dd exits."""
    out = scratch / "baseline.dd"
    try:
        return run_shell(f"dd if=/dev/zero of={out} bs=1M count={nbytes // MiB} conv=fsync "
                         "status=none", timeout)
    finally:
        out.unlink(missing_ok=True)


def export_work_bound(sample_bytes: int = 64 * MiB) -> tuple[float, dict]:
    """The fastest an export can be on this machine, from the CPU work it cannot avoid: per
    byte of file content, three sha256 passes (the stored file checked against its row, the
    archive hashed for its key file, the self-check's file hashes), AES-GCM sealing, and the
    self-check opening every segment again, spread perfectly over every core. Each rate is
    measured here, in 1 MiB pieces as the server uses them; returns (bytes per second, the
    rates in MB/s per core)."""
    from Crypto.Cipher import AES
    piece = os.urandom(MiB)
    key = os.urandom(32)
    count = sample_bytes // MiB

    def rate(work) -> float:
        started = time.perf_counter()
        for index in range(count):
            work(index)
        return count * MiB / (time.perf_counter() - started)

    digest = hashlib.sha256()
    sha = rate(lambda index: digest.update(piece))
    nonce = lambda index: index.to_bytes(12, "big")  # noqa: E731
    seal = rate(lambda index: AES.new(key, AES.MODE_GCM, nonce=nonce(index))
                .encrypt_and_digest(piece))
    opened = rate(lambda index: AES.new(key, AES.MODE_GCM, nonce=nonce(index)).decrypt(piece))
    seconds_per_byte = 3 / sha + 1 / seal + 1 / opened
    cores = os.cpu_count() or 1
    return cores / seconds_per_byte, {"sha256": sha / MB, "seal": seal / MB,
                                      "open": opened / MB, "cores": cores}


def _tls_peer(mode: str, certfile: str, keyfile: str, path: str) -> None:
    """Child process of the transfer baseline: a TLS listener on loopback that either receives
    a file into `path` (sink: 8-byte length, data; fsync; answer b"ok") or sends `path`
    (source: 8-byte length, data)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as conn:
            if mode == "sink":
                size = int.from_bytes(_recv_exact(conn, 8), "big")
                _recv_to_file(conn, path, size, fsync=True)
                conn.sendall(b"ok")
            else:
                size = os.path.getsize(path)
                conn.sendall(size.to_bytes(8, "big"))
                _send_file(conn, path)
                _recv_exact(conn, 2)


def _recv_exact(conn, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = conn.recv(size - len(data))
        if not piece:
            raise ConnectionError("peer closed early")
        data += piece
    return bytes(data)


def _recv_to_file(conn, path: str, size: int, fsync: bool) -> None:
    buffer = bytearray(TLS_COPY_BYTES)
    view = memoryview(buffer)
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = conn.recv_into(view, min(remaining, TLS_COPY_BYTES))
            if not n:
                raise ConnectionError("peer closed early")
            f.write(view[:n])
            remaining -= n
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _send_file(conn, path: str) -> None:
    with open(path, "rb") as f:
        while block := f.read(TLS_COPY_BYTES):
            conn.sendall(block)


def tls_copy_seconds(mode: str, source: Path, target: Path, certfile: Path, keyfile: Path,
                     timeout: float) -> float:
    """Upload (`sink` peer) or download (`source` peer) `source` over TLS on loopback."""
    peer_path = target if mode == "sink" else source
    peer = subprocess.Popen(
        [sys.executable, __file__, "--tls-peer", mode, str(certfile), str(keyfile),
         str(peer_path)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(peer.stdout.readline())
        context = ssl.create_default_context(cafile=str(certfile))
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                if mode == "sink":
                    conn.sendall(source.stat().st_size.to_bytes(8, "big"))
                    _send_file(conn, str(source))
                    _recv_exact(conn, 2)
                else:
                    size = int.from_bytes(_recv_exact(conn, 8), "big")
                    _recv_to_file(conn, str(target), size, fsync=False)
                    conn.sendall(b"ok")
        elapsed = time.perf_counter() - started
        peer.wait(timeout)
        return elapsed
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        target.unlink(missing_ok=True)


# -- API steps -----------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def admin_client(server: ServerProcess):
    async with open_client(server.url, cafile=server.cafile) as client:
        await client.login("admin", ADMIN_PASSWORD)
        yield client


async def export(server: ServerProcess, name: str, compression: str, out_dir: Path,
                 download: bool) -> dict:
    """Time generate_backup (and sample RSS meanwhile); optionally download archive and key."""
    async with admin_client(server) as client:
        with RssSampler(server.pid) as rss:
            started = time.perf_counter()
            result = await client.call("generate_backup", {"backup_name": name,
                                                           "compression": compression})
            seconds = time.perf_counter() - started
        out = {"seconds": seconds, "peak_rss": rss.peak, "archive_size": result["archive_size"],
               "metadata": result["metadata"]}
        if download:
            out["archive"] = out_dir / f"{name}.cfms.enc"
            out["key"] = out_dir / f"{name}.key"
            await client.download_file(result["archive_task_id"], out["archive"])
            await client.download_file(result["key_task_id"], out["key"])
    return out


async def export_probed(server: ServerProcess, name: str, out_dir: Path) -> dict:
    """generate_backup timed, with RSS sampled and server_info probed from a second
    connection meanwhile; the archive and key are downloaded afterwards (untimed)."""
    async with admin_client(server) as client, admin_client(server) as prober:
        busy: list[float] = []
        stop = trio.Event()
        with RssSampler(server.pid) as rss:
            idle_rss = server.rss()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_probe_latency, prober, busy, stop)
                started = time.perf_counter()
                result = await client.call("generate_backup", {"backup_name": name})
                seconds = time.perf_counter() - started
                stop.set()
        archive, key = out_dir / f"{name}.cfms.enc", out_dir / f"{name}.key"
        await client.download_file(result["archive_task_id"], archive)
        await client.download_file(result["key_task_id"], key)
    return {"seconds": seconds, "peak_rss": rss.peak, "idle_rss": idle_rss, "busy": busy,
            "archive": archive, "key": key, "metadata": result["metadata"]}


async def _probe_latency(client: Client, samples: list[float], stop: trio.Event,
                         limit: int | None = None) -> None:
    while not stop.is_set() and (limit is None or len(samples) < limit):
        started = time.perf_counter()
        await client.call("server_info")
        samples.append(time.perf_counter() - started)
        await trio.sleep(LATENCY_PROBE_INTERVAL_S)


async def import_backup(server: ServerProcess, archive: Path, key: Path) -> dict:
    """Upload archive and key, then time start_backup_import until the completion event,
    probing server_info latency from a second connection, and sampling RSS throughout."""
    async with admin_client(server) as client, admin_client(server) as prober:
        idle: list[float] = []
        await _probe_latency(prober, idle, trio.Event(), IDLE_LATENCY_SAMPLES)
        with RssSampler(server.pid) as rss:
            idle_rss = server.rss()
            await client.listen()
            init = await client.call("initiate_backup_import", {"timeout_seconds": 86400})
            await client.upload_file(init["archive_task_id"], archive)
            await client.upload_file(init["key_task_id"], key)
            busy: list[float] = []
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                started = time.perf_counter()
                await client.call("start_backup_import",
                                  {"backup_task_id": init["backup_task_id"]})
                nursery.start_soon(_probe_latency, prober, busy, stop)
                event = await client.next_event("backup_import_completed")
                seconds = time.perf_counter() - started
                stop.set()
        if event["data"]["status"] != "completed":
            raise RuntimeError(f"import failed: {event['data']}")
    return {"seconds": seconds, "peak_rss": rss.peak, "idle_rss": idle_rss, "idle": idle,
            "busy": busy, "event": event["data"]}


async def transfer_roundtrip(server: ServerProcess, source: Path, target: Path) -> dict:
    """Upload `source` as a new document, then download it again; time each."""
    async with admin_client(server) as client:
        return await timed_roundtrip(client, client.upload_file, client.download_file,
                                     source, target, "bench")


async def timed_roundtrip(client, upload, download, source: Path, target: Path,
                          title: str) -> dict:
    """Through `client` (either client: `upload(task_id, path)`, `download(task_id, path)`),
    upload `source` as a new document, then download it into `target`; time each, check the
    bytes, remove `target`."""
    created = await client.call("create_document", {"title": f"{title}-{time.time_ns()}"})
    started = time.perf_counter()
    await upload(created["task_id"], source)
    upload_s = time.perf_counter() - started
    document = await client.call("get_document", {"document_id": created["document_id"]})
    started = time.perf_counter()
    await download(document["task_id"], target)
    download_s = time.perf_counter() - started
    if file_sha256(target) != file_sha256(source):
        raise RuntimeError("downloaded file differs from the uploaded one")
    target.unlink()
    return {"upload_s": upload_s, "download_s": download_s}


@contextlib.contextmanager
def latency_probe(server: ServerProcess, timeout: float):
    """Send server_info every 10 ms from another process while the block runs (so neither a
    client's work in this process nor its GIL delays the probe); yields the list that receives
    the latencies, in seconds, once the block has ended."""
    probe = subprocess.Popen([sys.executable, __file__, "--probe", server.url, str(server.cafile)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    samples: list[float] = []
    try:
        if probe.stdout.readline().strip() != "probing":
            raise RuntimeError("the latency probe did not start")
        yield samples
    finally:
        out, _ = probe.communicate("", timeout=timeout)
    samples.extend(json.loads(out))


def _probe_main(url: str, cafile: str) -> None:
    """The probe process: server_info every LATENCY_PROBE_INTERVAL_S until stdin closes, then
    the latencies as a JSON list on stdout."""
    async def main() -> list[float]:
        samples: list[float] = []
        stop = trio.Event()
        async with open_client(url, cafile=cafile) as client:
            await client.login("admin", ADMIN_PASSWORD)
            print("probing", flush=True)

            async def wait_for_stdin() -> None:
                await trio.to_thread.run_sync(sys.stdin.read)
                stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_stdin)
                await _probe_latency(client, samples, stop)
        return samples

    print(json.dumps(trio.run(main)), flush=True)


def probed_roundtrip(timeout: float, server: ServerProcess, source: Path, target: Path,
                     samples: list[float]) -> dict:
    with latency_probe(server, timeout) as probed:
        result = run_async(timeout, transfer_roundtrip, server, source, target)
    samples.extend(probed)
    return result


# -- a third-party client: the `websockets` library and pycryptodome, SPEC §6 written out ----

THIRD_PARTY_AHEAD_CHUNKS = 4


class ThirdPartyClient:
    """Speaks the protocol the way an outside implementation would: JSON envelopes and
    AES-256-GCM chunks (nonce = prefix || 8-byte index) over a `websockets` connection; sealing,
    opening and disk I/O in worker threads, a few chunks ahead."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.username = self.token = None

    def envelope(self, action: str, data: dict) -> str:
        message = {"action": action, "data": data, "request_id": next(self.ids)}
        if self.token:
            message.update(username=self.username, token=self.token)
        return json.dumps(message)

    async def receive_json(self) -> dict:
        message = await self.ws.recv()
        if isinstance(message, bytes):
            raise RuntimeError("expected a JSON message, got a binary one")
        return json.loads(message)

    async def call(self, action: str, data: dict) -> dict:
        await self.ws.send(self.envelope(action, data))
        reply = await self.receive_json()
        if reply.get("code") != 200:
            raise RuntimeError(f"{action}: {reply}")
        return reply["data"]

    async def login(self, username: str, password: str) -> None:
        data = await self.call("login", {"username": username, "password": password})
        self.username, self.token = username, data["token"]

    async def upload(self, task_id: str, path: Path) -> dict:
        from Crypto.Cipher import AES

        size = path.stat().st_size
        sha256 = await asyncio.to_thread(lambda: file_sha256(path))
        await self.ws.send(self.envelope("upload_file", {"task_id": task_id}))
        assert (await self.receive_json())["action"] == "transfer_file"
        await self.ws.send(json.dumps({"action": "transfer_file",
                                       "data": {"file_size": size, "sha256": sha256}}))
        ready = (await self.receive_json())["data"]
        key, prefix = base64.b64decode(ready["key"]), base64.b64decode(ready["nonce_prefix"])
        chunk = ready["chunk_size"]
        count = (size + chunk - 1) // chunk

        loop = asyncio.get_running_loop()
        # One worker thread: chunks are read and sealed in order, a few ahead of the sending.
        with open(path, "rb") as f, ThreadPoolExecutor(1) as worker:
            def seal(index: int) -> bytes:
                cipher = AES.new(key, AES.MODE_GCM, nonce=prefix + index.to_bytes(8, "big"))
                ciphertext, tag = cipher.encrypt_and_digest(f.read(chunk))
                return ciphertext + tag

            ahead: collections.deque = collections.deque()
            for index in range(count):
                ahead.append(loop.run_in_executor(worker, seal, index))
                if len(ahead) > THIRD_PARTY_AHEAD_CHUNKS:
                    await self.ws.send(await ahead.popleft())
            while ahead:
                await self.ws.send(await ahead.popleft())
        reply = await self.receive_json()
        if reply.get("code") != 200:
            raise RuntimeError(f"upload: {reply}")
        return reply["data"]

    async def download(self, task_id: str, path: Path) -> dict:
        from Crypto.Cipher import AES

        await self.ws.send(self.envelope("download_file", {"task_id": task_id, "offset": 0}))
        header = (await self.receive_json())["data"]
        key, prefix = base64.b64decode(header["key"]), base64.b64decode(header["nonce_prefix"])
        size, chunk = header["file_size"], header["chunk_size"]
        digest = hashlib.sha256()
        await self.ws.send(json.dumps({"action": "ready"}))
        loop = asyncio.get_running_loop()
        with open(path, "wb") as f, ThreadPoolExecutor(1) as worker:
            def open_and_write(index: int, sealed: bytes) -> None:
                cipher = AES.new(key, AES.MODE_GCM, nonce=prefix + index.to_bytes(8, "big"))
                plaintext = cipher.decrypt_and_verify(sealed[:-16], sealed[-16:])
                f.write(plaintext)
                digest.update(plaintext)

            behind: collections.deque = collections.deque()
            for index in range((size + chunk - 1) // chunk):
                behind.append(loop.run_in_executor(worker, open_and_write, index,
                                                   await self.ws.recv()))
                if len(behind) > THIRD_PARTY_AHEAD_CHUNKS:
                    await behind.popleft()
            while behind:
                await behind.popleft()
        reply = await self.receive_json()
        if reply.get("code") != 200 or digest.hexdigest() != header["sha256"]:
            raise RuntimeError(f"download failed: {reply}")
        return reply["data"]


async def third_party_roundtrip(url: str, cafile: Path, source: Path, target: Path) -> dict:
    """Upload and download `source` with `ThirdPartyClient`; time each."""
    import websockets.asyncio.client

    context = ssl.create_default_context(cafile=str(cafile))
    chunk_limit = 2 * MiB
    async with websockets.asyncio.client.connect(url, ssl=context, compression=None,
                                                 max_size=chunk_limit, proxy=None,
                                                 ping_interval=None) as ws:
        client = ThirdPartyClient(ws)
        await client.login("admin", ADMIN_PASSWORD)
        return await timed_roundtrip(client, client.upload, client.download, source, target,
                                     "bench-ws")


def run_third_party(timeout: float, server: ServerProcess, source: Path, target: Path,
                    samples: list[float]) -> dict:
    """The third-party round trip in an asyncio loop, latency probed meanwhile."""
    with latency_probe(server, timeout) as probed:
        result = asyncio.run(asyncio.wait_for(
            third_party_roundtrip(server.url, server.cafile, source, target), timeout))
    samples.extend(probed)
    return result


def run_async(timeout: float, fn, *args):
    async def bounded():
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(bounded)


# -- the benchmark -------------------------------------------------------------------------------

def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds


def throughput_figure(name: str, nbytes: int, seconds: float, baseline_s: float,
                      goal_ratio: float | None = 1.0, goal_mbps: float | None = None) -> Figure:
    value, base = mbps(nbytes, seconds), mbps(nbytes, baseline_s)
    ratio = value / base
    if goal_mbps is not None:
        goal, met = f">= {goal_mbps:.0f} MB/s", value >= goal_mbps
    elif goal_ratio is not None:
        goal, met = f">= {goal_ratio:.1f}x", ratio >= goal_ratio
    else:
        goal, met = "", None  # context only
    return Figure(name, f"{value:.0f} MB/s", f"{base:.0f} MB/s", ratio, goal, met)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.sizes = QUICK if args.quick else FULL
        if args.large_mib is not None:
            self.sizes = dict(self.sizes, large_mib=args.large_mib)
        if args.scale_documents is not None:
            self.sizes = dict(self.sizes, scale_documents=args.scale_documents)
        if args.meta_documents is not None:
            self.sizes = dict(self.sizes, meta_documents=args.meta_documents,
                              meta_folders=max(1, args.meta_documents // 10))
        self.servers: list[ServerProcess] = []
        self.figures: list[Figure] = []
        self.raw: dict = {"sizes": self.sizes}

    def server(self, name: str, root: Path | None = None) -> ServerProcess:
        root = root or self.workdir / name
        root.mkdir(exist_ok=True)
        server = ServerProcess(root, self.workdir, name)
        self.servers.append(server)
        return server.start()

    def stop_servers(self) -> None:
        for server in self.servers:
            server.stop()

    def discard(self, tree: Path) -> None:
        """Move a tree of many files aside, into the work folder's trash, deleted when the run
        ends (see SETTLED_CREATE_S)."""
        trash = self.workdir / "trash"
        trash.mkdir(exist_ok=True)
        tree.rename(trash / f"{tree.name}-{time.monotonic_ns()}")

    def settle(self) -> None:
        if self.args.settle_timeout > 0:
            waited = settle_filesystem(self.workdir, self.args.settle_timeout)
            self.raw["settle_s"] = self.raw.get("settle_s", 0) + waited

    def best(self, measure) -> float:
        """The smallest of `--repeat` runs of `measure()` (noise only ever adds time), each on
        a settled filesystem."""
        times = []
        for _ in range(self.args.repeat):
            self.settle()
            times.append(measure())
        return min(times)

    def settled(self, fn, *args):
        self.settle()
        return fn(*args)

    def import_best(self, name: str, archive: Path, key: Path, many_files: bool) -> dict:
        """`--repeat` imports of one archive, each into a fresh server: the fastest time, the
        highest peak RSS, and every latency sample of all runs."""
        runs = []
        for attempt in range(self.args.repeat):
            target = self.server(f"{name}-{attempt}")
            self.settle()
            try:
                runs.append(run_async(self.args.timeout, import_backup, target, archive, key))
            finally:
                target.stop()
                (self.discard if many_files else shutil.rmtree)(target.root)
        return {"seconds": min(r["seconds"] for r in runs),
                "all_seconds": [r["seconds"] for r in runs],
                "peak_rss": max(r["peak_rss"] for r in runs),
                "idle_rss": min(r["idle_rss"] for r in runs),
                "idle": [x for r in runs for x in r["idle"]],
                "busy": [x for r in runs for x in r["busy"]],
                "event": runs[-1]["event"]}

    # -- mixed set: figures 1, 2, 3, 4, 6

    def mixed(self) -> None:
        t = self.args.timeout
        root = self.workdir / "mixed-src"
        log(f"generating the mixed set {self.sizes['large_mib']} MiB + "
            f"{self.sizes['small_files']} small files")
        summary = bench_dataset.build_mixed(root, ADMIN_PASSWORD,
                                            large_mib=self.sizes["large_mib"],
                                            small_files=self.sizes["small_files"])
        self.raw["mixed"] = summary.as_dict()
        nbytes = summary.file_bytes
        content = root / "content"
        source = self.server("mixed-src", root)
        idle_rss = source.rss()

        log("export baselines: tar | openssl enc")
        tar_enc_s = self.best(lambda: tar_encrypt_seconds(content, self.workdir, t))
        tar_enc_same_s = self.best(lambda: tar_encrypt_seconds(content, self.workdir, t, True))
        exports = {}
        for compression in ("none", "zstd"):
            log(f"export ({compression})")
            runs = [self.settled(run_async, t, export, source, f"bench-{compression}-{i}",
                                 compression, self.workdir, i == self.args.repeat - 1)
                    for i in range(self.args.repeat)]
            exports[compression] = min(runs, key=lambda r: r["seconds"])
            exports[compression].update({k: runs[-1][k] for k in ("archive", "key")})
            exports[compression]["peak_rss"] = max(r["peak_rss"] for r in runs)
            # Issue 15's goal is for an uncompressed export; zstd is bound by libzstd.
            self.figures.append(throughput_figure(
                f"1. export MB/s of file bytes ({compression})", nbytes,
                exports[compression]["seconds"], tar_enc_s, goal_ratio=None,
                goal_mbps=EXPORT_GOAL_MBPS if compression == "none" else None))
        self.figures.append(throughput_figure(
            "   export (none) vs the same work in tar|tee|openssl|sha256sum", nbytes,
            exports["none"]["seconds"], tar_enc_same_s, goal_ratio=None))
        self.raw["export"] = {c: {k: v for k, v in r.items() if k not in ("archive", "key")}
                              for c, r in exports.items()}

        log("import baselines: openssl enc -d | tar -x")
        dec_tar_s = self.best(lambda: decrypt_untar_seconds(content, self.workdir, t))
        dec_tar_same_s = self.best(lambda: decrypt_untar_seconds(content, self.workdir, t, True))
        imports = {}
        for compression in ("none", "zstd"):
            log(f"import ({compression})")
            imports[compression] = self.import_best(f"mixed-import-{compression}",
                                                    exports[compression]["archive"],
                                                    exports[compression]["key"], False)
            self.figures.append(throughput_figure(
                f"2. import MB/s of file bytes ({compression})", nbytes,
                imports[compression]["seconds"], dec_tar_s))
        self.figures.append(throughput_figure(
            "   import (none) vs the same work in openssl|tee sha256sum|tar", nbytes,
            imports["none"]["seconds"], dec_tar_same_s, goal_ratio=None))
        self.raw["import"] = {c: {k: v for k, v in r.items() if k not in ("idle", "busy")}
                              for c, r in imports.items()}

        peak_export = max(r["peak_rss"] for r in exports.values())
        peak_import = max(r["peak_rss"] for r in imports.values())
        import_idle = min(r["idle_rss"] for r in imports.values())
        for label, peak, idle in (("export", peak_export, idle_rss),
                                  ("import", peak_import, import_idle)):
            self.figures.append(Figure(
                f"3. peak server RSS during {label} ({nbytes / MiB:.0f} MiB set)",
                f"{peak / MiB:.0f} MiB", f"{idle / MiB:.0f} MiB idle", peak / idle,
                "<= 200 MiB", peak <= 200 * MiB))
        self.latency_figures("mixed set", imports["zstd"])

        for archive in [r[k] for r in exports.values() for k in ("archive", "key")]:
            archive.unlink(missing_ok=True)
        self.transfers(source, content / summary.largest_file, summary.largest_bytes)
        source.stop()
        shutil.rmtree(root, ignore_errors=True)

    def latency_figures(self, label: str, result: dict, during: str = "import") -> None:
        idle, busy = result["idle"], result["busy"]
        if not busy:
            busy = [result["seconds"]]  # the import ended before a single probe answered
        ms = {name: (percentile(s, 0.5) * 1000, percentile(s, 0.99) * 1000, max(s) * 1000)
              for name, s in (("idle", idle), ("busy", busy))}
        self.raw.setdefault("latency", {})[label] = {
            "idle_ms": ms["idle"], "busy_ms": ms["busy"], "busy_samples": len(busy)}
        p50, p99, peak = ms["busy"]
        i50, i99, imax = ms["idle"]
        self.figures.append(Figure(
            f"4. server_info p50/p99/max during {during} ({label}, n={len(busy)})",
            f"{p50:.1f}/{p99:.1f}/{peak:.1f} ms", f"{i50:.1f}/{i99:.1f}/{imax:.1f} ms idle",
            p99 / i99 if i99 else None, "p99 <= 50, max <= 200 ms", p99 <= 50 and peak <= 200))

    # -- figure 6

    def transfers(self, server: ServerProcess, largest: Path, size: int) -> None:
        t = self.args.timeout
        target = self.workdir / "transfer.out"
        log(f"transfers of a {size / MiB:.0f} MiB file: baseline TLS copy")
        cert, key = server.cafile, server.cafile.with_name("key.pem")
        up_base = self.best(lambda: tls_copy_seconds("sink", largest, target, cert, key, t))
        down_base = self.best(lambda: tls_copy_seconds("source", largest, target, cert, key, t))
        log("transfers over wss: client library")
        samples: list[float] = []
        runs = [self.settled(probed_roundtrip, t, server, largest, target, samples)
                for _ in range(self.args.repeat)]
        log("transfers over wss: third-party client (websockets)")
        third = [self.settled(run_third_party, t, server, largest, target, samples)
                 for _ in range(self.args.repeat)]
        upload_s = min(r["upload_s"] for r in runs)
        download_s = min(r["download_s"] for r in runs)
        ws_upload_s = min(r["upload_s"] for r in third)
        ws_download_s = min(r["download_s"] for r in third)
        self.raw["transfer"] = {"upload_s": [r["upload_s"] for r in runs],
                                "download_s": [r["download_s"] for r in runs],
                                "websockets_upload_s": [r["upload_s"] for r in third],
                                "websockets_download_s": [r["download_s"] for r in third],
                                "tls_upload_s": up_base, "tls_download_s": down_base,
                                "bytes": size}
        mib = f"{size / MiB:.0f} MiB"
        for label, seconds, base in (
                (f"6. upload over wss ({mib})", upload_s, up_base),
                (f"6. download over wss ({mib})", download_s, down_base),
                (f"6. upload, websockets client ({mib})", ws_upload_s, up_base),
                (f"6. download, websockets client ({mib})", ws_download_s, down_base)):
            self.figures.append(throughput_figure(label, size, seconds, base,
                                                  goal_mbps=TRANSFER_GOAL_MBPS))
        self.latency_figures("mixed set", {"idle": self.idle_latency(server), "busy": samples,
                                           "seconds": upload_s}, during="transfers")

    def idle_latency(self, server: ServerProcess) -> list[float]:
        async def measure():
            samples: list[float] = []
            async with admin_client(server) as prober:
                await _probe_latency(prober, samples, trio.Event(), IDLE_LATENCY_SAMPLES)
            return samples

        return run_async(self.args.timeout, measure)

    # -- figure 8: issue 15's large-file set

    def large(self) -> None:
        t = self.args.timeout
        sizes = self.sizes["big_set_mib"]
        root = self.workdir / "large-src"
        log(f"generating the large-file set: {len(sizes)} files of {sizes[0]} MiB")
        summary = bench_dataset.build_mixed(root, ADMIN_PASSWORD, large_mib=sizes,
                                            small_files=0)
        self.raw["large"] = summary.as_dict()
        nbytes = summary.file_bytes
        content = root / "content"
        source = self.server("large-src", root)
        log("large set: baselines")
        tar_enc_s = self.best(lambda: tar_encrypt_seconds(content, self.workdir, t))
        dec_tar_s = self.best(lambda: decrypt_untar_seconds(content, self.workdir, t))
        dd_s = self.best(lambda: dd_fsync_seconds(nbytes, self.workdir, t))
        log("large set: export (none)")
        runs = [self.settled(run_async, t, export, source, f"bench-large-{i}", "none",
                             self.workdir, i == self.args.repeat - 1)
                for i in range(self.args.repeat)]
        exported = dict(runs[-1], seconds=min(r["seconds"] for r in runs))
        self.figures.append(throughput_figure(
            f"8. export, large files ({len(sizes)} x {sizes[0]} MiB)", nbytes,
            exported["seconds"], tar_enc_s, goal_ratio=None, goal_mbps=EXPORT_GOAL_MBPS))
        bound, rates = export_work_bound()
        self.raw["export_work_bound"] = dict(rates, mbps=bound / MB)
        self.figures.append(Figure(
            f"8. export bound: its CPU work on {rates['cores']} cores (3 x sha256, seal, open)",
            f"{bound / MB:.0f} MB/s",
            f"per core: sha256 {rates['sha256']:.0f}, AES-GCM {rates['seal']:.0f}/"
            f"{rates['open']:.0f} MB/s", mbps(nbytes, exported["seconds"]) / (bound / MB),
            "", None))
        log("large set: import (none)")
        imported = self.import_best("large-import", exported["archive"], exported["key"], False)
        self.raw["large_export"] = {k: v for k, v in exported.items()
                                    if k not in ("archive", "key")}
        self.raw["large_import"] = {k: v for k, v in imported.items()
                                    if k not in ("idle", "busy")}
        self.raw["large_baselines"] = {"tar_enc_s": tar_enc_s, "dec_tar_s": dec_tar_s,
                                       "dd_fsync_s": dd_s}
        self.figures.append(throughput_figure(
            "8. import, large files, vs openssl enc -d | tar -x", nbytes, imported["seconds"],
            dec_tar_s, goal_ratio=IMPORT_GOAL_RATIO))
        times_dd = imported["seconds"] / dd_s
        self.figures.append(Figure(
            "8. import, large files, time vs dd conv=fsync of the same bytes",
            f"{imported['seconds']:.2f} s", f"{dd_s:.2f} s dd", times_dd,
            f"<= {IMPORT_GOAL_DD_TIMES:.1f}x the time", times_dd <= IMPORT_GOAL_DD_TIMES))
        self.latency_figures("large set", imported)
        exported["archive"].unlink(missing_ok=True)
        exported["key"].unlink(missing_ok=True)
        source.stop()
        shutil.rmtree(root, ignore_errors=True)

    # -- figure 7: the scale set

    def scale(self) -> None:
        t = self.args.timeout
        for documents in self.sizes["scale_documents"]:
            folders = max(1, documents // 10)
            root = self.workdir / f"scale-{documents}"
            log(f"generating the scale set: {documents} documents in {folders} folders")
            summary = bench_dataset.build_meta(
                root, ADMIN_PASSWORD, documents=documents, folders=folders,
                file_share=SCALE_FILE_SHARE, users=SCALE_USERS,
                audit_entries=SCALE_AUDIT_ENTRIES)
            source = self.server(f"scale-src-{documents}", root)
            self.settle()
            log(f"scale set {documents}: export")
            exported = run_async(t, export_probed, source, f"bench-scale-{documents}",
                                 self.workdir)
            source.stop()
            self.settle()
            log(f"scale set {documents}: import")
            imported = self.import_best(f"scale-import-{documents}", exported["archive"],
                                        exported["key"], True)
            self.raw[f"scale_{documents}"] = {
                "dataset": summary.as_dict(),
                "export": {k: v for k, v in exported.items()
                           if k not in ("archive", "key", "busy")},
                "import": {k: v for k, v in imported.items() if k not in ("idle", "busy")}}
            label = f"7. scale {documents} docs ({summary.rows} rows)"
            for what, result, goal_s in (("export", exported, SCALE_EXPORT_GOAL_S),
                                         ("import", imported, SCALE_IMPORT_GOAL_S)):
                busy = result["busy"] or [0.0]
                p99, worst = percentile(busy, 0.99) * 1000, max(busy) * 1000
                peak = result["peak_rss"] / MiB
                self.figures.append(Figure(
                    f"{label} {what}: time / peak RSS", f"{result['seconds']:.1f} s / "
                    f"{peak:.0f} MiB", f"{result['idle_rss'] / MiB:.0f} MiB idle",
                    result["peak_rss"] / result["idle_rss"],
                    f"<= {goal_s} s, <= {SCALE_RSS_GOAL_MIB} MiB",
                    result["seconds"] <= goal_s and peak <= SCALE_RSS_GOAL_MIB))
                self.figures.append(Figure(
                    f"{label} {what}: server_info p99/max (n={len(result['busy'])})",
                    f"{p99:.1f}/{worst:.1f} ms", "", None, "p99 <= 50, max <= 200 ms",
                    p99 <= 50 and worst <= 200))
            self.discard(root)

    # -- figure 5

    def meta(self) -> None:
        t = self.args.timeout
        documents, folders = self.sizes["meta_documents"], self.sizes["meta_folders"]
        root = self.workdir / "meta-src"
        log(f"generating the metadata set: {documents} documents in {folders} folders")
        summary = bench_dataset.build_meta(root, ADMIN_PASSWORD, documents=documents,
                                           folders=folders)
        self.raw["meta"] = summary.as_dict()
        rows = summary.rows
        content = root / "content"
        source = self.server("meta-src", root)
        log("metadata set: baselines")
        tar_enc_s = self.best(lambda: tar_encrypt_seconds(content, self.workdir, t))
        dec_tar_s = self.best(lambda: decrypt_untar_seconds(content, self.workdir, t,
                                                            discard=self.discard))
        log("metadata set: export")
        runs = [self.settled(run_async, t, export, source, f"bench-meta-{i}", "zstd",
                             self.workdir, i == self.args.repeat - 1)
                for i in range(self.args.repeat)]
        exported = dict(runs[-1], seconds=min(r["seconds"] for r in runs))
        source.stop()
        self.figures.append(Figure(
            f"5. metadata set export ({documents} docs, {rows} rows)",
            f"{exported['seconds']:.1f} s, {rows / exported['seconds']:.0f} rows/s",
            f"{tar_enc_s:.1f} s tar|openssl", tar_enc_s / exported["seconds"], "", None))
        log("metadata set: import")
        imported = self.import_best("meta-import", exported["archive"], exported["key"], True)
        self.raw["meta_export"] = {k: v for k, v in exported.items()
                                   if k not in ("archive", "key")}
        self.raw["meta_import"] = {k: v for k, v in imported.items() if k not in ("idle", "busy")}
        self.figures.append(Figure(
            f"5. metadata set import ({documents} docs, {rows} rows)",
            f"{imported['seconds']:.1f} s, {rows / imported['seconds']:.0f} rows/s",
            f"{dec_tar_s:.1f} s openssl|tar", dec_tar_s / imported["seconds"], "<= 15 s",
            imported["seconds"] <= 15))
        self.figures.append(Figure(
            "   peak server RSS during metadata import", f"{imported['peak_rss'] / MiB:.0f} MiB",
            f"{imported['idle_rss'] / MiB:.0f} MiB idle",
            imported["peak_rss"] / imported["idle_rss"], "", None))
        self.latency_figures("metadata set", imported)
        self.discard(root)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tls-peer"]:
        _tls_peer(*argv[1:5])
        return 0
    if argv[:1] == ["--probe"]:
        _probe_main(*argv[1:3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (16 MiB large file, 2000 documents); under a minute")
    parser.add_argument("--large-mib", type=int, nargs="+",
                        help="sizes of the large files of the mixed set (default 1024 64 64)")
    parser.add_argument("--meta-documents", type=int,
                        help="documents of the metadata set, in documents/10 folders "
                             "(default 100000)")
    parser.add_argument("--only", choices=("mixed", "large", "meta", "scale"), nargs="+",
                        help="run only these sets (mixed: figures 1-4, 6; meta: 5; scale: 7; "
                             "large: 8)")
    parser.add_argument("--scale-documents", type=int, nargs="+",
                        help="document counts of the scale set (default 100000 300000 1000000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each measurement this many times and keep the best")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="bound in seconds on every single step")
    parser.add_argument("--workdir", type=Path, help="where temporary roots go (default: TMPDIR)")
    parser.add_argument("--settle-timeout", type=float,
                        help="seconds each timed step may wait for file creation to be fast "
                             "again (default 60, 0 with --quick: no waiting)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary roots")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.settle_timeout is None:
        args.settle_timeout = 0 if args.quick else 60

    workdir = Path(tempfile.mkdtemp(prefix="cfms-bench-", dir=args.workdir))
    bench = Bench(args, workdir)
    started = time.perf_counter()
    try:
        for name in ("mixed", "meta", "scale", "large"):
            if args.only is None or name in args.only:
                getattr(bench, name)()
    except BaseException:
        for server in bench.servers:
            if server.proc is not None:
                log(f"stderr of server {server.name}:\n{server.stderr_tail()}")
        raise
    finally:
        bench.stop_servers()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    bench.raw["seconds"] = time.perf_counter() - started
    print_table(bench.figures)
    if args.json:
        args.json.write_text(json.dumps(bench.raw, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
