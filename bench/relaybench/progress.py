"""The progress line on stderr, and the notes the reader of the results must see."""

from __future__ import annotations

import shutil
import sys
import time


class Progress:
    """One line on stderr, rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.prefix = ""
        self._last = ""
        self._last_time = 0.0
        self.notes: list[str] = []

    def _clock(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"

    def step(self, text: str) -> None:
        self._emit(f"[{self._clock()}] {self.prefix}{text}", force=True)

    def tick(self, text: str) -> None:
        """A transient update inside a step (only on a terminal, at most 4 times a second)."""
        if self.tty and time.monotonic() - self._last_time > 0.25:
            self._emit(f"[{self._clock()}] {self.prefix}{text}")

    def note(self, text: str) -> None:
        """Something the reader of the results must know: printed now and in the report."""
        self.clear()
        self.notes.append(text)
        print(f"# {text}", file=sys.stderr, flush=True)

    def _emit(self, line: str, force: bool = False) -> None:
        if not self.enabled:
            return
        self._last_time = time.monotonic()
        if self.tty:
            cols = shutil.get_terminal_size((120, 20)).columns
            sys.stderr.write("\r\x1b[K" + line[: cols - 1])
            sys.stderr.flush()
            self._last = line
        elif force:
            print(line, file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.enabled and self.tty and self._last:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._last = ""
