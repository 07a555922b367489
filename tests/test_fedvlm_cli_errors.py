"""fedvlm (demo, simulate): a person's mistake ends in one line; a bug deep inside keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvlm.cli import main, user_errors
from fedvlm.shared.cli_support import USER_ERROR_EXIT


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("FEDVLM_DEBUG", raising=False)  # it would turn every one-line error into a traceback


def one_line_error(capsys, argv: list[str]) -> str:
    """Run fedvlm with ``argv``; it must exit 2 with one ``error:`` line and nothing else on stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == USER_ERROR_EXIT, err
    assert err.startswith("fedvlm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def model_folder(path: Path, config: str) -> Path:
    """A model folder as a user might point --model at: a config.json and nothing else."""
    path.mkdir()
    (path / "config.json").write_text(config)
    return path


@pytest.mark.parametrize("args, message", [
    (["demo", "--rounds", "0"], "--rounds must be at least 1"),
    (["simulate", "--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
    (["simulate", "--clients", "1"], "--clients must be at least 2"),
    (["simulate", "--strategies", "plora,plora"], "names a strategy twice"),
    (["simulate", "--partition", "dirichlet:x", "--data", "."], "bad --partition 'dirichlet:x'"),
    (["simulate", "--learning-rate", "-1"], "--learning-rate must be positive"),
])  # fmt: skip
def test_bad_flags_end_in_one_line(args, message, tmp_path: Path, capsys):
    assert message in one_line_error(capsys, [*args, *(["--out", str(tmp_path)] if args[0] == "simulate" else [])])


def test_a_model_folder_with_a_broken_config_is_named(tmp_path: Path, capsys):
    model = model_folder(tmp_path / "model", "{not json")
    err = one_line_error(capsys, ["simulate", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"])
    assert f"{str(model / 'config.json')!r} is not valid JSON" in err


def test_a_model_folder_transformers_cannot_load_is_named(tmp_path: Path, capsys):
    model = model_folder(tmp_path / "model", "{}")  # valid JSON, but no model_type: no model at all
    err = one_line_error(capsys, ["simulate", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet",
                                  "--strategies", "plora", "--clients", "2", "--examples-per-client", "2",
                                  "--test-examples-per-client", "2", "--rounds", "1"])  # fmt: skip
    assert f"could not load a vision-language model from {str(model)!r}" in err


def test_an_out_folder_with_broken_settings_says_to_use_another(tmp_path: Path, capsys):
    model = model_folder(tmp_path / "model", "{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "simulation.json").write_text("[1, 2")  # cut short by hand, say; the simulation writes it atomically
    err = one_line_error(capsys, ["simulate", "--model", str(model), "--out", str(out), "--quiet"])
    assert "is not a simulation's settings" in err and "use another --out" in err


def test_plain_value_and_key_errors_are_not_user_errors():
    assert ValueError not in user_errors() and KeyError not in user_errors()


def test_a_bug_deep_inside_keeps_its_traceback(tmp_path: Path, monkeypatch, capsys):
    import fedvlm.edge.model_loading

    bug = ValueError("operands could not be broadcast together")

    def broken_fingerprint(model_dir):
        raise bug

    monkeypatch.setattr(fedvlm.edge.model_loading, "base_fingerprint", broken_fingerprint)
    model = model_folder(tmp_path / "model", "{}")
    with pytest.raises(ValueError) as raised:
        main(["simulate", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"])
    assert raised.value is bug  # propagated untouched, so Python prints its traceback
    assert "error:" not in capsys.readouterr().err


def test_a_work_dir_that_is_a_file_is_one_line(tmp_path: Path, capsys):
    not_a_dir = tmp_path / "work"
    not_a_dir.write_text("oops")
    err = one_line_error(capsys, ["demo", "--work-dir", str(not_a_dir)])
    assert "work" in err and "exists" in err
