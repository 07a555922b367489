"""A broken install is one line that names the fix, never a traceback from deep inside transformers.

Each case runs the real command in a fresh interpreter whose torchvision (or num2words) is
broken the way users meet it: a torchvision built for another torch fails at import with
``operator torchvision::nms does not exist``; one of another release imports but does not
match; a missing package is not importable at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedvlm.edge.tiny_model import make_tiny_model

# Run a command's main() after making a package unimportable (Python's own convention).
_WITHOUT = "import sys; sys.modules[{name!r}] = None; sys.argv = {argv!r}; from {module} import main; sys.exit(main())"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "qwen2_vl", "tiny", arch="qwen2_vl")


def _fake_torchvision(root: Path, body: str) -> Path:
    (root / "torchvision").mkdir(parents=True)
    (root / "torchvision" / "__init__.py").write_text(body)
    return root


def _run(args, *, pythonpath=None, code=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if pythonpath:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, "-c", code] if code else [str(Path(sys.executable).parent / args[0]), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("body, message", [
    ('raise RuntimeError("operator torchvision::nms does not exist")', "does not import beside torch"),
    ('__version__ = "0.28.0+cu128"', "is built for another torch"),
])  # fmt: skip
@pytest.mark.parametrize("program", ["fedvlm-edge", "fedvlm"])
def test_a_mismatched_torchvision_is_one_line_with_the_fix(tmp_path, qwen_dir, body, message, program):
    fake = _fake_torchvision(tmp_path / "site", body)
    args = (["fedvlm-edge", "train", "--model", str(qwen_dir), "--data", "x", "--state-dir", str(tmp_path / "s")]
            if program == "fedvlm-edge" else ["fedvlm", "simulate", "--model", str(qwen_dir), "--out", str(tmp_path)])
    done = _run(args, pythonpath=fake)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "pip install 'torchvision==0.29.*'" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_missing_torchvision_is_one_line_with_the_fix(tmp_path, qwen_dir):
    argv = ["fedvlm-edge", "train", "--model", str(qwen_dir), "--data", "x", "--state-dir", str(tmp_path / "s")]
    done = _run(None, code=_WITHOUT.format(name="torchvision", argv=argv, module="fedvlm.edge.cli"))
    assert done.returncode == 2 and "torchvision is not installed" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_smolvlm_without_its_processor_package_says_what_to_install(tmp_path_factory):
    from fedvlm.edge.data import ScenarioConfig, generate_federation

    root = tmp_path_factory.mktemp("smol")  # (pytest's folder name would contain the word looked for)
    model_dir = make_tiny_model(root / "model", "tiny", arch="smolvlm")
    generate_federation(ScenarioConfig.preset("iid", n_clients=2, examples_per_client=2, test_examples_per_client=1,
                                              image_size=32)).write(root / "data")
    argv = ["fedvlm-edge", "train", "--model", str(model_dir), "--data", str(root / "data" / "client_00.parquet"),
            "--state-dir", str(root / "state")]
    done = _run(None, code=_WITHOUT.format(name="num2words", argv=argv, module="fedvlm.edge.cli"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs a package that is not installed" in done.stderr and "num2words" in done.stderr
    assert "Traceback" not in done.stderr
