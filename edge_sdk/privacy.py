"""Differential privacy on the device: clip the shared update, add Gaussian noise, count ε.

Before an update is signed, the change the device made to the factors that leave it
(their value after local training minus their value in the global version it trained
from; the shared initialisation before the first global version) is clipped to L2 norm ``clip`` over all shared tensors
together, and Gaussian noise of standard deviation ``noise_multiplier * clip`` is added
to every coordinate (the Gaussian mechanism of DP-FedAvg, McMahan et al., ICLR 2018).
The device then sends ``reference + clipped delta + noise``. Personal factors never leave
the device and are not touched.

Accounting: one noisy update is the Gaussian mechanism with sensitivity ``clip`` and noise
``noise_multiplier * clip``, whose Rényi DP at order α is α / (2σ²) (Mironov 2017); RDP adds
up over the updates a device sends, and converts to (ε, δ)-DP as
ε = min over α of RDP(α) + log(1/δ) / (α − 1). No subsampling amplification is claimed
(a device does not know how the hub samples).

What the guarantee covers: a device's whole local data set (user-level DP), with the
neighbouring case "this device's round changed the shared factors by up to ``clip``" vs
"it changed them by nothing", as in DP-FedAvg. Against a hub that compares two arbitrary
data sets of the same device (replace-one adjacency), the sensitivity is ``2 * clip``:
read the reported ε as that of noise multiplier ``noise_multiplier / 2``. The noise comes
from numpy's PCG64 seeded from the OS; it is not hardened against floating-point attacks
on the Gaussian sampler (Mironov 2012), which matters only against an adversary that sees
the exact bits of many updates and knows the reference exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedvlm.shared.durable_files import write_durably

from .errors import EdgeError

__all__ = [
    "DPConfig",
    "ClipReport",
    "PrivacySpent",
    "PrivacyLedger",
    "DEFAULT_ORDERS",
    "privatize_update",
    "gaussian_rdp",
    "epsilon_from_rdp",
    "gaussian_epsilon",
    "PrivacyConfigError",
    "UpdatePrivatizer",
]

# Rényi orders searched for the best conversion: fine steps where small ε lives, and large
# orders for many rounds at small noise (the usual grid of TF Privacy / Opacus, extended).
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                          + [64, 80, 96, 128, 192, 256, 384, 512, 1024])  # fmt: skip
LEDGER_FILE = "privacy_ledger.json"

log = logging.getLogger(__name__)


class PrivacyConfigError(EdgeError):
    """A differential-privacy setting is out of range."""


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Differential privacy of the shared update.

    Attributes:
        clip: C, the largest L2 norm of this round's change to the shared factors (all
            shared tensors together); larger changes are scaled down to it.
        noise_multiplier: σ; each coordinate gets Gaussian noise of standard deviation σ·C.
        delta: δ of the reported (ε, δ); use less than 1 / (number of devices).
        seed: seeds the noise for reproducible experiments; None (the default, and the only
            private choice) draws it from the operating system.
    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise PrivacyConfigError(f"the DP clip norm must be a positive number, got {self.clip!r}")
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):  # fmt: skip
            raise PrivacyConfigError(f"the DP noise multiplier must be a positive number, got "
                                     f"{self.noise_multiplier!r} (without noise there is no privacy guarantee)")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise PrivacyConfigError(f"the DP delta must be in (0, 1), got {self.delta!r}; e.g. 1e-5")

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip


@dataclasses.dataclass(frozen=True)
class ClipReport:
    """What clipping did to one update."""

    norm: float  # L2 norm of the change before clipping
    scale: float  # factor applied to the change (1.0: not clipped)

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0


def privatize_update(shared: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], config: DPConfig,
                     rng: np.random.Generator) -> tuple[dict[str, np.ndarray], ClipReport]:  # fmt: skip
    """``reference + clip(shared - reference) + N(0, (σC)²)``, tensor by tensor; inputs are not modified.

    ``reference`` holds the shared factors as they were before local training; a name it
    lacks counts as zero. The result keeps each tensor's name, shape and dtype.
    """
    names = sorted(shared)
    deltas = {}
    for name in names:
        value = np.asarray(shared[name], dtype=np.float64)
        base = reference.get(name)
        if base is not None and np.shape(base) != value.shape:
            raise ValueError(f"reference tensor {name} has shape {np.shape(base)}, the update {value.shape}")
        deltas[name] = value - (np.asarray(base, dtype=np.float64) if base is not None else 0.0)
    norm = math.sqrt(sum(float(np.sum(delta * delta)) for delta in deltas.values()))
    scale = min(1.0, config.clip / norm) if norm > 0 else 1.0
    noisy = {}
    for name in names:  # sorted: the same seed gives the same noise whatever the dict order
        base = reference.get(name)
        value = (np.asarray(base, dtype=np.float64) if base is not None else 0.0) + deltas[name] * scale
        value = value + rng.normal(0.0, config.noise_std, size=deltas[name].shape)
        noisy[name] = value.astype(np.asarray(shared[name]).dtype, copy=False)
    return noisy, ClipReport(norm=norm, scale=scale)


# ---------------------------------------------------------------------------- accounting
def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one Gaussian mechanism with noise multiplier σ at each order α: α / (2σ²)."""
    return np.asarray(orders, dtype=np.float64) / (2.0 * noise_multiplier**2)


