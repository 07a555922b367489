"""FedDPA on a device: a global and a personal adapter, mixed per input.

Both adapters live in one PEFT LoRA adapter of rank r: its first ``global_rank`` rank
components are the global adapter (federated), the rest the personal one. A pre-hook on
every ``lora_B`` scales the rank components before B, so each adapted layer computes

    h = W0 x + scaling * ((1 - w) B_g A_g x + w B_p A_p x)

with ``w`` the personal weight: fixed (``training_personal_weight``) while training, and
per input at inference (FedDPA's instance-wise dynamic weighting):

    w(x) = max_personal_weight * mean_k cos(rep(x), rep(x_k))

where rep is the language model's last hidden state with the personal adapter alone, at
the prompt's last token (FedDPA's code's default, ``emb_type="last"``) or averaged over the
prompt (its ``emb_type="avg"``), and x_k are the device's training prompts. The mean of cosines is the dot product with the mean of the
normalised training representations, the reference, which is a personal tensor of the
adapter state (``REFERENCE_KEY``) and never leaves the device. Weighing an input costs one
more pass of the language model over the prompt, at inference only.

The paper's formula takes an input like the device's data to have a cosine near 1 (a large
model's hidden states are alike); on this project's small base a client's own test prompts
average about 0.3, so its personal adapter, trained at weight 0.5, was used at about 0.14.
``weighting="relative"`` divides the cosine by the mean cosine between two of the device's
training prompts (folded into the stored reference) and clips it to [0, 1].

Local training follows FedDPA-T: the global adapter alone for the round's local steps (personal
weight ``global_phase_personal_weight``, 0 by default: the paper's clients train it as plain
federated LoRA), then the personal adapter for as many with the global one frozen, mixed at the
training weight; then the reference is recomputed on the training prompts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from fedvlm.edge.batching import IGNORE_INDEX, collate, to_device
from fedvlm.edge.frozen_components import frozen_components
from fedvlm.edge.objectives import conversation_of
from fedvlm.edge.training import TrainingConfig, TrainMetrics, train
from fedvlm.shared.lora_config import module_part

__all__ = ["InstanceMixing", "REFERENCE_KEY"]

# The device's reference representation, kept with its personal tensors.
REFERENCE_KEY = "fedvlm.feddpa.reference"
_LANGUAGE_MODELS = ("language_model", "text_model")


class InstanceMixing:
    """Installs FedDPA's mixing on a PEFT model whose adapter's leading ``global_rank``
    components are the global adapter.

    Args:
        peft_model: the device's model (one LoRA adapter, "default").
        global_rank: how many leading rank components form the global adapter.
        max_personal_weight: FedDPA's cap on the personal weight at inference.
        training_personal_weight: the personal weight while the personal adapter trains (and at
            inference before a reference exists).
        global_phase_personal_weight: the personal weight while the global adapter trains (0: alone).
        reference_examples: training prompts whose representations form the reference.
        representation: ``last`` (the last prompt position's hidden state) or ``mean`` (over the prompt).
        weighting: ``cosine`` (the paper's) or ``relative`` (the cosine over the training prompts'
            own mean cosine, clipped to [0, 1]; the reference is stored divided by that mean).
    """

    def __init__(self, peft_model: torch.nn.Module, *, global_rank: int, max_personal_weight: float,
                 training_personal_weight: float, reference_examples: int, representation: str = "last",
                 global_phase_personal_weight: float = 0.0, weighting: str = "cosine") -> None:  # fmt: skip
        self.model = peft_model
        self.global_rank = global_rank
        self.max_personal_weight = max_personal_weight
        self.training_personal_weight = training_personal_weight
        self.global_phase_personal_weight = global_phase_personal_weight
        self.weighting = weighting
        self._fixed_weight: float | None = None  # inside ``fixed_weights``: the weight every pass uses
        self.reference_examples = reference_examples
        self.representation = representation
        self.reference: torch.Tensor | None = None  # mean of normalised training representations
        self._row_weights: torch.Tensor | None = None  # personal weight of each row of the current batch
        self._recording: list[torch.Tensor] | None = None
        self._record_mask: torch.Tensor | None = None
        self._last_weights: torch.Tensor | None = None
        self._personal_only = False  # set during the representation pass
        b_modules = {name: module for name, module in peft_model.named_modules() if name.endswith("lora_B.default")}
        if not b_modules:
            raise ValueError("FedDPA needs a LoRA adapter named 'default' on the model")
        # Inputs are weighed before the language model runs: its layers mix per input; layers
        # elsewhere (a vision tower's, which runs first) keep the training weight.
        self._handles = [module.register_forward_pre_hook(functools.partial(
            self._gate, per_input=module_part(name) == "language")) for name, module in b_modules.items()]
        language_models = [module for name, module in peft_model.named_modules()
                           if name.rsplit(".", 1)[-1] in _LANGUAGE_MODELS]  # fmt: skip
        if not language_models:
            raise ValueError("FedDPA weighs inputs by the language model's input embeddings, but the model has no "
                             "submodule named language_model or text_model")  # fmt: skip
        self._handles.append(language_models[0].register_forward_pre_hook(self._weigh_inputs, with_kwargs=True))

    # ---- the mixing ------------------------------------------------------------------------------

    def _weigh_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the language model runs: each row's personal weight (and its representation,
        when recording the reference)."""
        if self._personal_only:
            return  # the representation pass itself
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.dim() != 3:
            self._row_weights = None
            return
        if self._recording is not None:
            self._recording.append(self._represent(module, kwargs, self._record_mask))
        if module.training or self.reference is None or self._fixed_weight is not None:
            self._row_weights = None  # the training weight (see ``fixed_weights``)
        elif embeds.shape[1] == 1 and self._row_weights is not None and len(self._row_weights) == len(embeds):
            pass  # a decoding step of the prompt just weighed: same rows, same weights
        else:
            representation = torch.nn.functional.normalize(self._represent(module, kwargs, None), dim=-1)
            similarity = representation @ self.reference.to(representation.device)
            if self.weighting == "relative":  # the reference is already divided by the typical cosine
                similarity = similarity.clamp(0.0, 1.0)
            # Never above the cap: a reference made under "relative" read under "cosine" could
            # push the global adapter's gate (1 - w) below zero.
            self._row_weights = (self.max_personal_weight * similarity).clamp(max=self.max_personal_weight)
            self._last_weights = self._row_weights.detach().cpu()

    def _represent(self, language_model: torch.nn.Module, kwargs: dict, positions: torch.Tensor | None) -> torch.Tensor:
        """The last hidden state, with the personal adapter alone, at each row's last prompt
        position or averaged over the prompt (``representation``); the prompt is the set
        positions of ``positions``, else of the attention mask."""
        inner = {key: kwargs[key] for key in ("inputs_embeds", "attention_mask", "position_ids") if key in kwargs}
        self._personal_only = True
        try:
            with torch.no_grad():
                hidden = language_model(**inner, use_cache=False).last_hidden_state
        finally:
            self._personal_only = False
        mask = positions if positions is not None else kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = mask.to(hidden.device).bool()
        if self.representation == "mean":  # FedDPA's emb_type="avg": the mean over the prompt
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            return ((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)).float()
        order = torch.arange(mask.shape[1], device=hidden.device)
        last = (mask * (order + 1)).argmax(dim=1)  # the index of each row's last prompt position
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()

    def _gate(self, module: torch.nn.Module, args: tuple, *, per_input: bool) -> tuple:
        """Before a lora_B: global components times (1 - w), personal ones times w."""
        (x, *rest) = args
        rank = x.shape[-1]
        weights = self._row_weights if per_input else None
        if self._personal_only:
            weights = torch.ones(1, device=x.device)
        elif weights is None or x.dim() != 3 or len(weights) != x.shape[0]:
            fixed = self.training_personal_weight if self._fixed_weight is None else self._fixed_weight
            weights = torch.full((1,), fixed, device=x.device)
        personal = weights.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        is_personal = torch.arange(rank, device=x.device) >= self.global_rank
        gate = torch.where(is_personal, personal, 1 - personal)
        return (x * gate, *rest)

    @property
    def last_weights(self) -> torch.Tensor | None:
        """The personal weights of the last batch weighed at inference (for reports and tests)."""
        return self._last_weights

    # ---- the reference ---------------------------------------------------------------------------

    def refresh_reference(self, encoded: Sequence, pad_token_id: int, batch_size: int = 8) -> None:
        """The mean of the normalised representations of (up to ``reference_examples``) training prompts."""
        chosen = [conversation_of(item) for item in list(encoded)[: self.reference_examples]]
        if not chosen:
            return
        device = next(self.model.parameters()).device
        representations = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(chosen), batch_size):
                batch = to_device(collate(chosen[start : start + batch_size], pad_token_id), device)
                # The prompt: attended positions whose label is ignored (the answer is what follows).
                prompt = (batch.pop("labels") == IGNORE_INDEX) & batch["attention_mask"].bool()
                with self._record(prompt) as recorded, torch.no_grad():
                    self.model(**batch)
                representations.extend(recorded)
        finally:
            self.model.train(was_training)
        stacked = torch.nn.functional.normalize(torch.cat(representations), dim=-1)
        self.reference = stacked.mean(dim=0)
        if self.weighting == "relative" and len(stacked) > 1:
            # The mean cosine between two different training prompts: |sum|^2 counts each pair
            # twice and each prompt with itself once.
            count = len(stacked)
            typical = (count**2 * float(self.reference @ self.reference) - count) / (count * (count - 1))
            self.reference = self.reference / max(typical, 1e-3)

    @contextlib.contextmanager
    def fixed_weights(self, weight: float | None = None) -> Iterator[None]:
        """While training: every pass weighs at ``weight`` (default the training weight), also
        the passes training makes in eval mode (DPO scores its reference log-probabilities so),
        so policy and reference are the same mixture; per-input weights are for inference."""
        previous = self._fixed_weight
        self._fixed_weight = self.training_personal_weight if weight is None else weight
        try:
            yield
        finally:
            self._fixed_weight = previous

    @contextlib.contextmanager
    def _record(self, mask: torch.Tensor) -> Iterator[list[torch.Tensor]]:
        self._recording, self._record_mask = [], mask
        try:
            yield self._recording
        finally:
            self._recording, self._record_mask = None, None

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.reference is None else {REFERENCE_KEY: self.reference.detach().cpu().numpy().copy()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Take the reference from an adapter state; a state without one (fresh) clears it."""
        value = state.get(REFERENCE_KEY)
        self.reference = None if value is None else torch.from_numpy(np.array(value, dtype=np.float32))

    # ---- FedDPA-T local training -----------------------------------------------------------------

    def train_in_turn(self, processor, encoded: Sequence, config: TrainingConfig, **kwargs) -> TrainMetrics:
        """The global adapter for the round's ``config.steps`` (personal frozen, and weighed
        ``global_phase_personal_weight``), then the personal adapter for as many (global frozen,
        mixed at ``training_personal_weight``); then the reference is recomputed.

        Each adapter gets the whole round, as each of the paper's clients trains each adapter for
        the local epochs: a round costs twice the optimiser steps of a single adapter. Splitting
        the round's steps between the two instead left each half of them (and a one-step round
        none for the personal adapter): on few-shot-codes (6 clients, 4 rounds of 8 steps) FedDPA
        scored 0.28 where training alone scored 0.56.

        The global adapter trains alone (weight 1) by default, as the paper's clients train it.
        Mixed at 0.5 with each client's frozen personal adapter instead, it learnt only to be half
        of a pair, not a model of its own, and inference leans on it (weight 1 - w, w about 0.14
        here): few-shot-codes, 6 clients, seed 0, scored alone 0.27 (0.56 trained alone), mixed
        per input 0.39 (0.57); see ``global_phase_personal_weight``."""
        phases = (("personal", self.global_phase_personal_weight), ("global", None))  # held part, phase weight
        results = []
        for index, (frozen, weight) in enumerate(phases):
            phase = TrainingConfig(**{**config.__dict__, "seed": config.seed + 7919 * index})
            with self._frozen(frozen), self.fixed_weights(weight):
                results.append(train(self.model, processor, encoded, phase, **kwargs))
        self.refresh_reference(encoded, processor.tokenizer.pad_token_id)
        return _combined(results)

    def _frozen(self, part: str):
        """Hold the global or the personal adapter's components while the other trains."""
        k = self.global_rank
        return frozen_components(self.model, lambda key, rank: (k, rank) if part == "personal" else (0, min(k, rank)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _combined(results: Sequence[TrainMetrics]) -> TrainMetrics:
    steps = sum(r.steps for r in results)
    return TrainMetrics(loss=results[-1].loss, first_loss=results[0].first_loss,
                        mean_loss=sum(r.mean_loss * r.steps for r in results) / max(steps, 1),
                        examples=sum(r.examples for r in results), steps=steps,
                        seconds=sum(r.seconds for r in results))  # fmt: skip
