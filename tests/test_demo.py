"""`fedvlm demo` end to end, shrunk: a tiny pre-trained VLM, 2 device processes, 1 round.

The real hub and device commands run over the hub's embedded broker; then the ONNX step
exports the base once, writes each client's adapter and answers with ONNX Runtime. The
answers are checked against PyTorch with the same device states, and what each client's
convention expects is derived here independently of the demo's code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedvlm.cli import main as fedvlm_main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import contextlib
    import io

    from fedvlm.demo import DemoSettings, run_demo

    # 150 pre-training steps (4 s) are enough for the tiny base to answer in words, so the
    # ONNX-versus-PyTorch check below compares real answers, not two empty strings.
    settings = DemoSettings(work_dir=tmp_path_factory.mktemp("demo"), clients=2, rounds=1, local_steps=10,
                            examples_per_client=16, test_examples_per_client=6, quantization="none",
                            model_size="tiny", pretrain_steps=150, pretrain_examples=128)
    import torch

    output = io.StringIO()
    threads = torch.get_num_threads()
    # torch is loaded by now, so the demo's passive OpenMP waiting cannot take effect in this
    # process; one thread does not spin at all (the devices run with one thread each anyway).
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(output):
            assert run_demo(settings) == 0
    finally:
        torch.set_num_threads(threads)
    return settings, output.getvalue()


def test_demo_federates_and_reports(demo_run):
    settings, output = demo_run
    results = json.loads((settings.work_dir / "results.json").read_text())
    assert [row["client_id"] for row in results["clients"]] == ["client_00", "client_01"]
    for row in results["clients"]:
        assert len(row["per_round"]) == 1  # each device evaluated after its round's training
        assert 0.0 <= row["personal"] <= 1.0
    assert "| **mean** |" in output and "round 1 aggregated" in output
    assert (settings.work_dir / "accuracy_per_round.png").stat().st_size > 0


def test_demo_onnx_step_answers_with_each_clients_adapter(demo_run):
    from PIL import Image

    from fedvlm.edge.data import LANGUAGES
    from fedvlm.edge.device_state import load_state
    from fedvlm.edge.onnx_adapter import read_adapter_tensors
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.lora_config import LoraSettings

    settings, output = demo_run
    onnx = json.loads((settings.work_dir / "results.json").read_text())["onnx"]
    export = settings.work_dir / "onnx"
    for name in ("prefill.onnx", "decode.onnx", "export.json", "client_00.onnx_adapter", "client_01.onnx_adapter",
                 "client_00.onnx_adapter.json", "client_01.onnx_adapter.json"):
        assert (export / name).is_file(), name
    assert onnx["reused"] is False and "[5/5] client_00's personalised model on ONNX Runtime" in output

    # What each convention expects, derived from the conventions table: client 0 answers in
    # English with a plain camera, client 1 in French through a mirrored one.
    answers = onnx["answers"]
    question = onnx["question"]
    english_answer = answers["client_00"]["expected"]
    kind = next(k for k, words in LANGUAGES["english"].items() if english_answer in words)
    shown = LANGUAGES["english"][kind].index(english_answer)
    if kind == "position":
        shown = 1 - shown
    assert answers["client_01"]["expected"] == LANGUAGES["french"][kind][shown]
    assert answers["client_01"]["convention"] == "french-mirrored"
    for client_id in ("client_00", "client_01"):
        assert answers[client_id]["answer"], f"{client_id}'s adapter answered nothing"
        line = (f"{client_id}'s adapter ({'english' if client_id == 'client_00' else 'french, mirrored camera'}) "
                f"answers {answers[client_id]['answer']!r}; its convention expects {answers[client_id]['expected']!r}")
        assert line in output

    # The adapters hold what the devices kept: the same global B, each its own personal A.
    tensors = {c: read_adapter_tensors(export / f"{c}.onnx_adapter") for c in ("client_00", "client_01")}
    a_names = [n for n in tensors["client_00"] if "lora_A" in n]
    b_names = [n for n in tensors["client_00"] if "lora_B" in n]
    assert a_names and b_names
    assert any(not np.array_equal(tensors["client_00"][n], tensors["client_01"][n]) for n in a_names)
    assert all(np.array_equal(tensors["client_00"][n], tensors["client_01"][n]) for n in b_names)
    assert any(np.abs(tensors["client_00"][n]).max() > 0 for n in b_names)  # a trained, averaged B

    # ONNX Runtime answers as PyTorch does with the same device state (fp32 base).
    image = Image.open(onnx["image"]).convert("RGB")
    states = {c: load_state(settings.work_dir / "run" / "devices" / c) for c in ("client_00", "client_01")}
    model = PersonalVLM.from_pretrained(settings.work_dir / "model", lora=LoraSettings.from_dict(states["client_00"].lora),
                                        quantization="none", device="cpu")
    for client_id, state in states.items():
        model.reset_adapters()
        model.restore(state)
        assert model.answer(image, question) == answers[client_id]["answer"], client_id


def test_demo_onnx_step_reuses_the_base_export(demo_run):
    import contextlib
    import io

    from fedvlm.demo import onnx_step, prepare_data

    settings, _ = demo_run
    prefill = settings.work_dir / "onnx" / "prefill.onnx"
    before = prefill.stat().st_mtime_ns
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        federation, _ = prepare_data(settings, settings.work_dir / "model")
        again = onnx_step(settings, settings.work_dir / "model", federation, settings.work_dir / "run")
    assert again["reused"] is True and "reused (same base model and LoRA layout)" in output.getvalue()
    assert prefill.stat().st_mtime_ns == before


def test_demo_refuses_bad_flags_in_one_line(capsys):
    assert fedvlm_main(["demo", "--clients", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fedvlm: error: --clients must be at least 2: a federation needs more than one device"
    assert fedvlm_main(["demo", "--pretrain-steps", "0"]) == 2
    assert "--pretrain-steps must be at least 1" in capsys.readouterr().err


def test_a_process_that_fails_ends_the_demo_at_once_with_its_last_words(demo_run, tmp_path):
    """An unreachable --broker: the hub and devices exit at once, and the demo stops with the
    failing process's last line and log path (one line on the command line), instead of a
    traceback or devices retrying for half an hour."""
    import dataclasses
    import time

    from fedvlm.cli import user_errors
    from fedvlm.demo import run_federation
    from fedvlm.errors import DemoStepFailed
    from tests.brokers import free_port

    settings, _ = demo_run
    model_dir, data_dir = settings.work_dir / "model", settings.work_dir / "data"
    assert (data_dir / "client_00.parquet").exists() and model_dir.is_dir()
    broken = dataclasses.replace(settings, work_dir=tmp_path, broker=f"mqtt://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(DemoStepFailed, match=r"(the hub|device client_0[01]) exited with status 2: .+; full log: "):
        run_federation(broken, model_dir, data_dir, ["client_00", "client_01"])
    assert time.monotonic() - started < 90
    assert DemoStepFailed in user_errors()
