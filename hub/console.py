"""The hub's console: one timestamped line per event, and a progress line per round.

Plain lines rather than a redrawn bar, so the output reads the same in a terminal, a log
file and a CI transcript. Secrets never reach this module.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Console"]


class Console:
    """Writes ``HH:MM:SS message`` lines; ``enabled=False`` silences it (library use, tests)."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self._stream = stream
        self.enabled = enabled
        self._lock = threading.Lock()  # the service and the main thread both report

    def event(self, message: str) -> None:
        if not self.enabled:
            return
        stream = self._stream or sys.stdout
        line = f"{time.strftime('%H:%M:%S')} {message}\n"
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):  # a closed pipe must not take the hub down
                pass

    def progress(self, round_number: int, attempt: int, answered: int, selected: int, quorum: int,
                 seconds_left: float) -> None:  # fmt: skip
        bar_width = 20
        filled = round(bar_width * answered / selected) if selected else 0
        bar = "#" * filled + "." * (bar_width - filled)
        retry = f" (attempt {attempt})" if attempt > 1 else ""
        self.event(f"round {round_number}{retry} [{bar}] {answered}/{selected} updates, quorum {quorum}, "
                   f"deadline in {seconds_left:.0f} s")  # fmt: skip
