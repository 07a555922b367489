"""The hub load generator (benchmarks/hub_scale.py) on a small setting, so it cannot rot.

Real parts: a mosquitto the benchmark starts, a ``fedvlm-hub start`` process, 20 devices
on their own MQTT connections sending signed updates through the protocol code.
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
                          "20x16KiB", "--out", str(out), "--timeout", "90", "--no-progress"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # The 2-worker setting (20x16KiB:2w) is left out: it accepts 0/20 in about half the runs, a
    # known bug in the workers' first round under the benchmark (open in issue 16); the workers'
    # correctness is tested in tests/hub/test_workers.py.
    (result,) = json.loads((out / "hub_scale.json").read_text())["results"]
    assert result["error"] is None
    assert result["accepted_devices"] == result["receipts"] == result["accepted_acks"] == 20
    assert result["exactly_once"] and result["global_max_rel_error"] < 1e-5
    assert result["round_open_s"] > 0 and result["round_s"] > 0 and result["carry_s"] > 0
    assert result["hub_peak_rss_mib"] > 10 and result["broker_peak_rss_mib"] > 0
    table = (out / "hub_scale.md").read_text()
    assert "| 20x16KiB | 20 | 16 KiB | hub alone |" in table and "20/20 ✓" in table


def test_a_bad_setting_is_a_one_line_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_scale.py"), "--settings", "20by16",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert "setting '20by16': write DEVICESxSIZE[:Kw]" in run.stderr and "Traceback" not in run.stderr
