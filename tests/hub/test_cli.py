"""``fedvlm-hub``: clients add/list/revoke, status, help, and one-line user errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedvlm.hub.cli import main
from fedvlm.hub.store import HubStore
from tests.brokers import free_port

SECRET = re.compile(r"[A-Za-z0-9_-]{43}")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clients_add_prints_the_secret_alone_on_the_last_line(tmp_path: Path, capsys):
    code, out, err = run(capsys, "clients", "add", "dev-1", "--state-dir", str(tmp_path))
    assert code == 0 and err == ""
    secret = out.rstrip("\n").splitlines()[-1]
    assert SECRET.fullmatch(secret)
    with HubStore.in_state_dir(tmp_path, create=False) as store:
        assert store.secret_of("dev-1") == secret

    code, out, err = run(capsys, "clients", "add", "dev-1", "--state-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fedvlm-hub: error: ") and "already registered" in err
    code, _, err = run(capsys, "clients", "add", "bad/name", "--state-dir", str(tmp_path))
    assert code == 2 and "'/'" in err and "Traceback" not in err


def test_clients_list_and_revoke_never_show_secrets(tmp_path: Path, capsys):
    secrets = [run(capsys, "clients", "add", name, "--state-dir", str(tmp_path))[1].splitlines()[-1]
               for name in ("alpha", "beta")]  # fmt: skip
    code, out, _ = run(capsys, "clients", "revoke", "beta", "--state-dir", str(tmp_path))
    assert code == 0 and "revoked" in out
    code, out, _ = run(capsys, "clients", "list", "--state-dir", str(tmp_path))
    assert code == 0
    assert re.search(r"alpha\s+active", out) and re.search(r"beta\s+revoked", out)
    assert not any(secret in out for secret in secrets)
    code, _, err = run(capsys, "clients", "revoke", "nobody", "--state-dir", str(tmp_path))
    assert code == 2 and "not registered" in err


def test_state_dir_can_come_from_the_config_file(tmp_path: Path, capsys, monkeypatch):
    config = tmp_path / "hub.toml"
    config.write_text('state_dir = "from-config"\n')
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "clients", "add", "dev", "--config", str(config))[0] == 0
    assert (tmp_path / "from-config" / "hub.sqlite3").exists()
    code, out, _ = run(capsys, "status", "--config", str(config))
    assert code == 0 and "1 registered" in out


def test_status_works_before_the_hub_ever_ran(tmp_path: Path, capsys):
    run(capsys, "clients", "add", "dev", "--state-dir", str(tmp_path))
    code, out, _ = run(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 0
    assert "not running" in out and "1 registered, 0 online" in out and "0 accepted, 0 rejected" in out
    code, out, _ = run(capsys, "status", "--state-dir", str(tmp_path), "--json")
    status = json.loads(out)
    assert (status["hub_running"], status["phase"], status["accepted_updates"]) == (False, "not started", 0)
    code, _, err = run(capsys, "status", "--state-dir", str(tmp_path / "elsewhere"))
    assert code == 2 and "no hub state" in err


def test_start_refuses_bad_settings_in_one_line(tmp_path: Path, capsys):
    config = tmp_path / "hub.toml"
    config.write_text("roundz = 3\n")
    code, _, err = run(capsys, "start", "--config", str(config), "--state-dir", str(tmp_path))
    assert code == 2 and "roundz" in err and err.count("\n") == 1
    code, _, err = run(capsys, "start", "--fraction", "2", "--state-dir", str(tmp_path))
    assert code == 2 and "fraction" in err


def test_start_explains_a_taken_port(tmp_path: Path, capsys):
    import socket

    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        code, _, err = run(capsys, "start", "--port", str(port), "--state-dir", str(tmp_path), "--quiet")
    assert code == 2 and err.count("\n") == 1
    assert f"--broker mqtt://127.0.0.1:{port}" in err


def test_start_against_a_broker_that_is_not_there(tmp_path: Path, capsys):
    code, _, err = run(capsys, "start", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path),
                       "--quiet")  # fmt: skip
    assert code == 2 and "cannot reach the MQTT broker" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [[], ["start"], ["clients"], ["clients", "add"], ["clients", "list"],
                                  ["clients", "revoke"], ["status"]])  # fmt: skip
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedvlm-hub")
    if argv in (["start"], ["clients", "add"], ["status"]):
        assert "--state-dir" in out


def test_the_installed_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fedvlm.hub.cli", "--help"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0 and "start" in result.stdout and "clients" in result.stdout
