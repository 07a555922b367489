"""A whole federation in separate processes over a real broker, checked from the wire.

A hub (`fedvlm-hub start`) and three devices (`fedvlm-edge join`) run as processes; a
subscriber on the whole topic tree captures every byte. From the capture alone we check
that each published global B is the sample-weighted mean of that round's B's, and that no
tensor a device must keep ever crossed the broker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedvlm.edge.device_state import load_state
from fedvlm.hub.cli import main as hub_main
from fedvlm.shared import tensor_codec
from fedvlm.shared.lora_config import module_part
from fedvlm.shared.lora_keys import factor_of
from fedvlm.shared.mqtt_link import MqttLink
from fedvlm.shared.protocol import Reassembler, TopicKind, open_envelope, parse_topic
from tests.brokers import LOOPBACK, MosquittoProcess, free_port, wait_for_port

FEDERATION = "e2e"
CLIENTS = ("dev-a", "dev-b", "dev-c")
TWO = CLIENTS[:2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def client_data(tmp_path_factory):
    """Three clients' RLAIF-V parquet files at the tiny model's image size (different sizes)."""
    from fedvlm.edge.data import ScenarioConfig, generate_federation

    out = tmp_path_factory.mktemp("data")
    config = ScenarioConfig.preset("concept-shift", n_clients=3, examples_per_client=12,
                                   test_examples_per_client=6, image_size=32, seed=1)
    federation = generate_federation(config)
    # Unequal sample counts, so a plain mean and a weighted mean differ.
    federation.clients[0].train = federation.clients[0].train[:6]
    federation.write(out)
    return out


@dataclasses.dataclass
class Capture:
    """Every message on fedvlm/v1/#, reassembled per (kind, sender, message id)."""

    updates: list = dataclasses.field(default_factory=list)  # (client, round, metadata, tensors)
    globals: dict = dataclasses.field(default_factory=dict)  # version -> tensors
    envelope_sha256: dict = dataclasses.field(default_factory=dict)  # (client, round) -> sha256 hex
    global_sha256: dict = dataclasses.field(default_factory=dict)  # version -> sha256 hex
    raw_bytes: int = 0
    device_outputs: dict = dataclasses.field(default_factory=dict)  # client -> its stdout and stderr

    def __post_init__(self) -> None:
        self._reassembler = Reassembler(timeout_s=300)
        self._lock = threading.Lock()
        self._payloads: list[tuple[TopicKind, str, bytes]] = []

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        parsed = parse_topic(topic)
        with self._lock:
            self.raw_bytes += len(payload)
            if parsed.kind in (TopicKind.UPDATE, TopicKind.GLOBAL_CHUNK):
                sender = parsed.client_id if parsed.kind is TopicKind.UPDATE else f"global-{parsed.version}"
                done = self._reassembler.feed(payload, sender=sender)
                if done is not None:
                    self._payloads.append((parsed.kind, sender, done.payload))

    def decode(self, secrets: dict[str, str]) -> None:
        for kind, sender, payload in self._payloads:
            if kind is TopicKind.UPDATE:
                envelope = open_envelope(payload, secrets.get)
                tensors, metadata = tensor_codec.decode(envelope.body)
                self.updates.append((envelope.client_id, envelope.metadata.round, envelope.metadata, tensors))
                self.envelope_sha256[(envelope.client_id, envelope.metadata.round)] = tensor_codec.sha256_hex(payload)
            else:
                tensors, metadata = tensor_codec.decode(payload)
                self.globals[int(metadata["version"])] = tensors
                self.global_sha256[int(metadata["version"])] = tensor_codec.sha256_hex(payload)


