"""The hub load generator (benchmarks/hub_scale.py) on a small setting, so it cannot rot.

Real parts: a mosquitto the benchmark starts, a ``fedvlm-hub start`` process (alone, then
with two ``fedvlm-hub worker`` processes), 20 devices on their own MQTT connections
sending signed updates through the protocol code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")


def test_twenty_devices_are_each_counted_once_and_reported(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_scale.py"), "--settings",
                          "20x16KiB,20x16KiB:2w", "--out", str(out), "--timeout", "90", "--no-progress"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    alone, workers = json.loads((out / "hub_scale.json").read_text())["results"]
    for result in (alone, workers):
        assert result["error"] is None
        assert result["accepted_devices"] == result["receipts"] == result["accepted_acks"] == 20
        assert result["exactly_once"] and result["global_max_rel_error"] < 1e-5
        assert result["round_open_s"] > 0 and result["round_s"] > 0 and result["carry_s"] > 0
        assert result["hub_peak_rss_mib"] > 10 and result["broker_peak_rss_mib"] > 0
    assert len(workers["worker_peak_rss_mib"]) == 2 and min(workers["worker_peak_rss_mib"]) > 10
    # CPU seconds by process: the round's of every process that took part, the carry's,
    # and the whole life of the hub and the workers (they import numpy: never nothing).
    assert set(alone["round_cpu_s"]) == {"hub", "mosquitto", "generator"}
    assert set(workers["round_cpu_s"]) == {"hub", "worker-0", "worker-1", "mosquitto", "generator"}
    for result in (alone, workers):
        assert set(result["carry_cpu_s"]) == {"mosquitto", "generator", "subscriber"}
        assert all(value >= 0 for value in (*result["round_cpu_s"].values(), *result["carry_cpu_s"].values()))
        assert result["round_cpu_ms_per_update"]["hub"] == pytest.approx(1000 * result["round_cpu_s"]["hub"] / 20,
                                                                           abs=1e-3)  # fmt: skip
        assert result["hub_cpu_s"] > 0.1
    assert len(workers["worker_cpu_s"]) == 2 and min(workers["worker_cpu_s"]) > 0.1
    table = (out / "hub_scale.md").read_text()
    assert "| 20x16KiB | 20 | 16 KiB | hub alone |" in table and "| 20x16KiB:2w | 20 | 16 KiB | 2 |" in table
    assert table.count("20/20 ✓") == 2
    header, _, *rows = table.splitlines()[2:6]
    assert "round CPU ms/update: hub" in header and "carry CPU ms/update: mosquitto" in header
    assert all(row.count("|") == header.count("|") for row in rows)


def test_a_bad_setting_is_a_one_line_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_scale.py"), "--settings", "20by16",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert "setting '20by16': write DEVICESxSIZE[:Kw][:drain]" in run.stderr and "Traceback" not in run.stderr


def test_the_kill_benchmark_restarts_a_killed_worker_and_checks_the_round(tmp_path: Path) -> None:
    """benchmarks/hub_kill.py at a small size, so it cannot rot: worker 0 of 2 SIGKILLed once half
    the devices are acknowledged, started again; at this size the kill may come after the last
    commit, so only the round's checks are asserted here (``make bench-hub-kill`` runs 1,000)."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_kill.py"), "--devices", "30",
                          "--update-size", "16KiB", "--kill", "worker", "--out", str(out), "--timeout", "60"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]
    (result,) = json.loads((out / "hub_kill.json").read_text())["results"]
    assert result["error"] is None and result["killed"] == "worker 0" and result["workers"] == 2
    assert result["acknowledged_at_kill"] >= 15
    assert result["devices_accepted"] == result["receipts"] == result["distinct_receipts"] == 30
    assert result["duplicate_refusals"] == 0 and result["global_max_rel_error"] < 1e-6
    assert "| worker 0 | 30 | 16 KiB | 2 |" in (out / "hub_kill.md").read_text()


def test_the_kill_benchmark_refuses_a_bad_size_in_one_line(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_kill.py"), "--update-size", "64kb",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert "--update-size '64kb': write a size in B, KiB or MiB" in run.stderr and "Traceback" not in run.stderr


def test_a_measured_process_keeps_the_cpu_time_it_had_when_it_exited() -> None:
    """The CPU seconds are read from the child's /proc entry after it exited and before it is
    reaped (a reaped pid has no entry, or another process's)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hub_scale import MeasuredProcess

    burner = subprocess.Popen([sys.executable, "-c", "import time\nwhile time.process_time() < 0.3: pass"])
    measured = MeasuredProcess(burner)
    assert measured.reap(60) and burner.returncode == 0
    assert measured.cpu_s is not None and measured.cpu_s >= 0.28


def test_a_drain_stops_the_workers_until_the_broker_holds_every_update(tmp_path: Path) -> None:
    """``:drain``: the worker is stopped once subscribed, the devices all send, the broker
    holds the round, and only then is the worker let go and timed to the last update judged."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_scale.py"), "--settings", "30x16KiB:1w:drain",
                          "--out", str(out), "--timeout", "90", "--no-progress"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result,) = json.loads((out / "hub_scale.json").read_text())["results"]
    assert result["drain"] and result["error"] is None and result["exactly_once"]
    # Stopped before the round opened: nothing was acknowledged until it was let go. The drain
    # (let go -> last update judged) lies inside the round (open -> global published), and the
    # acks reach the devices after the updates were judged.
    assert result["acked_before_drain"] == 0
    assert 0 < result["drain_s"] < result["round_s"] and result["drain_s"] < result["drain_to_last_ack_s"]
    assert result["drain_cpu_s"]["worker-0"] > 0
    drains = (out / "hub_scale.md").read_text().split("Drains (")[1]
    assert "| 30x16KiB:1w:drain | 1 |" in drains


def test_a_drain_without_workers_is_a_one_line_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_scale.py"), "--settings", "20x16KiB:drain",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert "a drain stops the hub workers, so it needs some (e.g. 20x16KiB:1w:drain)" in run.stderr
    assert "Traceback" not in run.stderr
