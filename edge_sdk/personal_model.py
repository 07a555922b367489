"""A device's personalised VLM: a frozen base, LoRA factors, and a strategy's split.

``PersonalVLM`` is what the edge client, the simulator and the examples use. It knows,
through its strategy, which factors may leave the device (``shared_update``) and which
stay (``personal_factors``), and absorbs a global state without ever touching the
personal factors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedvlm.edge.adapters import LoraSettings, adapter_state, attach_lora, load_adapter_state
from fedvlm.edge.base_delta import base_deltas, set_base_deltas
from fedvlm.edge.chat_format import ChatFormat
from fedvlm.edge.device_state import DeviceState
from fedvlm.edge.dual_adapter import REFERENCE_KEY, InstanceMixing
from fedvlm.edge.frozen_components import frozen_components
from fedvlm.edge.evaluation import EvalMetrics, LikelihoodScores, evaluate, generate_answers, likelihood_scores
from fedvlm.edge.model_loading import LoadedVLM, load_vlm
from fedvlm.edge.objectives import Objective, SftObjective
from fedvlm.edge.training import QAExample, TrainingConfig, TrainMetrics, encode_examples, train
from fedvlm.shared.lora_keys import FACTORS, factor_of, rank_axis
from fedvlm.shared.usage_error import UsageError
from fedvlm.shared.strategies import FedDPA, Strategy, build_strategy
from fedvlm.shared.strategies.fedex import BASE_DELTA_SUFFIX


def _split_state(state: Mapping[str, np.ndarray], extra_keys: frozenset[str]) -> tuple[dict, dict, dict]:
    """Separate LoRA factors, FedEx's dense base deltas (keyed ``<module><suffix>``) and the
    strategy's personal extras (FedDPA's reference)."""
    factors = {k: v for k, v in state.items() if factor_of(k) is not None}
    deltas = {k[: -len(BASE_DELTA_SUFFIX)]: v for k, v in state.items() if k.endswith(BASE_DELTA_SUFFIX)}
    extras = {k: v for k, v in state.items() if k in extra_keys}
    unknown = set(state) - set(factors) - {m + BASE_DELTA_SUFFIX for m in deltas} - set(extras)
    if unknown:
        raise KeyError(f"adapter state holds tensors that are neither LoRA factors, base deltas nor this strategy's "
                       f"personal state: {sorted(unknown)[:3]}")  # fmt: skip
    return factors, deltas, extras


class PersonalVLM:
    """A loaded VLM with pLoRA (or another strategy's) factors attached.

    ``lora`` is the federation's layout; ``rank`` this device's LoRA rank when the strategy
    lets devices differ in rank (``Strategy.heterogeneous_ranks``), at most ``lora.r``.
    """

    def __init__(self, loaded: LoadedVLM, lora: LoraSettings | None = None, strategy: Strategy | str = "plora",
                 rank: int | None = None):  # fmt: skip
        self.loaded = loaded
        self.lora = lora or LoraSettings()
        self.strategy = build_strategy(strategy, {}, self.lora) if isinstance(strategy, str) else strategy
        if rank is not None and rank != self.lora.r and not self.strategy.heterogeneous_ranks:
            raise UsageError(f"strategy {self.strategy.name!r} needs every device at the federation's LoRA rank "
                             f"r={self.lora.r}, not {rank}; only strategies for devices of different capability "
                             "(e.g. flexlora) take a device rank")  # fmt: skip
        if rank is not None and not 1 <= rank <= self.lora.r:
            raise UsageError(f"a device's LoRA rank must be between 1 and the federation's r={self.lora.r}, got {rank}")
        self.rank = rank or self.lora.r
        self.model = attach_lora(loaded.model, self.lora, frozen_factors=self.strategy.frozen_factors, rank=self.rank)
        # FedDPA weighs its global and personal adapters per input (fedvlm.edge.dual_adapter).
        self.mixing = InstanceMixing(
            self.model, global_rank=self.strategy.global_rank or self.rank // 2,
            max_personal_weight=self.strategy.max_personal_weight,
            training_personal_weight=self.strategy.training_personal_weight,
            global_phase_personal_weight=self.strategy.global_phase_personal_weight,
            weighting=self.strategy.weighting,
            reference_examples=self.strategy.reference_examples,
            representation=self.strategy.representation,
        ) if isinstance(self.strategy, FedDPA) else None  # fmt: skip
        self._extra_keys = frozenset({REFERENCE_KEY}) if self.mixing is not None else frozenset()
        self._initial_state = adapter_state(self.model)
        self.chat = ChatFormat.for_model(loaded.processor, self.model)
        self._encoded: tuple[Sequence[QAExample], str, list] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        *,
        lora: LoraSettings | None = None,
        strategy: Strategy | str = "plora",
        quantization: str = "auto",
        device: str | None = "auto",
        rank: int | None = None,
    ) -> "PersonalVLM":
        return cls(load_vlm(model_dir, quantization=quantization, device=device), lora, strategy, rank)

    @property
    def processor(self):
        return self.loaded.processor

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    # ---- what leaves the device and what stays -------------------------------------------------

    def adapter_state(self) -> dict[str, np.ndarray]:
        """Every LoRA factor, plus FedEx base deltas and the strategy's personal state when it has them."""
        state = self._lora_state()
        for module, delta in base_deltas(self.model).items():
            state[module + BASE_DELTA_SUFFIX] = delta
        return state

    def _lora_state(self) -> dict[str, np.ndarray]:
        """The factors and the strategy's personal state (what ``split`` divides), no base deltas."""
        state = adapter_state(self.model)
        if self.mixing is not None:
            state.update(self.mixing.state())
        return state

    def shared_update(self) -> dict[str, np.ndarray]:
        """The tensors this strategy lets leave the device (pLoRA: the B factors)."""
        shared, _ = self.strategy.split(self._lora_state())
        return shared

    def personal_factors(self) -> dict[str, np.ndarray]:
        """The tensors that never leave the device (pLoRA: the A factors)."""
        _, personal = self.strategy.split(self._lora_state())
        return personal

    def apply_global(self, global_state: Mapping[str, np.ndarray]) -> None:
        """Take the federation's global state; personal factors are left exactly as they are.

        Names, shapes and dtypes are validated first; a mismatch raises before anything changes.
        """
        self._load(self.strategy.absorb(self._lora_state(), dict(global_state)), replace_deltas=False)

    def load_personal(self, personal: Mapping[str, np.ndarray]) -> None:
        """Take back personal tensors (``personal_factors`` output), the shared ones as they are now."""
        shared, _ = self.strategy.split(self._lora_state())
        self._load(self.strategy.join(shared, personal), replace_deltas=False)

    @property
    def layout_hash(self) -> str:
        """The hash this device's updates carry: the federation's LoRA layout and strategy layout."""
        return self.strategy.layout_hash(self.lora)

    def reset_adapters(self) -> None:
        """Back to the federation's shared initialisation (fresh factors, no base delta, no personal state)."""
        self._load(self._initial_state, replace_deltas=True)

    def load_adapter_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Swap in a whole adapter (as returned by :meth:`adapter_state`)."""
        self._load(state, replace_deltas=True)

    def _load(self, state: Mapping[str, np.ndarray], *, replace_deltas: bool) -> None:
        """Load factors, base deltas and personal state. ``replace_deltas``: deltas the state
        lacks are zeroed (a whole adapter); otherwise only those it holds are set."""
        factors, deltas, extras = _split_state(state, self._extra_keys)
        load_adapter_state(self.model, factors)
        current = base_deltas(self.model) if replace_deltas else {}
        if deltas or current:
            set_base_deltas(self.model, {**{m: np.zeros_like(d) for m, d in current.items()}, **deltas})
        if self.mixing is not None and (replace_deltas or extras):
            self.mixing.load_state(extras)

    # ---- local work ------------------------------------------------------------------------------

    def encoded(self, examples: Sequence[QAExample], objective: Objective | None = None) -> list:
        """Examples encoded once, as ``objective`` (default SFT) trains on them: a device trains on
        the same data set every round, so the last data set's encoding is kept (holding the data
        set itself, so it is the same one)."""
        objective = objective or SftObjective()
        if self._encoded is None or self._encoded[0] is not examples or self._encoded[1] != objective.name:
            self._encoded = (examples, objective.name, encode_examples(self.processor, examples, self.model, objective))
        return self._encoded[2]

    def train(self, examples: Sequence[QAExample], config: TrainingConfig | None = None, **kwargs) -> TrainMetrics:
        """A round's local training, as the strategy has it (see :meth:`train_encoded`)."""
        config = config or TrainingConfig()
        return self.train_encoded(self.encoded(examples, config.objective), config, **kwargs)

    def train_encoded(self, encoded: Sequence, config: TrainingConfig, **kwargs) -> TrainMetrics:
        """Train every trainable factor on encoded examples for the round's ``config.steps``,
        less the steps the strategy keeps for refitting the personal factors once the round's
        global version arrives (:meth:`refit_personal`); the personal and shared factors at the
        strategy's learning-rate scales (``personal_lr_scale``, ``shared_lr_scale``), which take
        the place of any scale ``config.factor_lr_scales`` gives those factors."""
        steps = config.steps - self.strategy.refit_steps
        if steps < 1:
            raise UsageError(f"strategy {self.strategy.name!r} refits the personal factors for "
                             f"{self.strategy.refit_steps} of each round's {config.steps} local steps: give more "
                             "local steps, or fewer refit_steps")  # fmt: skip
        if self.mixing is not None:  # FedDPA-T: the global adapter, then the personal one
            return self.mixing.train_in_turn(self.processor, encoded, self._strategy_config(config, steps), **kwargs)
        return train(self.model, self.processor, encoded, self._strategy_config(config, steps), **kwargs)

    def refit_personal(self, encoded: Sequence, config: TrainingConfig, **kwargs) -> TrainMetrics | None:
        """The strategy's ``refit_steps`` of :meth:`train_personal` (None when it has none):
        pLoRA's A fits the global B just received."""
        if not self.strategy.refit_steps:
            return None
        return self.train_personal(encoded, dataclasses.replace(config, steps=self.strategy.refit_steps), **kwargs)

    def train_personal(self, encoded: Sequence, config: TrainingConfig, **kwargs) -> TrainMetrics:
        """Train the personal part alone for ``config.steps``, the shared part (whole factors or
        rank components) held as it is: a refit to a new global version, or a device that
        joins late adapting only what is its own."""
        def shared(key: str, rank: int) -> tuple[int, int]:
            return 0, self.strategy.shared_rank(key, rank)

        with frozen_components(self.model, shared), \
                (self.mixing.fixed_weights() if self.mixing is not None else contextlib.nullcontext()):
            metrics = train(self.model, self.processor, encoded, self._strategy_config(config, config.steps), **kwargs)
        if self.mixing is not None:  # a late joiner's first reference: else it is scored at the fixed weight
            self.mixing.refresh_reference(encoded, self.processor.tokenizer.pad_token_id)
        return metrics

    def has_trainable_personal_part(self) -> bool:
        """Whether :meth:`train_personal` has anything to train: some trainable factor (or rank
        components of one) the strategy keeps on the device. FedIT shares everything; FFA's
        personal A is frozen."""
        for name, parameter in self.model.named_parameters():
            key = name.replace(".default", "")
            axis = rank_axis(key)
            if axis is not None and parameter.requires_grad and \
                    self.strategy.shared_rank(key, parameter.shape[axis]) < parameter.shape[axis]:
                return True
        return False

    def _strategy_config(self, config: TrainingConfig, steps: int) -> TrainingConfig:
        scales = dict(config.factor_lr_scales)
        if self.strategy.personal_lr_scale != 1:
            personal = FACTORS - self.strategy.shared_factors
            scales.update({factor: self.strategy.personal_lr_scale for factor in personal})
        if self.strategy.shared_lr_scale != 1:
            scales.update({factor: self.strategy.shared_lr_scale for factor in self.strategy.shared_factors})
        return dataclasses.replace(config, steps=steps, factor_lr_scales=scales)

    def evaluate(self, examples: Sequence[QAExample], **kwargs) -> EvalMetrics:
        """Every score that applies to ``examples`` (:func:`fedvlm.edge.evaluation.evaluate`)."""
        return evaluate(self.model, self.processor, examples, **kwargs)

    def likelihood_scores(self, examples: Sequence[QAExample]) -> LikelihoodScores:
        """Answer log-probabilities now: the reference a later reward margin is measured against."""
        return likelihood_scores(self.model, self.processor, examples)

    def answer(self, image, question: str, *, max_new_tokens: int = 8) -> str:
        return generate_answers(self.model, self.processor, [image], [question], max_new_tokens=max_new_tokens,
                                chat=self.chat)[0]

    # ---- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """The full adapter (global + personal) in PEFT's format: ``PeftModel.from_pretrained`` loads it."""
        out = Path(out_dir)
        self.model.save_pretrained(out)
        return out

    def device_state(self, *, federation: str, client_id: str, round: int, global_version: int,
                     global_state: Mapping[str, np.ndarray], metrics: list[dict] | None = None) -> DeviceState:
        return DeviceState(
            federation=federation,
            client_id=client_id,
            strategy=self.strategy.name,
            strategy_options=dict(self.strategy.options()),
            base_fingerprint=self.fingerprint,
            lora=self.lora.to_dict(),
            round=round,
            global_version=global_version,
            personal=self.personal_factors(),
            global_state=dict(global_state),
            current_shared=self.shared_update(),
            metrics=list(metrics or []),
        )

    def restore(self, state: DeviceState) -> None:
        """Resume exactly where the device was: global state (validated, with base deltas),
        then the shared factors as the device last had them, then its personal factors."""
        if state.global_state:
            self.apply_global(state.global_state)
        shared = state.current_shared or self.shared_update()
        self._load(self.strategy.join(shared, state.personal), replace_deltas=False)
