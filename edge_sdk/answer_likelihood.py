"""How likely a model finds an answer: the summed log-probability of its labelled tokens.

The one quantity behind DPO's loss (:mod:`fedvlm.edge.objectives`) and the long-answer
metrics (:mod:`fedvlm.edge.answer_metrics`): for each row of a batch, the sum over the
answer tokens (labels not ``IGNORE_INDEX``: the answer and its end-of-turn token, never the
prompt) of ``log p(token | everything before it)``, and how many tokens that was.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedvlm.edge.batching import IGNORE_INDEX, EncodedExample, collate, to_device


def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the answer tokens' log-probabilities [batch], their count [batch]).

    Position t's logits predict token t+1, as in the models' own loss.
    """
    predicted = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # cross_entropy is -log p(target), computed without materialising a second vocab-sized tensor.
    token_log_probs = -torch.nn.functional.cross_entropy(
        predicted.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return (token_log_probs * mask).sum(dim=-1), mask.sum(dim=-1)


def forward_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model on a labelled batch (labels taken out of the inputs), as :func:`answer_log_probs`."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    return answer_log_probs(model(**inputs).logits, labels)


@torch.no_grad()
def score_answers(model: torch.nn.Module, encoded: Sequence[EncodedExample], pad_token_id: int,
                  batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probabilities and token counts of encoded conversations, in eval mode
    (no dropout), on the CPU as float64 [n] tensors."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = [], []
    try:
        for start in range(0, len(encoded), batch_size):
            batch = to_device(collate(encoded[start : start + batch_size], pad_token_id), device)
            log_probs, n_tokens = forward_log_probs(model, batch)
            sums.append(log_probs.double().cpu())
            counts.append(n_tokens.cpu())
    finally:
        model.train(was_training)
    if not sums:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(sums), torch.cat(counts)
