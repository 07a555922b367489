"""fedvlm-hub: a person's mistake ends in one line; a bug deep inside keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvlm.hub.cli import main
from fedvlm.hub.clients import register_client
from fedvlm.hub.errors import user_errors
from fedvlm.hub.secrets_at_rest import SECRETS_KEY_ENVIRONMENT
from fedvlm.hub.store import HubStore
from fedvlm.shared.cli_support import USER_ERROR_EXIT


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    monkeypatch.delenv("FEDVLM_DEBUG", raising=False)  # it would turn every one-line error into a traceback
    monkeypatch.delenv(SECRETS_KEY_ENVIRONMENT, raising=False)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run fedvlm-hub with ``argv``; it must exit 2 with one ``error:`` line and nothing else."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == USER_ERROR_EXIT, captured
    assert captured.err.startswith("fedvlm-hub: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


def write_config(tmp_path: Path, content: str | bytes) -> Path:
    config = tmp_path / "hub.toml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    return config


def hub_with_a_client(tmp_path: Path) -> Path:
    """A hub state dir with one registered client (and so a secrets key)."""
    register_client(tmp_path / "hub", "dev-1")
    return tmp_path / "hub"


def test_a_fraction_above_one_names_the_setting(tmp_path: Path, capsys):
    err = one_line_error(capsys, ["start", "--fraction", "1.5", "--state-dir", str(tmp_path)])
    assert "fraction must be in (0, 1], got 1.5" in err


def test_a_state_dir_that_is_a_file_is_named(tmp_path: Path, capsys):
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("oops")
    err = one_line_error(capsys, ["start", "--state-dir", str(not_a_dir), "--port", "1"])
    assert "is a file" in err and "--state-dir" in err


@pytest.mark.parametrize("content, message", [
    ("rounds = \n", "is not valid TOML"),
    (b"federation = \"caf\xe9\"\n", "is not valid TOML"),  # Latin-1, not the UTF-8 TOML requires
    ('strategy = "fedavg"\n', "strategy 'fedavg' is unknown; choose one of plora"),
    ("[lora]\nr = 0\n", "lora: LoRA rank r must be >= 1"),
])  # fmt: skip
def test_a_bad_config_file_names_what_is_wrong(tmp_path: Path, capsys, content, message):
    config = write_config(tmp_path, content)
    err = one_line_error(capsys, ["start", "--config", str(config), "--state-dir", str(tmp_path / "state")])
    assert message in err


def test_a_config_path_that_is_a_folder(tmp_path: Path, capsys):
    err = one_line_error(capsys, ["start", "--config", str(tmp_path), "--state-dir", str(tmp_path / "state")])
    assert f"cannot read config file {tmp_path}" in err


def test_a_state_dir_in_the_config_that_is_not_a_path(tmp_path: Path, capsys):
    config = write_config(tmp_path, "state_dir = 3\n")  # `clients` reads only this key of the file
    err = one_line_error(capsys, ["clients", "list", "--config", str(config)])
    assert "state_dir must be a path in quotes, got 3" in err


def test_a_secrets_key_file_that_holds_no_key(tmp_path: Path, capsys):
    state_dir = hub_with_a_client(tmp_path)
    key = tmp_path / "not-a.key"
    key.write_text("this is not a key\n")
    key.chmod(0o600)
    err = one_line_error(capsys, ["clients", "add", "dev-2", "--state-dir", str(state_dir),
                                  "--secrets-key-file", str(key)])  # fmt: skip
    assert str(key) in err


def test_a_broker_url_with_a_bad_port(tmp_path: Path, capsys):
    err = one_line_error(capsys, ["start", "--broker", "mqtt://127.0.0.1:99999", "--state-dir", str(tmp_path)])
    assert "has an invalid port" in err


def test_broker_config_out_that_is_a_file(tmp_path: Path, capsys):
    state_dir = hub_with_a_client(tmp_path)
    out = tmp_path / "out"
    out.write_text("")
    err = one_line_error(capsys, ["broker-config", "--state-dir", str(state_dir), "--out", str(out),
                                  "--federation", "f"])  # fmt: skip
    assert "is a file, not a folder" in err


def test_plain_value_and_key_errors_are_not_user_errors():
    assert ValueError not in user_errors() and KeyError not in user_errors()


@pytest.mark.parametrize("bug", [ValueError("operands could not be broadcast together"), KeyError("lora_A")])
def test_a_bug_deep_inside_keeps_its_traceback(tmp_path: Path, monkeypatch, capsys, bug):
    state_dir = hub_with_a_client(tmp_path)

    def broken_listing(self):
        raise bug

    monkeypatch.setattr(HubStore, "list_clients", broken_listing)
    with pytest.raises(type(bug)) as raised:
        main(["clients", "list", "--state-dir", str(state_dir)])
    assert raised.value is bug  # propagated untouched, so Python prints its traceback
    assert "error:" not in capsys.readouterr().err


def test_a_password_file_that_is_not_text_is_named(tmp_path: Path, capsys):
    binary = tmp_path / "broker.der"
    binary.write_bytes(b"\x30\x82\xff\xfe\x00\x9c")
    err = one_line_error(capsys, ["start", "--state-dir", str(tmp_path / "hub"), "--broker", "mqtt://127.0.0.1:1",
                                  "--username", "hub", "--password-file", str(binary)])  # fmt: skip
    assert "broker.der" in err and "is not text" in err


def test_a_secrets_key_under_a_file_is_named(tmp_path: Path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    err = one_line_error(capsys, ["clients", "add", "dev-1", "--state-dir", str(tmp_path / "hub"),
                                  "--secrets-key-file", str(tmp_path / "afile" / "secrets.key")])  # fmt: skip
    assert "secrets key" in err and "is a file" in err


def test_strategy_options_on_the_command_line_are_parsed_and_checked(tmp_path: Path, capsys):
    from fedvlm.hub.cli import _start_config, build_parser

    args = build_parser().parse_args(["start", "--strategy", "rank-split", "--strategy-option", "shared_rank=3",
                                      "--lora-rank", "8", "--state-dir", str(tmp_path)])
    assert _start_config(args).build_strategy().options() == {"shared_rank": 3}
    err = one_line_error(capsys, ["start", "--strategy", "rank-split", "--strategy-option", "shared_rank=8",
                                  "--state-dir", str(tmp_path)])
    assert "shared_rank=8 must be at least 1 and below the LoRA rank r=8" in err
    err = one_line_error(capsys, ["start", "--strategy", "plora", "--strategy-option", "rank=2",
                                  "--state-dir", str(tmp_path)])
    assert "strategy 'plora' has no option 'rank'; it takes refit_steps, personal_lr_scale" in err
    with pytest.raises(SystemExit):  # argparse's own one line: not KEY=VALUE
        build_parser().parse_args(["start", "--strategy-option", "shared_rank"])
    assert "is not KEY=VALUE" in capsys.readouterr().err
