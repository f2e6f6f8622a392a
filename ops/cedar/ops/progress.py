"""Progress on stderr: a redrawn bar on a terminal, plain periodic lines otherwise (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self,
        total: int,
        label: str = "",
        *,
        stream: TextIO | None = None,
        interval: float = 5.0,
        width: int = 30,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval
        self.width = width
        self._last_line = ""
        self._last_at = 0.0
        self._done = -1

    def line(self, done: int, detail: str = "") -> str:
        total = max(self.total, 1)
        filled = int(self.width * min(done, total) / total)
        bar = "#" * filled + "." * (self.width - filled)
        pct = 100 * done // total
        text = f"{self.label} [{bar}] {done}/{self.total} ({pct}%)"
        return f"{text} {detail}".rstrip()

    def update(self, done: int, detail: str = "") -> None:
        """Redraw on a terminal; elsewhere print when the count changed or every `interval`."""
        text = self.line(done, detail)
        now = time.monotonic()
        if self.tty:
            if text != self._last_line:
                self.stream.write("\r\x1b[2K" + text)
                self.stream.flush()
        elif done != self._done or now - self._last_at >= self.interval:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_at = now
        self._last_line, self._done = text, done

    def close(self) -> None:
        if self.tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()
