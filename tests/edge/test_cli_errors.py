"""fedvlm-edge: a person's mistake ends in one line; a bug keeps its traceback."""

from __future__ import annotations

import pytest

from fedvlm.edge import cli
from fedvlm.edge.errors import user_errors
from fedvlm.shared.cli_support import USER_ERROR_EXIT, UsageError, run_command


def test_a_bad_hub_url_is_one_line_naming_the_fix(tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    data = tmp_path / "data.jsonl"
    data.write_text("")
    status = cli.main(["join", "--hub", "http://127.0.0.1:1883", "--federation", "f", "--client-id", "a",
                       "--secret-file", str(secret), "--model", str(tmp_path), "--data", str(data),
                       "--state-dir", str(tmp_path / "state")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == USER_ERROR_EXIT
    assert err.startswith("fedvlm-edge: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "mqtt://" in err  # checked before the data and the model are loaded


def test_usage_errors_are_value_errors_but_not_every_value_error_is_a_usage_error(capsys):
    assert issubclass(UsageError, ValueError)
    assert ValueError not in user_errors() and KeyError not in user_errors()

    def buggy(_argv):
        raise ValueError("operands could not be broadcast together")  # what a bug deep inside raises

    with pytest.raises(ValueError, match="broadcast"):
        run_command(buggy, [], user_errors(), "fedvlm-edge")

    def mistaken(_argv):
        raise UsageError("--steps must be at least 1")

    assert run_command(mistaken, [], user_errors(), "fedvlm-edge") == USER_ERROR_EXIT
    assert capsys.readouterr().err == "fedvlm-edge: error: --steps must be at least 1\n"


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    from fedvlm.edge.data import ScenarioConfig, generate_federation
    from fedvlm.edge.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("train-inputs")
    generate_federation(ScenarioConfig.preset("iid", n_clients=2, examples_per_client=2, test_examples_per_client=1,
                                              image_size=32)).write(root / "data")
    return make_tiny_model(root / "gemma3", "tiny", arch="gemma3"), root / "data" / "client_00.parquet"


@pytest.mark.parametrize("flags, message", [
    (["--lora-parts", "eyes"], "LoRA parts: 'eyes' is not one of language, vision, projector"),
    (["--lora-layers", ""], "LoRA layers is empty"),
    (["--lora-target-modules", "("], "is not a valid regex"),
    (["--lora-target-modules", "nothing"], "select no linear layer"),
    # Gemma 3's projector is a norm and a pooling with a plain weight matrix: nothing for LoRA.
    (["--lora-parts", "language,projector"], "select no linear layer in its projector"),
])  # fmt: skip
def test_lora_targets_that_cannot_work_are_one_line(train_inputs, tmp_path, capsys, flags, message):
    model_dir, data = train_inputs
    status = cli.main(["train", "--model", str(model_dir), "--data", str(data), "--state-dir", str(tmp_path / "s"),
                       "--steps", "1", *flags])
    err = capsys.readouterr().err
    assert status == USER_ERROR_EXIT and message in err, err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("fedvlm-edge: error:")


def test_an_unknown_architecture_is_refused_with_the_list(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["make-tiny-model", str(tmp_path / "m"), "--arch", "gpt4v"])
    assert exit_info.value.code == USER_ERROR_EXIT
    assert "qwen2_5_vl" in capsys.readouterr().err
