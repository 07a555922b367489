"""Local fine-tuning of the LoRA factors, on one device.

One loop, top to bottom: encode the examples once, let the objective prepare (DPO computes
its reference log-probabilities here, with the model as it is before the first step), then
for each optimiser step draw ``batch_size * grad_accum`` examples in a seeded order, take
the objective's loss (``config.objective``: SFT's cross-entropy of the answer tokens, or
DPO's preference loss; :mod:`fedvlm.edge.objectives`), backward, clip, step. Only
parameters that require gradients (the LoRA factors a strategy lets train) are optimised;
the base stays frozen.

Resumable: with ``checkpoint_path`` set the loop saves its step, optimiser, factors and
data order every ``checkpoint_every`` steps and resumes from that file after a crash.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from pathlib import Path
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

from fedvlm.edge.batching import EncodedExample, to_device
from fedvlm.edge.chat_format import ChatFormat
from fedvlm.edge.objectives import Objective, SftObjective
from fedvlm.shared.lora_keys import factor_of
from fedvlm.shared.usage_error import UsageError
from fedvlm.shared.durable_files import write_durably


class QAExample(Protocol):
    """Anything with an image, a question and the answer to train on (RLAIF-V's ``chosen``)."""

    image: object
    question: str
    chosen: str


@dataclasses.dataclass
class TrainingConfig:
    """Local training hyper-parameters.

    Attributes:
        steps: optimiser steps per call (a federated round's local work).
        batch_size: examples per forward pass.
        grad_accum: forward passes accumulated per optimiser step.
        learning_rate: AdamW learning rate for the LoRA factors.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (None: no clipping).
        seed: seeds the batch order (and dropout) so a run is reproducible.
        progress: show a progress bar.
        factor_lr_scales: per-factor learning rates, as multiples of ``learning_rate`` keyed
            by LoRA factor ("A", "B"); a factor not named trains at ``learning_rate``.
        objective: what the loop minimises (``SftObjective()`` or ``DpoObjective(beta)``).
    """

    steps: int = 20
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    progress: bool = True
    factor_lr_scales: dict[str, float] = dataclasses.field(default_factory=dict)
    objective: Objective = dataclasses.field(default_factory=SftObjective)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UsageError(f"training {name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UsageError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass
class TrainMetrics:
    loss: float  # mean loss over the last optimiser step's batches
    first_loss: float
    mean_loss: float
    examples: int  # examples seen (with repetition)
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def encode_examples(processor, examples: Sequence[QAExample], model: torch.nn.Module | None = None,
                    objective: Objective | None = None) -> list:
    """Encode once, as ``objective`` trains on them (default SFT: ``EncodedExample`` of the
    chosen answer); a device trains on the same data every round. With ``model``, only the
    inputs its forward takes are kept."""
    chat = ChatFormat.for_model(processor, model) if model is not None else ChatFormat(processor)
    return (objective or SftObjective()).encode(chat, examples)


def batch_order(n_examples: int, n_needed: int, seed: int) -> list[int]:
    """Epochs of seeded permutations, concatenated, so every example is seen equally often."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_needed:
        order.extend(torch.randperm(n_examples, generator=generator).tolist())
    return order[:n_needed]


def train(
    model: torch.nn.Module,
    processor,
    examples: Sequence[QAExample] | Sequence[EncodedExample],
    config: TrainingConfig,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    description: str = "train",
) -> TrainMetrics:
    """Train the model's trainable parameters on ``examples``; returns metrics."""
    if len(examples) == 0:
        raise UsageError("no training examples: the device's data set is empty")
    objective = config.objective
    encoded = examples if objective.is_encoded(examples[0]) else encode_examples(processor, examples, model, objective)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: attach LoRA factors first")
    device = trainable[0].device
    pad_id = processor.tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(_parameter_groups(model, config), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    per_step = config.batch_size * config.grad_accum
    order = batch_order(len(encoded), config.steps * per_step, config.seed)

    start_step, losses = 0, []
    checkpoint = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None and checkpoint.exists():
        # What the objective prepared comes back too: DPO's reference is the model before step 0.
        start_step, losses, context = _resume(checkpoint, model, optimizer)
    else:
        context = objective.prepare(model, encoded, pad_id)

    model.train()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start_step, desc=description, disable=not config.progress, leave=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed + start_step)
        for step in range(start_step, config.steps):
            step_loss = 0.0
            for micro in range(config.grad_accum):
                first = step * per_step + micro * config.batch_size
                batch = objective.collate(encoded, order[first : first + config.batch_size], pad_id, context)
                loss = objective.loss(model, to_device(batch, device)) / config.grad_accum
                loss.backward()
                step_loss += loss.item()
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"training loss became {step_loss} at step {step}: lower the learning rate"
                )
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
                _save_checkpoint(checkpoint, step + 1, losses, model, optimizer, context)
    bar.close()
    model.eval()
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    tail = losses[-1]
    return TrainMetrics(
        loss=tail,
        first_loss=losses[0],
        mean_loss=sum(losses) / len(losses),
        examples=(config.steps - start_step) * per_step,
        steps=config.steps - start_step,
        seconds=time.perf_counter() - started,
    )


def _parameter_groups(model: torch.nn.Module, config: TrainingConfig) -> list[dict]:
    """The trainable parameters, one optimiser group per learning rate (``factor_lr_scales``)."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            scale = config.factor_lr_scales.get(factor_of(name) or "", 1.0)
            groups.setdefault(config.learning_rate * scale, []).append(parameter)
    return [{"params": parameters, "lr": lr} for lr, parameters in groups.items()]


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, step: int, losses: list[float], model, optimizer, context) -> None:
    buffer = io.BytesIO()
    torch.save(
        {"step": step, "losses": losses, "trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
         "objective_context": context},
        buffer,
    )
    write_durably(path, buffer.getvalue())


def _resume(path: Path, model, optimizer) -> tuple[int, list[float], object]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved["trainable"].items():
            parameters[name].copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    return int(saved["step"]), list(saved["losses"]), saved.get("objective_context")
