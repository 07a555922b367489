"""The short fuzz run: ~800 hostile and broken messages to a real ``fedvlm-hub start``
process through each real broker (the long run, ≥ 10,000 messages, is ``make fuzz``;
its figures are in docs/reliability.md). What the fuzzer sends and checks is in
benchmarks/fuzz_hub.py."""

from __future__ import annotations

import pytest

from benchmarks.fuzz_hub import run_fuzz


@pytest.mark.parametrize("broker_kind, seed", [("embedded", 11), ("mosquitto", 12)])
def test_hub_survives_fuzzing_refuses_everything_bad_and_completes_the_round(tmp_path, broker_kind, seed):
    report = run_fuzz(800, seed, broker_kind, tmp_path)
    print(report.summary())  # shown by pytest on failure: the per-reason table says what differed
    assert report.messages_sent >= 800
    assert report.hub_crashes == 0 and report.hub_exit_status == 0  # alive throughout, then a clean SIGTERM
    assert report.hub_internal_errors == 0  # no traceback, no hub_error ack
    assert report.bad_updates_accepted == 0 and report.accepted_acks_for_fuzz == []
    # Every refusal the fuzzer caused was counted under the reason it expected, and nothing else was.
    assert report.rejection_mismatch == {}
    assert report.hub_rejections == report.expected_rejections
    # Replays of accepted round-1 updates were acknowledged again but created no receipt
    # (bad_updates_accepted counts any receipt beyond the honest ones).
    assert report.rounds_completed == 2 and report.rounds_lost == 0
    assert report.global_matches_honest_mean
    # Bounded memory, loosely: the hub process (with the embedded broker in it) stays far
    # below what unbounded buffering of the fuzz traffic would need; figures in the docs.
    assert report.peak_rss_mib < 400
