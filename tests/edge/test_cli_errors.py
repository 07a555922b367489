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
