"""A progress bar on stderr: redrawn in place on a terminal, one line per step in a log."""
from __future__ import annotations

import sys
import time


class Progress:
    WIDTH = 24

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, label: str) -> None:
        """Announce the step about to run (`label`); the bar counts the ones finished."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if not self.enabled:
            return
        self.done = self.total
        if self.tty:
            self.stream.write("\r\033[K")
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"[{'#' * self.WIDTH}] done in {elapsed:.0f}s\n")
        self.stream.flush()
