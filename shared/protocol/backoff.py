"""When a device sends a refused update again: the hub's hint, backed off, with jitter.

A hub refusing an update for load (``overloaded``) says how long to wait
(``Ack.retry_after_s``). Every device refused in the same burst would come back at the
same instant and be refused together again, so each waits the hint times a factor that
doubles with every refusal of the same update, times a random jitter in [0.5, 1.5), and
never longer than ``max_delay_s``. The same policy serves the edge SDK and load
generators (benchmarks, tests), so what is measured is what devices do.
"""

from __future__ import annotations

import random

__all__ = ["RetryBackoff", "RETRYABLE_AFTER_HINT"]

# Refusals after which the very same message is sent again (transport and load trouble,
# not the update's content): overloaded, expired and corrupt reassembly.
RETRYABLE_AFTER_HINT = frozenset({"overloaded", "expired", "corrupt"})


class RetryBackoff:
    """Delays for one update's successive re-sends: ``next_delay(hint)`` after each refusal."""

    def __init__(self, *, default_s: float = 1.0, max_delay_s: float = 60.0, rng: random.Random | None = None) -> None:
        self.default_s = default_s
        self.max_delay_s = max_delay_s
        self.refusals = 0
        self._rng = rng or random.Random()

    def next_delay(self, retry_after_s: float | None) -> float:
        """Seconds to wait before sending again, after one more refusal with hint ``retry_after_s``."""
        self.refusals += 1
        base = retry_after_s if retry_after_s is not None and retry_after_s > 0 else self.default_s
        factor = 2.0 ** min(self.refusals - 1, 16)
        return min(self.max_delay_s, base * factor * self._rng.uniform(0.5, 1.5))