def _federate(tmp_path: Path, model_dir: Path, data_dir: Path, strategy: str, rounds: int, broker_kind: str,
              hub_extra: tuple[str, ...] = (), clients: tuple[str, ...] = CLIENTS):
    """``clients``: each device is a process that imports torch (~8 s of CPU), so tests about what
    one device sends run two; the weighted-mean tests run three with unequal sample counts."""
    hub_dir = tmp_path / "hub"
    secrets = {}
    for name in clients:
        # `fedvlm-hub clients add` in this process: the same command, without an interpreter start-up each.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert hub_main(["clients", "add", name, "--state-dir", str(hub_dir)]) == 0
        secrets[name] = printed.getvalue().strip().splitlines()[-1]
        (tmp_path / f"{name}.secret").write_text(secrets[name])

    mosquitto = None
    port = free_port()
    hub_args = [str(BIN / "fedvlm-hub"), "start", "--state-dir", str(hub_dir), "--federation", FEDERATION,
                "--strategy", strategy, "--rounds", str(rounds), "--min-clients", str(len(clients)),
                "--round-timeout", "120", "--lora-rank", "4", "--lora-alpha", "8", "--local-steps", "3", "--linger", "3",
                *hub_extra]  # fmt: skip
    if broker_kind == "mosquitto":
        mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
        port = mosquitto.port
        hub_args += ["--broker", f"mqtt://{LOOPBACK}:{port}"]
        protocol = "5"
    else:
        hub_args += ["--port", str(port)]
        protocol = "3.1.1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    hub = subprocess.Popen(hub_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_port(LOOPBACK, port, timeout=30)
        capture = Capture()
        link = MqttLink(mosquitto.broker.address if mosquitto else _address(port), "e2e-capture", protocol=protocol)
        link.connect()
        link.subscribe("fedvlm/v1/#", capture.on_message)
        devices = [
            subprocess.Popen(
                [str(BIN / "fedvlm-edge"), "join", "--hub", f"mqtt://{LOOPBACK}:{port}", "--federation", FEDERATION,
                 "--client-id", name, "--secret-file", str(tmp_path / f"{name}.secret"), "--model", str(model_dir),
                 "--data", str(data_dir / f"client_{i:02d}.parquet"),
                 "--eval-data", str(data_dir / f"client_{i:02d}_test.parquet"),
                 "--state-dir", str(tmp_path / "devices" / name), "--quantization", "nf4", "--lr", "1e-2",
                 "--mqtt-version", protocol, "--quiet", "--timeout", "240"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for i, name in enumerate(clients)
        ]
        outputs = [device.communicate(timeout=300)[0] for device in devices]
        hub_output = hub.communicate(timeout=120)[0]
        link.close()
    finally:
        if hub.poll() is None:
            hub.kill()
        if mosquitto:
            mosquitto.stop()
    for name, device, output in zip(clients, devices, outputs):
        assert device.returncode == 0, f"{name} failed:\n{output[-3000:]}"
        assert "Loading weights" not in output and "it/s" not in output, f"--quiet {name} drew bars:\n{output}"
    assert hub.returncode == 0, hub_output[-3000:]
    capture.decode(secrets)
    capture.device_outputs = dict(zip(clients, outputs))
    return capture, hub_dir, secrets


def _address(port):
    from fedvlm.shared.mqtt_link import BrokerAddress

    return BrokerAddress(LOOPBACK, port)


# Over mosquitto the hub announces DPO; devices (started without --objective) follow it, train
# chosen against rejected, and the wire carries the same thing as under supervised training.
# (One federation for both: each costs ~15 s of device processes.)
DPO = ("--objective", "dpo", "--dpo-beta", "0.5")


@pytest.mark.parametrize("broker_kind, hub_extra", [("embedded", ()), ("mosquitto", DPO)],
                         ids=["embedded", "mosquitto-dpo"])
def test_plora_federation_over_a_real_broker(tmp_path, tiny_model_dir, client_data, broker_kind, hub_extra):
    rounds = 3
    capture, hub_dir, _ = _federate(tmp_path, tiny_model_dir, client_data, "plora", rounds, broker_kind, hub_extra)
    objective = "dpo" if hub_extra == DPO else "sft"
    for name, output in capture.device_outputs.items():
        lines = [json.loads(text) for text in output.splitlines() if text.startswith('{"round"')]
        assert [line["round"] for line in lines] == list(range(1, rounds + 1)), output[-2000:]
        for line in lines:
            assert line["objective"] == objective and line["accepted"], output[-2000:]
        if objective == "dpo":
            # Held-out scores of preference data: preference accuracy and the margin against the round's start.
            eval_scores = lines[-1]["eval"]
            assert 0 <= eval_scores["preference_accuracy"] <= 1 and "reward_margin" in eval_scores

    by_round = defaultdict(list)
    for client, round_number, metadata, tensors in capture.updates:
        by_round[round_number].append((metadata.sample_count, tensors))
        # Privacy: only B factors ever crossed the broker.
        assert tensors and all(factor_of(k) == "B" for k in tensors), sorted(tensors)[:3]
    assert sorted(by_round) == list(range(1, rounds + 1))
    assert all(len(updates) == 3 for updates in by_round.values())
    for global_tensors in capture.globals.values():
        assert all(factor_of(k) == "B" for k in global_tensors)

    # Each published global is the sample-weighted mean of that round's updates.
    assert sorted(capture.globals) == list(range(1, rounds + 1))
    for version, global_tensors in capture.globals.items():
        updates = by_round[version]
        total = sum(weight for weight, _ in updates)
        for key, value in global_tensors.items():
            expected = sum(weight * tensors[key].astype(np.float64) for weight, tensors in updates) / total
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)

    # The hub's checkpoints hold exactly what it published.
    for version, global_tensors in capture.globals.items():
        stored = load_file(str(hub_dir / "globals" / f"v{version:06d}.safetensors"))
        assert set(stored) == set(global_tensors)
        assert all(np.array_equal(stored[k], global_tensors[k]) for k in stored)

    # The hub's SQLite records exactly the updates and versions that crossed the broker.
    import sqlite3

    with sqlite3.connect(hub_dir / "hub.sqlite3") as db:
        receipts = {(client, round_number): (sha, samples) for client, round_number, sha, samples in
                    db.execute("SELECT client_id, round, payload_sha256, sample_count FROM receipts")}
        versions = {version: (sha, published) for version, sha, published in
                    db.execute("SELECT version, sha256, published FROM global_versions")}
    assert set(receipts) == set(capture.envelope_sha256)
    for client, round_number, metadata, _ in capture.updates:
        assert receipts[(client, round_number)] == (capture.envelope_sha256[(client, round_number)],
                                                    metadata.sample_count)
    assert versions == {v: (sha, 1) for v, sha in capture.global_sha256.items()}

    # Every device kept its own A, and they differ; each holds the last global B.
    states = {name: load_state(tmp_path / "devices" / name) for name in CLIENTS}
    assert all(state.round == rounds and state.global_version == rounds for state in states.values())
    a_keys = sorted(states[CLIENTS[0]].personal)
    assert a_keys and all(factor_of(k) == "A" for k in a_keys)
    for first, second in [(0, 1), (0, 2), (1, 2)]:
        a, b = states[CLIENTS[first]].personal, states[CLIENTS[second]].personal
        assert any(not np.allclose(a[k], b[k]) for k in a_keys)
    for state in states.values():
        assert all(np.array_equal(state.global_state[k], capture.globals[rounds][k]) for k in state.global_state)


@pytest.mark.parametrize("strategy, allowed", [("fedsa", {"A"}), ("local", set())])
def test_what_stays_on_the_device_never_crosses_the_broker(tmp_path, tiny_model_dir, client_data, strategy, allowed):
    capture, _, _ = _federate(tmp_path, tiny_model_dir, client_data, strategy, 1, "embedded", clients=TWO)
    assert len(capture.updates) == 2
    for _, _, _, tensors in capture.updates:
        assert {factor_of(k) for k in tensors} == allowed
    for tensors in capture.globals.values():
        assert {factor_of(k) for k in tensors} <= allowed


@pytest.mark.parametrize("arch", ["smolvlm", "qwen2_5_vl", "gemma3"])
def test_real_families_send_only_their_b_factors(tmp_path, client_data, arch):
    """The same federation on other families' tiny models: each device's update holds exactly
    the B factors of its family's language-model layers, and its A's stay behind."""
    from fedvlm.edge.tiny_model import make_tiny_model

    model_dir = make_tiny_model(tmp_path / arch, "tiny", arch=arch)
    capture, _, _ = _federate(tmp_path, model_dir, client_data, "plora", 1, "embedded", clients=TWO)
    assert len(capture.updates) == 2
    expected_modules = None
    for _, _, _, tensors in capture.updates:
        assert tensors and all(factor_of(k) == "B" for k in tensors), sorted(tensors)[:3]
        modules = {k.split(".lora_B")[0] for k in tensors}
        assert all(module_part(m) == "language" for m in modules)
        assert expected_modules in (None, modules)
        expected_modules = modules
    # Attention and MLP projections of every decoder layer (2 layers x 7 in the tiny models).
    assert len(expected_modules) == 14
    states = {name: load_state(tmp_path / "devices" / name) for name in TWO}
    for state in states.values():
        assert state.personal and all(factor_of(k) == "A" for k in state.personal)
        assert {k.split(".lora_A")[0] for k in state.personal} == expected_modules
