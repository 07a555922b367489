"""Rank split: the first k rank components of every LoRA pair are shared, the rest personal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from .. import lora_keys
from ..lora_config import LoraSettings
from ..usage_error import UsageError
from .base import Shapes, Strategy, option_count


class RankSplit(Strategy):
    """Share the leading ``shared_rank`` components of both factors; keep the others on the device.

    A rank-r LoRA update is a sum of r rank-one terms, ``B A = sum_k b_k a_k^T``. This
    strategy splits that sum: the first k terms (rows ``A[:k]``, columns ``B[:, :k]``) are
    a federated adapter, averaged by the hub like FedIT averages a whole one; the other
    r - k terms are the client's own, trained with it but never sent:

        h = W0 x + scaling * (B_s A_s + B_p A_p) x,   [B_s | B_p] = B,  [A_s ; A_p] = A

    So the shared part can learn what clients have in common, in both factors, and the
    personal part what is theirs, also in both factors, which neither pLoRA (B shared, A
    personal) nor FedSA (the mirror image) allow. Both parts start from the federation's
    shared initialisation (B zero, A from the seed). Updates carry only ``A[:k]`` and
    ``B[:, :k]``; the hub refuses a tensor whose rank axis is not exactly k.

    A dual adapter whose global and personal adapters are simply added is this strategy
    with k = the global adapter's rank; ``FedDPA`` differs by weighing the two per input.

    Reference: the split of a model into shared and personal parameters is partial model
    personalisation, K. Pillutla, K. Malik, A. Mohamed, M. Rabbat, M. Sanjabi, L. Xiao,
    "Federated Learning with Partial Model Personalization", ICML 2022, arXiv:2204.03809;
    here the split runs along LoRA's rank, as in decoupled shared/private LoRA modules
    (Z. Shen et al., "SDFLoRA", 2026, arXiv:2601.11219).

    Parameters:
        shared_rank: k, the number of leading rank components that are shared; at least 1
            and below the federation's rank r. Default (None): r // 2, filled in from the
            federation's LoRA settings by ``build_strategy``.
        ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r, which the means do not
        need (it is only checked).
    """

    name: ClassVar[str] = "rank-split"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"A", "B"})

    def __init__(self, shared_rank: int | None = None) -> None:
        self.shared_rank_count = None if shared_rank is None else option_count(self.name, "shared_rank", shared_rank,
                                                                               minimum=1)  # fmt: skip

    def options(self) -> dict[str, Any]:
        return {"shared_rank": self.shared_rank_count}

    def layout_options(self) -> dict[str, Any]:
        return self.options()

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any], lora: LoraSettings) -> dict[str, Any]:
        resolved = dict(options)
        key = cls._rank_option()
        if resolved.get(key) is None:
            if lora.r < 2:
                raise UsageError(f"{cls.name} needs LoRA rank r >= 2 (one shared and one personal component), "
                                 f"got r={lora.r}")  # fmt: skip
            resolved[key] = lora.r // 2
        elif isinstance(resolved[key], int) and not 1 <= resolved[key] < lora.r:
            raise UsageError(f"{cls.name} option {key}={resolved[key]} must be at least 1 and below the LoRA rank "
                             f"r={lora.r}, so that some of the rank is shared and some personal")  # fmt: skip
        return resolved

    @classmethod
    def _rank_option(cls) -> str:
        return "shared_rank"

    def shared_rank(self, key: str, rank: int) -> int:
        if lora_keys.factor_of(key) is None:
            return 0
        count = self.shared_rank_count if self.shared_rank_count is not None else rank // 2
        return min(count, rank)

    def update_problem(self, shapes: Shapes) -> str | None:
        problem = super().update_problem(shapes)
        if problem is not None or self.shared_rank_count is None:
            return problem
        for key, shape in shapes.items():
            axis = lora_keys.rank_axis(key)
            if axis is None:
                return (f"update tensor {key!r} is a lora_B bias, which strategy {self.name!r} keeps on the device "
                        "(only part of B's rank is shared)")  # fmt: skip
            if len(shape) <= axis or shape[axis] != self.shared_rank_count:
                return (f"update tensor {key!r} has shape {tuple(shape)}: strategy {self.name!r} sends exactly the "
                        f"first {self.shared_rank_count} rank components (axis {axis}); the others stay on the "
                        "device")  # fmt: skip
        return None
