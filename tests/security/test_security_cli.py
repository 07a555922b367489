"""User mistakes on the security flags end in one line saying what to do, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvlm.edge.cli import main as edge_main
from fedvlm.hub.cli import main as hub_main


def _error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def state_dir(tmp_path: Path, capsys) -> Path:
    assert hub_main(["clients", "add", "dev-1", "--state-dir", str(tmp_path / "hub")]) == 0
    capsys.readouterr()
    return tmp_path / "hub"


def test_broker_config_mistakes(state_dir: Path, tmp_path: Path, capsys):
    out = str(tmp_path / "out")
    err = _error(capsys, hub_main(["broker-config", "--state-dir", str(tmp_path / "none"), "--out", out]))
    assert "no hub state" in err
    err = _error(capsys, hub_main(["broker-config", "--state-dir", str(state_dir), "--out", out]))
    assert "pass --federation NAME" in err
    err = _error(capsys, hub_main(["broker-config", "--state-dir", str(state_dir), "--out", out, "--federation", "f",
                                   "--tls-certfile", "server.crt"]))  # fmt: skip
    assert "--tls-keyfile" in err
    err = _error(capsys, hub_main(["broker-config", "--state-dir", str(state_dir), "--out", out, "--federation", "f",
                                   "--hub-username", "dev-1"]))  # fmt: skip
    assert "choose another with --hub-username" in err
    assert not Path(out).exists()  # nothing half-written


def test_a_device_may_not_take_the_name_of_a_hub_broker_account(state_dir: Path, tmp_path: Path, capsys):
    for name in ("fedvlm-hub", "fedvlm-hub-publisher", "fedvlm-hub-worker-3"):
        err = _error(capsys, hub_main(["clients", "add", name, "--state-dir", str(state_dir)]))
        assert "one of the hub's broker accounts" in err, name
    assert hub_main(["clients", "add", "fedvlm-hub-worker-x", "--state-dir", str(state_dir)]) == 0
    # Once broker-config ran with another hub username, that one's accounts are refused.
    assert hub_main(["broker-config", "--state-dir", str(state_dir), "--out", str(tmp_path / "out"),
                     "--federation", "f", "--hub-username", "hubx"]) == 0  # fmt: skip
    capsys.readouterr()
    err = _error(capsys, hub_main(["clients", "add", "hubx-publisher", "--state-dir", str(state_dir)]))
    assert "'hubx'" in err


def test_placeholders_when_no_tls_files_are_given(state_dir: Path, tmp_path: Path, capsys):
    assert hub_main(["broker-config", "--state-dir", str(state_dir), "--out", str(tmp_path / "out"),
                     "--federation", "f"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "placeholders" in printed and "kill -HUP" in printed
    conf = (tmp_path / "out" / "mosquitto.conf").read_text()
    assert "REPLACE the three placeholder paths" in conf and "listener 8883\n" in conf


@pytest.mark.parametrize("content", [None, ""])
def test_start_with_an_unreadable_or_empty_password_file(state_dir: Path, tmp_path: Path, capsys, content):
    password_file = tmp_path / "hub.password"
    if content is not None:
        password_file.write_text(content)
    err = _error(capsys, hub_main(["start", "--state-dir", str(state_dir), "--broker", "mqtts://127.0.0.1:1",
                                   "--password-file", str(password_file)]))  # fmt: skip
    assert str(password_file) in err


def test_broker_login_excludes_an_explicit_username(tmp_path: Path, capsys):
    (tmp_path / "s").write_text("x" * 43)
    (tmp_path / "d.jsonl").write_text("")
    code = edge_main(["join", "--hub", "mqtts://127.0.0.1:1", "--federation", "f", "--client-id", "c",
                      "--secret-file", str(tmp_path / "s"), "--model", str(tmp_path),
                      "--data", str(tmp_path / "d.jsonl"),
                      "--state-dir", str(tmp_path / "st"), "--broker-login", "--username", "c"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "drop --username/--password-file, or drop --broker-login" in err


def test_add_and_revoke_remind_to_refresh_the_broker_and_a_rerun_needs_no_options(state_dir: Path, tmp_path: Path,
                                                                                  capsys):  # fmt: skip
    out = tmp_path / "out"
    assert hub_main(["broker-config", "--state-dir", str(state_dir), "--out", str(out), "--federation", "f",
                     "--port", "18883", "--tls-certfile", "/pki/server.crt", "--tls-keyfile", "/pki/server.key"]) == 0
    capsys.readouterr()
    assert hub_main(["clients", "add", "dev-2", "--state-dir", str(state_dir)]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert any(f"broker-config --state-dir {state_dir} --out {out}" in line for line in lines[:-1])
    assert len(lines[-1]) == 43  # the secret is still alone on the last line
    assert hub_main(["broker-config", "--state-dir", str(state_dir), "--out", str(out)]) == 0  # no options again
    conf = (out / "mosquitto.conf").read_text()
    assert "listener 18883\n" in conf and "certfile /pki/server.crt\n" in conf
    assert {line.split(":")[0] for line in (out / "passwords").read_text().splitlines()} == {
        "fedvlm-hub", "fedvlm-hub-publisher", "dev-1", "dev-2"}
    capsys.readouterr()
    assert hub_main(["clients", "revoke", "dev-1", "--state-dir", str(state_dir)]) == 0
    assert "remove the broker account of 'dev-1'" in capsys.readouterr().out


def test_a_connection_leaving_the_machine_without_tls_is_warned_about():
    from fedvlm.shared.broker_credentials import plaintext_warning

    warning = plaintext_warning("broker.example", tls=False, has_password=True)
    assert warning and "broker password" in warning and "mqtts://" in warning
    assert "password" not in plaintext_warning("10.0.0.7", tls=False, has_password=False)
    for host in ("127.0.0.1", "localhost", "::1"):
        assert plaintext_warning(host, tls=False, has_password=True) is None
    assert plaintext_warning("broker.example", tls=True, has_password=True) is None


def test_hub_start_warns_on_a_remote_broker_without_tls(state_dir: Path, capsys):
    # 0.0.0.0 is not a loopback address, yet Linux connects it to this machine, where port 1
    # refuses at once: the warning comes, then the connection error, without a network.
    code = hub_main(["start", "--state-dir", str(state_dir), "--broker", "mqtt://0.0.0.0:1", "--password", "pw"])
    err = capsys.readouterr().err
    assert code == 2 and "warning: connecting to the broker at 0.0.0.0 without TLS" in err
