"""What local training minimises: the objective is a small piece the trainer plugs in.

An objective turns examples into what it trains on (``encode``), computes anything it needs
once before the first step (``prepare``: DPO's reference log-probabilities), builds a batch
from some of its encoded items (``collate``) and gives the batch's loss (``loss``). The loop
in :func:`fedvlm.edge.training.train` is the same for every objective.

* :class:`SftObjective` (``sft``): supervised fine-tuning, the cross-entropy of the
  ``chosen`` answer's tokens.
* :class:`DpoObjective` (``dpo``): Direct Preference Optimisation (Rafailov et al., NeurIPS
  2023) on (chosen, rejected) pairs. With ``pc``/``pr`` the policy's summed log-probabilities
  of the chosen/rejected answer tokens and ``rc``/``rr`` the reference's, the loss is
  ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``. The reference is the model as it is
  when ``train`` starts: in a federation, the frozen base with the adapter the client holds
  at the start of its round (the global factors it just received and its personal ones).
  Its log-probabilities are computed once per example then, without gradients and without
  dropout, so the reference costs one forward pass per pair per round and is exact. A
  strategy that trains in phases calls ``train`` once per phase (FedDPA: the global adapter,
  then the personal one; pLoRA with ``refit_steps``: A alone after the new global B arrives),
  so each phase's reference is the model as that phase starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import torch

from fedvlm.edge.answer_likelihood import forward_log_probs, score_answers
from fedvlm.edge.batching import EncodedExample, collate
from fedvlm.shared.objective_names import DEFAULT_DPO_BETA, OBJECTIVE_NAMES, check_objective  # noqa: F401
from fedvlm.shared.usage_error import UsageError


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One example as DPO trains on it: the same prompt with the chosen and the rejected answer."""

    chosen: EncodedExample
    rejected: EncodedExample


def conversation_of(item: EncodedExample | PreferencePair) -> EncodedExample:
    """The chosen conversation of an encoded item of any objective (what prompts are read from)."""
    return item.chosen if isinstance(item, PreferencePair) else item


class Objective(Protocol):
    name: str

    def encode(self, chat, examples: Sequence) -> list: ...

    def is_encoded(self, item: object) -> bool: ...

    def prepare(self, model: torch.nn.Module, encoded: Sequence, pad_token_id: int) -> Any: ...

    def collate(self, encoded: Sequence, indices: Sequence[int], pad_token_id: int, context: Any) -> dict: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def options(self) -> dict[str, Any]: ...


class SftObjective:
    """Supervised fine-tuning on ``chosen``: the model's own token cross-entropy on the answer."""

    name = "sft"

    def encode(self, chat, examples: Sequence) -> list[EncodedExample]:
        return [chat.encode(e.image, e.question, e.chosen) for e in examples]

    def is_encoded(self, item: object) -> bool:
        return isinstance(item, EncodedExample)

    def prepare(self, model: torch.nn.Module, encoded: Sequence, pad_token_id: int) -> None:
        return None

    def collate(self, encoded: Sequence[EncodedExample], indices: Sequence[int], pad_token_id: int,
                context: None) -> dict:
        return collate([encoded[i] for i in indices], pad_token_id)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def options(self) -> dict[str, Any]:
        return {}


def unpaired_examples(examples: Sequence) -> list[int]:
    """Indexes of the examples without a rejected answer: DPO cannot train on them."""
    return [index for index, example in enumerate(examples)
            if not str(getattr(example, "rejected", None) or "").strip()]


@dataclasses.dataclass(frozen=True)
class DpoObjective:
    """DPO against the model as it was when training started (see the module doc).

    Attributes:
        beta: how far the policy may move from the reference (larger: the loss saturates
            sooner, the policy stays closer); 0.1 is the paper's usual value.
    """

    beta: float = DEFAULT_DPO_BETA
    name: str = dataclasses.field(default="dpo", init=False)

    def __post_init__(self) -> None:
        check_objective(self.name, self.beta)

    def check(self, examples: Sequence) -> None:
        """A ``UsageError`` naming the first example without a rejected answer (before any slow work)."""
        unpaired = unpaired_examples(examples)
        if unpaired:
            where = getattr(examples[unpaired[0]], "source", "") or f"example {unpaired[0]}"
            raise UsageError(f"--objective dpo needs a rejected answer for every example; {where} has none: "
                             "drop such records (--skip-bad) or train with --objective sft")

    def encode(self, chat, examples: Sequence) -> list[PreferencePair]:
        self.check(examples)
        return [PreferencePair(chat.encode(e.image, e.question, e.chosen), chat.encode(e.image, e.question, e.rejected))
                for e in examples]

    def is_encoded(self, item: object) -> bool:
        return isinstance(item, PreferencePair)

    def prepare(self, model: torch.nn.Module, encoded: Sequence[PreferencePair], pad_token_id: int) -> torch.Tensor:
        """The reference's summed log-probabilities, [n, 2] (chosen, rejected), float64 on the CPU."""
        chosen, _ = score_answers(model, [pair.chosen for pair in encoded], pad_token_id)
        rejected, _ = score_answers(model, [pair.rejected for pair in encoded], pad_token_id)
        return torch.stack([chosen, rejected], dim=1)

    def collate(self, encoded: Sequence[PreferencePair], indices: Sequence[int], pad_token_id: int,
                context: torch.Tensor) -> dict:
        """The chosen conversations, then the rejected ones, in one padded batch, with their reference."""
        pairs = [encoded[i] for i in indices]
        batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)
        batch["reference_log_probs"] = context[list(indices)]
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = dict(batch)
        reference = inputs.pop("reference_log_probs")
        log_probs, _ = forward_log_probs(model, inputs)
        n = reference.shape[0]
        policy_chosen, policy_rejected = log_probs[:n], log_probs[n:]
        margin = (policy_chosen - reference[:, 0].to(log_probs)) - (policy_rejected - reference[:, 1].to(log_probs))
        return -torch.nn.functional.logsigmoid(self.beta * margin).mean()

    def options(self) -> dict[str, Any]:
        return {"dpo_beta": self.beta}


def build_objective(name: str, dpo_beta: float = DEFAULT_DPO_BETA) -> Objective:
    """The objective called ``name`` (``--objective``); ``dpo_beta`` is used by ``dpo`` only."""
    check_objective(name, dpo_beta)
    return DpoObjective(beta=float(dpo_beta)) if name == "dpo" else SftObjective()
