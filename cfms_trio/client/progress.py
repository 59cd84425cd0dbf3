"""A text progress bar for the terminal, fed by the transfer and import progress callbacks."""

from __future__ import annotations


class ProgressBar:
    """A one-line text progress bar for terminals (written to a stream, usually stderr)."""

    WIDTH = 30

    def __init__(self, stream, label: str = ""):
        self.stream = stream
        self.label = label
        self._last = None

    def show(self, percent: float, text: str = "") -> None:
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
        self.stream.write("\n")
        self.stream.flush()
        self._last = None
