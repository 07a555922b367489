"""A whole round over the locked-down broker, from the command line, with TLS, ACLs and DP.

Everything a operator would run, as processes: ``fedvlm-hub clients add`` (twice),
``fedvlm-hub broker-config``, mosquitto with the generated configuration and a CA made
here, ``fedvlm-hub start --password-file``, two ``fedvlm-edge join --broker-login`` (one
with differential privacy), ``fedvlm-hub status``. Then: the round completed over TLS;
the DP device's update carries noise of the configured scale and only lora_B; and no
secret, broker password or hub password appears in any output or log, except the one
line ``clients add`` prints, nor in plain text in the hub's state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedvlm.edge.privacy import gaussian_epsilon
from fedvlm.hub.store import HubStore
from fedvlm.shared import tensor_codec
from fedvlm.shared.broker_credentials import broker_password
from fedvlm.shared.lora_keys import factor_of
from tests.brokers import free_port
from tests.security.locked_broker import LockedMosquitto, make_pki

BIN = Path(sys.executable).parent
FEDERATION = "locked"
CLIENTS = ("dev-a", "dev-b")
DP_CLIP, DP_SIGMA = 0.01, 1.0


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def client_data(tmp_path_factory):
    from fedvlm.edge.data import ScenarioConfig, generate_federation

    out = tmp_path_factory.mktemp("data")
    config = ScenarioConfig.preset("concept-shift", n_clients=2, examples_per_client=8, test_examples_per_client=4,
                                   image_size=32, seed=3)  # fmt: skip
    generate_federation(config).write(out)
    return out


def test_a_round_over_tls_with_acls_and_dp_leaks_no_secret(tmp_path: Path, tiny_model_dir, client_data):
    hub_dir, out_dir = tmp_path / "hub", tmp_path / "broker"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("FEDVLM_HUB_SECRETS_KEY_FILE", None)
    outputs: dict[str, str] = {}

    secrets = {}
    for name in CLIENTS:
        added = _run(str(BIN / "fedvlm-hub"), "clients", "add", name, "--state-dir", str(hub_dir), env=env)
        assert added.returncode == 0, added.stderr
        outputs[f"clients add {name}"] = added.stdout + added.stderr
        secrets[name] = added.stdout.strip().splitlines()[-1]
        (tmp_path / f"{name}.secret").write_text(secrets[name])

    pki = make_pki(tmp_path / "pki")
    port = free_port()
    configured = _run(str(BIN / "fedvlm-hub"), "broker-config", "--state-dir", str(hub_dir), "--out", str(out_dir),
                      "--federation", FEDERATION, "--port", str(port), "--bind", "127.0.0.1", "--tls-cafile",
                      str(pki.ca_cert), "--tls-certfile", str(pki.server_cert), "--tls-keyfile", str(pki.server_key),
                      env=env)  # fmt: skip
    assert configured.returncode == 0, configured.stderr
    outputs["broker-config"] = configured.stdout + configured.stderr
    hub_password = (out_dir / "hub.password").read_text().strip()

    mosquitto = LockedMosquitto(out_dir / "mosquitto.conf", port).start()
    url = f"mqtts://127.0.0.1:{port}"
    hub = subprocess.Popen(
        [str(BIN / "fedvlm-hub"), "start", "--state-dir", str(hub_dir), "--federation", FEDERATION, "--broker", url,
         "--username", "fedvlm-hub", "--password-file", str(out_dir / "hub.password"), "--ca-file", str(pki.ca_cert),
         "--mqtt-protocol", "5", "--rounds", "1", "--min-clients", "2", "--round-timeout", "120", "--lora-rank", "4",
         "--lora-alpha", "8", "--local-steps", "3", "--keep-updates"],  # the test reads what dev-a sent
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    devices = {}
    try:
        for index, name in enumerate(CLIENTS):
            dp = ["--dp-clip", str(DP_CLIP), "--dp-noise-multiplier", str(DP_SIGMA)] if name == "dev-a" else []
            devices[name] = subprocess.Popen(
                [str(BIN / "fedvlm-edge"), "join", "--hub", url, "--federation", FEDERATION, "--client-id", name,
                 "--secret-file", str(tmp_path / f"{name}.secret"), "--broker-login", "--ca-file", str(pki.ca_cert),
                 "--model", str(tiny_model_dir), "--data", str(client_data / f"client_{index:02d}.parquet"),
                 "--state-dir", str(tmp_path / "devices" / name), "--quantization", "none", "--mqtt-version", "5",
                 "--quiet", "--timeout", "240", *dp],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
        for name, device in devices.items():
            outputs[f"device {name}"] = device.communicate(timeout=300)[0]
        outputs["hub start"] = hub.communicate(timeout=120)[0]
    finally:
        for process in (hub, *devices.values()):
            if process.poll() is None:
                process.kill()
        mosquitto.stop()
    for name, device in devices.items():
        assert device.returncode == 0, f"{name} failed:\n{outputs[f'device {name}'][-3000:]}"
    assert hub.returncode == 0, outputs["hub start"][-3000:]
    status = _run(str(BIN / "fedvlm-hub"), "status", "--state-dir", str(hub_dir), "--json", env=env)
    outputs["status"] = status.stdout + status.stderr
    outputs["mosquitto log"] = mosquitto.log_path.read_text(errors="replace")

    # The round completed over TLS: both updates accepted, global version 1 published.
    with HubStore.in_state_dir(hub_dir, create=False) as store:
        receipts = {receipt.client_id: receipt for receipt in store.receipts(1)}
        assert set(receipts) == set(CLIENTS)
        assert store.latest_global().version == 1 and store.latest_global().published
        assert store.rejection_counts() == {}
        dp_update, _ = tensor_codec.decode(Path(receipts["dev-a"].file_path).read_bytes())
        dp_metrics = json.loads(receipts["dev-a"].metrics)
    assert "round 1 aggregated: 2 update(s)" in outputs["hub start"]

    # DP: only lora_B left the device; starting from B = 0 with the change clipped to 0.01,
    # what arrived is essentially the noise, whose std must be sigma * C.
    assert {factor_of(name) for name in dp_update} == {"B"}
    values = np.concatenate([tensor.ravel() for tensor in dp_update.values()]).astype(np.float64)
    assert values.size > 1000
    assert values.std() == pytest.approx(DP_SIGMA * DP_CLIP, rel=0.1)
    expected_epsilon = gaussian_epsilon(DP_SIGMA, 1, 1e-5)
    assert dp_metrics["privacy"]["epsilon_total"] == pytest.approx(expected_epsilon)
    # Nothing computed from the device's data travels beside the noised factors.
    assert set(dp_metrics) == {"privacy"}
    assert not {"clip_norm_before", "clipped"} & set(dp_metrics["privacy"])
    (report,) = [json.loads(line) for line in outputs["device dev-a"].splitlines() if line.startswith('{"round"')]
    assert report["accepted"] and report["privacy"]["epsilon_round"] == pytest.approx(expected_epsilon)
    assert "privacy" not in outputs["device dev-b"]

    # No secret, derived broker password or hub password in any output or log...
    sensitive = {f"secret of {name}": secret for name, secret in secrets.items()}
    sensitive.update({f"broker password of {name}": broker_password(secret) for name, secret in secrets.items()})
    sensitive["hub broker password"] = hub_password
    for what, value in sensitive.items():
        lines = [(source, line) for source, text in outputs.items() for line in text.splitlines() if value in line]
        if what.startswith("secret of "):
            name = what.removeprefix("secret of ")
            # ...except the one line `clients add` prints for that client.
            assert lines == [(f"clients add {name}", value)], f"{what} appears in {[s for s, _ in lines]}"
        else:
            assert lines == [], f"{what} appears in {[s for s, _ in lines]}"
    # ...nor in plain text anywhere in the hub's state (database, WAL, updates, globals).
    state_bytes = b"".join(path.read_bytes() for path in hub_dir.rglob("*") if path.is_file())
    for name, secret in secrets.items():
        assert secret.encode() not in state_bytes, f"the secret of {name} is in the hub state in plain text"
