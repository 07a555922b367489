"""Strategies beyond pLoRA over a real broker: a hub and devices (in threads of this process,
the same code `fedvlm-hub start` and `fedvlm-edge join` run), with a subscriber on the whole
topic tree checking from the captured bytes alone that only each strategy's shared part
travels and that the hub aggregated what travelled.
"""

from __future__ import annotations

import numpy as np

from fedvlm.edge.device_state import load_state
from fedvlm.edge.dual_adapter import REFERENCE_KEY
from fedvlm.hub.clients import register_client
from fedvlm.shared.lora_config import LoraSettings, module_part
from fedvlm.shared.lora_keys import factor_of, module_of, pair_by_module, rank_axis
from fedvlm.shared.mqtt_link import MqttLink
from tests.brokers import MosquittoProcess
from tests.test_edge_client import _client, _hub, _run_to_the_end
from tests.test_federation_e2e import Capture

DEVICES = ("a", "b")


def federate(tmp_path, model_dir, federation, strategy, *, options=None, ranks=(None, None), **hub_settings):
    """One round of ``strategy`` with two devices; returns the capture and the devices."""
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    try:
        secrets = {name: register_client(tmp_path / "hub", name) for name in DEVICES}
        capture = Capture()
        link = MqttLink(mosquitto.broker.address, "capture", protocol="5")
        link.connect()
        link.subscribe("fedvlm/v1/#", capture.on_message)
        hub = _hub(tmp_path, mosquitto.broker, rounds=1, min_clients=2, strategy=strategy,
                   strategy_options=options or {}, **hub_settings)
        devices = [_client(tmp_path, model_dir, "fed", name, secrets[name], mosquitto.broker,
                           federation.clients[index]) for index, name in enumerate(DEVICES)]
        for device, rank in zip(devices, ranks):
            device.lora_rank = rank
        _run_to_the_end(devices, hub)
        link.close()
    finally:
        mosquitto.stop()
    capture.decode(secrets)
    assert len(capture.updates) == 2 and len(capture.globals) == 1
    return capture, devices


def test_flexlora_devices_of_rank_1_and_4_get_their_share_of_the_exact_mean(tmp_path, tiny_model_dir, tiny_federation):
    capture, devices = federate(tmp_path, tiny_model_dir, tiny_federation, "flexlora", ranks=(1, None))
    ranks = {client: {t.shape[0] for k, t in tensors.items() if factor_of(k) == "A"}
             for client, _, _, tensors in capture.updates}
    assert ranks == {"a": {1}, "b": {4}}  # each device sent its factors at its own rank, and nothing else
    (published,) = capture.globals.values()
    total = sum(metadata.sample_count for _, _, metadata, _ in capture.updates)
    for module, (a_key, b_key) in pair_by_module(published).items():
        assert published[a_key].shape[0] == 4
        mean = sum(metadata.sample_count * tensors[b_key].astype(np.float64) @ tensors[a_key].astype(np.float64)
                   for _, _, metadata, tensors in capture.updates) / total  # fmt: skip
        u, singular, vt = np.linalg.svd(mean)
        for device, rank in zip(devices, (1, 4)):
            state = load_state(tmp_path / "devices" / device.client_id)
            own = state.current_shared
            assert own[a_key].shape == (rank, published[a_key].shape[1])
            np.testing.assert_allclose(own[b_key] @ own[a_key], (u[:, :rank] * singular[:rank]) @ vt[:rank],
                                       atol=1e-5)


def test_feddpa_sends_the_global_adapter_and_keeps_the_personal_one_and_its_reference(tmp_path, tiny_model_dir,
                                                                                      tiny_federation):
    """feddpa (r=4, global_rank=1): A[:1] and B[:, :1] travel; the personal adapter and the
    reference of the device's training prompts stay, and each device weighs inputs by it."""
    capture, devices = federate(tmp_path, tiny_model_dir, tiny_federation, "feddpa", options={"global_rank": 1})
    sent = [tensors for _, _, _, tensors in capture.updates] + list(capture.globals.values())
    for tensors in sent:
        assert {factor_of(k) for k in tensors} == {"A", "B"}
        assert all(value.shape[rank_axis(key)] == 1 for key, value in tensors.items())
    for device in devices:
        state = load_state(tmp_path / "devices" / device.client_id)
        assert REFERENCE_KEY in state.personal and state.personal[REFERENCE_KEY].ndim == 1
        assert all(value.shape[rank_axis(key)] == 3 for key, value in state.personal.items() if factor_of(key))
        assert device.model.mixing.last_weights is not None  # its evaluation weighed each input


def test_a_rank_split_sends_only_its_shared_rank_components(tmp_path, tiny_model_dir, tiny_federation):
    """rank-split (r=4, shared_rank=1): the first component of A and B travels, the other three never do."""
    capture, devices = federate(tmp_path, tiny_model_dir, tiny_federation, "rank-split", options={"shared_rank": 1})
    (published,) = capture.globals.values()
    for tensors in [tensors for _, _, _, tensors in capture.updates] + [published]:
        assert {factor_of(k) for k in tensors} == {"A", "B"}
        assert all(value.shape[rank_axis(key)] == 1 for key, value in tensors.items())
    total = sum(metadata.sample_count for _, _, metadata, _ in capture.updates)
    for key, value in published.items():  # the hub's mean is of what travelled
        expected = sum(m.sample_count * t[key].astype(np.float64) for _, _, m, t in capture.updates) / total
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
    # Each device kept its three personal components, and they differ between devices.
    first, second = (load_state(tmp_path / "devices" / device.client_id).personal for device in devices)
    assert all(value.shape[rank_axis(key)] == 3 for key, value in first.items())
    assert any(not np.allclose(first[key], second[key]) for key in first if factor_of(key) == "B")


def test_vision_shared_sends_the_vision_side_and_keeps_the_language_side(tmp_path, tiny_model_dir, tiny_federation):
    """vision-shared with LoRA on all three parts: only vision-tower and projector factors travel."""
    lora = LoraSettings(r=4, alpha=8, parts=("language", "vision", "projector"))
    capture, devices = federate(tmp_path, tiny_model_dir, tiny_federation, "vision-shared", lora=lora)
    (published,) = capture.globals.values()
    for tensors in [tensors for _, _, _, tensors in capture.updates] + [published]:
        assert {module_part(module_of(key)) for key in tensors} == {"vision", "projector"}
        assert {factor_of(key) for key in tensors} == {"A", "B"}
    for device in devices:
        personal = load_state(tmp_path / "devices" / device.client_id).personal
        assert personal and {module_part(module_of(key)) for key in personal} == {"language"}
