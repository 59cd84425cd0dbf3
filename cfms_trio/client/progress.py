"""A text progress bar for the terminal, fed by the transfer and import progress callbacks."""

from __future__ import annotations


class ProgressBar:
    """A one-line text progress bar for terminals (written to a stream, usually stderr).

    It draws only when the stream is a terminal (unless `enabled` says otherwise), so logs and
    pipes never fill with carriage returns.
    """

    WIDTH = 30

    def __init__(self, stream, label: str = "", enabled: bool | None = None):
        self.stream = stream
        self.label = label
        self.enabled = stream.isatty() if enabled is None else enabled
        self._last = None

    def show(self, percent: float, text: str = "") -> None:
        if not self.enabled:
            return
        percent = max(0.0, min(100.0, percent))
        filled = int(self.WIDTH * percent / 100)
        line = f"\r{self.label}[{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:5.1f}% {text}"
        if line != self._last:
            self.stream.write(line.ljust(80))
            self.stream.flush()
            self._last = line

    def bytes_progress(self, done: int, total: int) -> None:
        self.show(100.0 * done / total if total else 100.0, f"{done / 1e6:.1f}/{total / 1e6:.1f} MB")

    def done(self) -> None:
        if not self.enabled or self._last is None:
            return
        self.stream.write("\n")
        self.stream.flush()
        self._last = None
