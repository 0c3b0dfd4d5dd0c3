"""A status line for a running loop, on stderr so stdout keeps only the report.

On a terminal the line is redrawn in place ten times a second; otherwise (CI, `2> log`) one line a second is
written, so logs stay readable and still show that the run is alive.
"""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    def __init__(self, label: str, seconds: float, stream: TextIO | None = None) -> None:
        self._label = label
        self._seconds = seconds
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self.interval_ns = 100_000_000 if self._tty else 1_000_000_000

    def update(self, elapsed_s: float, count: int, errors: int) -> None:
        line = f"{self._label}: {elapsed_s:5.1f}/{self._seconds:g} s, {count} requests"
        if errors:
            line += f", {errors} errors"
        self._stream.write(f"\r{line}\x1b[K" if self._tty else line + "\n")
        self._stream.flush()

    def done(self, elapsed_s: float, count: int, errors: int) -> None:
        self.update(elapsed_s, count, errors)
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
