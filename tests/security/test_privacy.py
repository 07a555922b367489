"""Differential privacy on the device: clipping, noise scale, personal factors, accountant."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedvlm.edge.privacy import (
    DEFAULT_ORDERS,
    DPConfig,
    PrivacyConfigError,
    PrivacyLedger,
    UpdatePrivatizer,
    epsilon_from_rdp,
    gaussian_epsilon,
    gaussian_rdp,
    privatize_update,
)


def _update(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}.lora_B.weight": (scale * rng.standard_normal((16, 4))).astype(np.float32) for i in range(3)}


def _norm(tensors) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(t, np.float64) ** 2)) for t in tensors.values()))


def test_noise_standard_deviation_is_sigma_times_clip():
    config = DPConfig(clip=0.5, noise_multiplier=1.3, seed=1)
    reference = _update(0)
    rng = np.random.default_rng(config.seed)
    # No change from the reference: what comes out minus the reference is pure noise.
    draws = [privatize_update(reference, reference, config, rng)[0] for _ in range(400)]
    noise = np.concatenate([np.concatenate([(d[k].astype(np.float64) - reference[k]).ravel() for k in reference])
                            for d in draws])  # fmt: skip
    assert noise.size == 400 * 3 * 64
    # 76 800 draws: the sample std is within 1 % of sigma*C (its standard error is 0.26 %).
    assert noise.std() == pytest.approx(config.noise_std, rel=0.01)
    assert abs(noise.mean()) < 4 * config.noise_std / math.sqrt(noise.size)
    # Independent across coordinates and draws: neighbouring samples are uncorrelated.
    assert abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]) < 0.02


def test_a_large_change_is_clipped_to_the_bound_and_a_small_one_kept():
    reference = _update(0)
    config = DPConfig(clip=1.0, noise_multiplier=1e-9, seed=2)  # noise negligible: see the clipping alone
    rng = np.random.default_rng(0)
    big = {k: v + 10 * _update(1)[k] for k, v in reference.items()}
    out, report = privatize_update(big, reference, config, rng)
    change = {k: out[k].astype(np.float64) - reference[k] for k in reference}
    assert report.clipped and report.norm > 10
    assert _norm(change) == pytest.approx(1.0, rel=1e-5)
    # Clipping scales, it does not change the direction.
    direction = {k: big[k].astype(np.float64) - reference[k] for k in reference}
    cosine = sum(float(np.sum(change[k] * direction[k])) for k in reference) / (_norm(change) * _norm(direction))
    assert cosine == pytest.approx(1.0, abs=1e-6)
    small = {k: v + 1e-3 * _update(3)[k] for k, v in reference.items()}
    out, report = privatize_update(small, reference, config, rng)
    assert not report.clipped and report.scale == 1.0
    for key in reference:
        np.testing.assert_allclose(out[key], small[key], atol=1e-6)
        assert out[key].dtype == np.float32 and out[key].shape == small[key].shape


def test_inputs_are_never_modified():
    shared, reference = _update(5), _update(6)
    shared_copy = {k: v.copy() for k, v in shared.items()}
    reference_copy = {k: v.copy() for k, v in reference.items()}
    privatize_update(shared, reference, DPConfig(clip=0.1, noise_multiplier=1.0), np.random.default_rng())
    for key in shared:
        assert np.array_equal(shared[key], shared_copy[key]) and np.array_equal(reference[key], reference_copy[key])


def test_personal_factors_are_untouched_bit_for_bit(tiny_model_dir, colour_examples, tmp_path):
    from fedvlm.edge.adapters import LoraSettings
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.edge.training import TrainingConfig
    from fedvlm.shared.lora_keys import factor_of

    model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=8), strategy="plora",
                                        quantization="none", device="cpu")  # fmt: skip
    privatizer = UpdatePrivatizer(DPConfig(clip=0.05, noise_multiplier=0.8, seed=3), tmp_path)
    privatizer.before_training(model.shared_update())
    model.train(colour_examples, TrainingConfig(steps=3, learning_rate=1e-2, progress=False))
    everything_after_training = model.adapter_state()
    trained_shared = model.shared_update()

    noisy = privatizer.privatize(trained_shared, round_number=1)

    # Only the shared factors (lora_B) come out, each noised; lora_A is not in the update at all.
    assert set(noisy) == set(trained_shared) and {factor_of(k) for k in noisy} == {"B"}
    assert all(not np.array_equal(noisy[k], trained_shared[k]) for k in noisy)
    # The model on the device, personal A and trained B alike, is exactly as training left it.
    after = model.adapter_state()
    assert set(after) == set(everything_after_training)
    for key, value in everything_after_training.items():
        assert after[key].tobytes() == value.tobytes(), key
    assert any(factor_of(k) == "A" for k in after)


def test_a_retried_round_still_sends_at_most_clip_away_from_the_global(tiny_model_dir, colour_examples, tmp_path):
    """The change is measured from the global version, not from the factors before this
    training run: after a retried round those already hold an earlier, unclipped run."""
    from fedvlm.edge.adapters import LoraSettings
    from fedvlm.edge.edge_client import EdgeClient
    from fedvlm.edge.training import TrainingConfig
    from fedvlm.shared.protocol import HubState, Presence, RoundPhase

    clip = 1e-4
    client = EdgeClient(tiny_model_dir, colour_examples, "mqtt://127.0.0.1:1", "fed", "c", "s" * 43, tmp_path,
                        quantization="none", device="cpu",
                        privacy=DPConfig(clip=clip, noise_multiplier=1e-3, seed=4))  # fmt: skip
    client.hub_state = HubState(federation="fed", status=Presence.ONLINE, round=1, phase=RoundPhase.COLLECTING,
                                global_version=0, selected_count=1,
                                round_config={"strategy": "plora", "lora": LoraSettings(r=4, alpha=8).to_dict()})
    client._ensure_model()
    initial = client.model.shared_update()
    for _attempt in range(2):  # round 1 retried: the device trains again from where it was
        client.privacy.before_training(client._dp_reference())
        client.model.train(colour_examples, TrainingConfig(steps=3, learning_rate=1e-2, progress=False))
        sent = client.privacy.privatize(client.model.shared_update(), 1)
    trained = {k: v.astype(np.float64) - initial[k] for k, v in client.model.shared_update().items()}
    assert _norm(trained) > 10 * clip  # training moved B far beyond the bound...
    assert _norm({k: v.astype(np.float64) - initial[k] for k, v in sent.items()}) < 1.2 * clip  # ...what left did not
    assert client.privacy.last_spent.releases == 2  # each retrained update is a release of its own
    # Once a global version is held, it is the reference.
    client.state.global_version = 1
    client.state.global_state = {k: v + 1.0 for k, v in initial.items()}
    assert all(np.array_equal(client._dp_reference()[k], initial[k] + 1.0) for k in initial)


def test_accountant_matches_the_closed_form_of_the_gaussian_mechanism():
    # For the Gaussian mechanism ε(α) = T·α/(2σ²) + log(1/δ)/(α−1); over real α > 1 the
    # minimum is a + 2·sqrt(a·L) with a = T/(2σ²), L = log(1/δ). A dense grid gets close.
    orders = np.linspace(1.001, 400, 400_000)
    for sigma, rounds, delta in [(1.0, 1, 1e-5), (1.1, 10, 1e-5), (4.0, 100, 1e-6), (0.8, 3, 1e-3)]:
        a, log_inverse_delta = rounds / (2 * sigma**2), math.log(1 / delta)
        closed_form = a + 2 * math.sqrt(a * log_inverse_delta)
        assert gaussian_epsilon(sigma, rounds, delta, orders) == pytest.approx(closed_form, rel=1e-4)
        # The default grid of orders is within 1 % of the exact optimum in this range.
        assert gaussian_epsilon(sigma, rounds, delta) == pytest.approx(closed_form, rel=0.01)
    # Known values: sigma 1, one release, delta 1e-5 -> 5.298; RDP of order 2 is 1/sigma^2.
    assert gaussian_epsilon(1.0, 1, 1e-5, orders) == pytest.approx(5.2978, abs=1e-3)
    assert gaussian_rdp(2.0, [2.0, 10.0]).tolist() == [0.25, 1.25]


def test_composition_adds_up_and_more_noise_costs_less():
    # T releases at sigma are exactly one release at sigma/sqrt(T) (RDP is linear in 1/sigma^2).
    assert gaussian_epsilon(2.0, 16, 1e-5) == pytest.approx(gaussian_epsilon(0.5, 1, 1e-5), rel=1e-12)
    epsilons = [gaussian_epsilon(sigma, 10, 1e-5) for sigma in (0.5, 1.0, 2.0, 4.0)]
    assert epsilons == sorted(epsilons, reverse=True)
    assert gaussian_epsilon(1.0, 20, 1e-5) > gaussian_epsilon(1.0, 10, 1e-5)
    rdp = gaussian_rdp(1.0) * 3
    assert epsilon_from_rdp(rdp, DEFAULT_ORDERS, 1e-5)[0] == pytest.approx(gaussian_epsilon(1.0, 3, 1e-5))


def test_ledger_reports_each_round_and_the_total_across_restarts(tmp_path):
    config = DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-5)
    clip = privatize_update(_update(0), _update(0), config, np.random.default_rng(0))[1]
    first = PrivacyLedger(tmp_path).record(1, config, clip)
    assert first.epsilon_round == pytest.approx(first.epsilon_total) == pytest.approx(gaussian_epsilon(1.0, 1, 1e-5))
    # A restarted device reads its ledger back: ε keeps adding up.
    second = PrivacyLedger(tmp_path).record(2, config, clip)
    third = PrivacyLedger(tmp_path).record(3, DPConfig(clip=1.0, noise_multiplier=2.0), clip)
    assert second.epsilon_total == pytest.approx(gaussian_epsilon(1.0, 2, 1e-5))
    assert third.releases == 3 and third.epsilon_round == pytest.approx(gaussian_epsilon(2.0, 1, 1e-5))
    # Mixed noise levels compose in RDP: 2/(2·1²) + 1/(2·2²) per order.
    mixed = epsilon_from_rdp(2 * gaussian_rdp(1.0) + gaussian_rdp(2.0), DEFAULT_ORDERS, 1e-5)[0]
    assert third.epsilon_total == pytest.approx(mixed)
    ledger = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert [entry["round"] for entry in ledger["releases"]] == [1, 2, 3]
    # A damaged ledger is refused, never silently reset to zero.
    (tmp_path / "privacy_ledger.json").write_text("{not json")
    with pytest.raises(PrivacyConfigError, match="under-report"):
        PrivacyLedger(tmp_path)


@pytest.mark.parametrize("settings, message", [
    ({"clip": 0.0, "noise_multiplier": 1.0}, "clip norm must be a positive"),
    ({"clip": 1.0, "noise_multiplier": 0.0}, "no privacy guarantee"),
    ({"clip": 1.0, "noise_multiplier": float("nan")}, "noise multiplier"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta must be in"),
])  # fmt: skip
def test_bad_settings_are_refused_with_what_to_do(settings, message):
    with pytest.raises(PrivacyConfigError, match=message):
        DPConfig(**settings)


def test_join_refuses_half_a_dp_configuration(tmp_path, capsys):
    from fedvlm.edge.cli import main

    (tmp_path / "s").write_text("x" * 43)
    code = main(["join", "--hub", "mqtt://127.0.0.1:1", "--federation", "f", "--client-id", "c", "--secret-file",
                 str(tmp_path / "s"), "--model", str(tmp_path), "--data", str(tmp_path / "missing.parquet"),
                 "--state-dir", str(tmp_path / "st"), "--dp-clip", "1.0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "needs both --dp-clip and --dp-noise-multiplier" in err