def epsilon_from_rdp(rdp: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, best order): ε = min over α of rdp(α) + log(1/δ) / (α − 1)."""
    orders_array = np.asarray(orders, dtype=np.float64)
    if np.any(orders_array <= 1):
        raise ValueError("Rényi orders must be above 1")
    epsilons = np.asarray(rdp, dtype=np.float64) + math.log(1.0 / delta) / (orders_array - 1.0)
    best = int(np.argmin(epsilons))
    return float(epsilons[best]), float(orders_array[best])


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float,
                     orders: Sequence[float] = DEFAULT_ORDERS) -> float:  # fmt: skip
    """ε after ``releases`` Gaussian mechanisms of noise multiplier σ, at δ."""
    return epsilon_from_rdp(releases * gaussian_rdp(noise_multiplier, orders), orders, delta)[0]


# PrivacySpent fields computed from the device's data: never sent with the update.
_DATA_DEPENDENT = frozenset({"clip_norm_before", "clipped"})


@dataclasses.dataclass(frozen=True)
class PrivacySpent:
    """(ε, δ) of this round's update alone and of every update this device has sent."""

    round: int
    epsilon_round: float
    epsilon_total: float
    delta: float
    releases: int
    clip: float
    noise_multiplier: float
    clip_norm_before: float
    clipped: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict:
        """What may travel with the noised update: the accounting, nothing computed from the
        data (the pre-clip norm and whether it was clipped are, so they stay on the device)."""
        return {key: value for key, value in self.to_dict().items() if key not in _DATA_DEPENDENT}


class PrivacyLedger:
    """Every noisy update this device released, kept in its state dir so ε adds up across restarts.

    One entry per update produced (a re-send of the same bytes is not a new release; a
    retrained update for the same round is). RDP composes by addition, so entries with
    different σ add up exactly.
    """

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.entries: list[dict] = []
        if self.path.exists():
            try:
                self.entries = list(json.loads(self.path.read_text())["releases"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                # Losing the ledger would under-report ε: refuse rather than start from zero.
                raise PrivacyConfigError(f"the privacy ledger {self.path} is unreadable ({error}); restore it "
                                         "from a backup: starting again from zero would under-report ε") from None

    def record(self, round_number: int, config: DPConfig, clip: ClipReport) -> PrivacySpent:
        """Add one release (written durably before the update leaves) and return the spend."""
        self.entries.append({"round": round_number, "noise_multiplier": config.noise_multiplier,
                             "clip": config.clip})  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(self.path, json.dumps({"releases": self.entries}, indent=1).encode("utf-8"))
        total_rdp = sum(gaussian_rdp(entry["noise_multiplier"]) for entry in self.entries)
        return PrivacySpent(
            round=round_number,
            epsilon_round=gaussian_epsilon(config.noise_multiplier, 1, config.delta),
            epsilon_total=epsilon_from_rdp(total_rdp, DEFAULT_ORDERS, config.delta)[0],
            delta=config.delta, releases=len(self.entries), clip=config.clip,
            noise_multiplier=config.noise_multiplier, clip_norm_before=clip.norm, clipped=clip.clipped,
        )  # fmt: skip


class UpdatePrivatizer:
    """What the edge client calls: remember the shared factors before training, then privatize."""

    def __init__(self, config: DPConfig, state_dir: str | os.PathLike) -> None:
        self.config = config
        self.ledger = PrivacyLedger(state_dir)
        self._rng = np.random.default_rng(config.seed)
        self._reference: dict[str, np.ndarray] | None = None
        self.last_spent: PrivacySpent | None = None

    def before_training(self, reference: Mapping[str, np.ndarray]) -> None:
        """Record what the change is measured from: the shared factors of the global version
        the device trains from (the shared initialisation before the first global)."""
        self._reference = {name: np.array(value, copy=True) for name, value in reference.items()}

    def privatize(self, shared: Mapping[str, np.ndarray], round_number: int) -> dict[str, np.ndarray]:
        if self._reference is None:
            raise RuntimeError("before_training() must record the shared factors before the update is privatized")
        noisy, clip = privatize_update(shared, self._reference, self.config, self._rng)
        self.last_spent = spent = self.ledger.record(round_number, self.config, clip)
        log.info("round %d: shared update clipped to %.4g (its change had norm %.4g) and noised (sigma %.3g): "
                 "epsilon %.3f this round, %.3f over %d update(s), delta %g", round_number, self.config.clip,
                 clip.norm, self.config.noise_multiplier, spent.epsilon_round, spent.epsilon_total, spent.releases,
                 self.config.delta)  # fmt: skip
        self._reference = None  # one release per training run
        return noisy
