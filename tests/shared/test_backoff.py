"""RetryBackoff: the hub's hint, doubled per refusal of the same update, jittered, capped."""

from __future__ import annotations

import random

from fedvlm.shared.protocol import RetryBackoff


def test_delays_follow_the_hint_double_per_refusal_and_stay_capped():
    backoff = RetryBackoff(max_delay_s=10.0, rng=random.Random(1))
    delays = [backoff.next_delay(1.0) for _ in range(6)]
    for refusal, delay in enumerate(delays):
        assert min(10.0, 0.5 * 2**refusal) <= delay <= min(10.0, 1.5 * 2**refusal)
    assert backoff.refusals == 6
    assert 0.5 <= RetryBackoff(default_s=1.0).next_delay(None) <= 1.5  # no hint: the default


def test_devices_refused_together_do_not_come_back_together():
    first_retries = sorted(RetryBackoff(rng=random.Random(seed)).next_delay(2.0) for seed in range(200))
    assert first_retries[-1] - first_retries[0] > 1.5  # spread over [1, 3) seconds
