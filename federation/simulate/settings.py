"""What a simulation is asked to do (``fedvlm simulate --help``), checked before any work starts.

Every mistake a user can make on the command line raises ``UsageError`` (a ValueError)
naming the flag and what to write instead, so the command ends in one line, never a traceback.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any

from fedvlm.edge.data.partitioning import PartitionSpec
from fedvlm.shared.cli_support import option_value
from fedvlm.shared.objective_names import check_objective
from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.strategies import STRATEGY_NAMES, build_strategy, get_strategy
from fedvlm.shared.usage_error import UsageError

# Not federations: references every table is read against.
CENTRALISED = "centralised"  # one LoRA trained on the union of the clients' data
BASE = "base"  # the pre-trained base, no training
REFERENCES: tuple[str, ...] = (CENTRALISED, BASE)
# Beyond the paper: pLoRA whose clients, after absorbing each global B, refit their personal A
# alone for a quarter of their local steps (B frozen), taken from the joint steps: the same
# compute and the same bytes as pLoRA. The name for plora[refit_steps=LOCAL_STEPS // 4].
PLORA_REFIT = "plora-refit"
VARIANTS: dict[str, str] = {PLORA_REFIT: "plora"}
ALL_STRATEGIES: tuple[str, ...] = STRATEGY_NAMES + REFERENCES
# What a run compares unless told otherwise: the paper's method, the federated LoRA baselines,
# `local` and the references. The other strategies are named with --strategies (vision-shared
# also needs the vision side adapted, --lora-parts).
DEFAULT_STRATEGIES: tuple[str, ...] = ("plora", "fedit", "ffa", "fedsa", "fedex", "local") + REFERENCES
KNOWN_STRATEGIES: tuple[str, ...] = ALL_STRATEGIES + tuple(VARIANTS)
SCENARIOS: tuple[str, ...] = ("concept-shift", "label-skew", "task-skew", "mixed", "few-shot", "few-shot-cameras",
                               "few-shot-languages", "few-shot-codes", "iid")
DEFAULT_MODEL_DIR = Path("work/models/small-pretrained")


# How --data rows are split into clients (origin_dataset, model, feedback_model, type,
# dirichlet:ALPHA[:KEY], iid): the edge SDK's data layer owns the split; the old name stays.
Partition = PartitionSpec


def parse_strategies(text: str) -> tuple[str, ...]:
    """Comma-separated strategy labels: a name, or a name with options in brackets
    (``plora[refit_steps=2,personal_lr_scale=4]``, commas inside brackets separate options)."""
    names = tuple(name.strip() for name in _split_outside_brackets(text) if name.strip())
    if not names:
        raise UsageError(f"--strategies is empty; name some of {','.join(ALL_STRATEGIES)}")
    for name in names:
        strategy_spec(name)  # a UsageError naming what is wrong
    if len(set(names)) != len(names):
        raise UsageError(f"--strategies names a strategy twice: {text!r}")
    return names


def strategy_spec(label: str, refit_steps: int = 1) -> tuple[str, dict[str, Any]]:
    """(strategy name, options) of a ``--strategies`` label; ``plora-refit`` is pLoRA with
    ``refit_steps`` (``SimulationSettings.refit_steps``). References have no options."""
    name, bracket, rest = label.partition("[")
    name = name.strip()
    if name not in KNOWN_STRATEGIES:
        raise UsageError(f"unknown strategy {name!r} in --strategies; choose from {','.join(KNOWN_STRATEGIES)}")
    if not bracket:
        return (VARIANTS[name], {"refit_steps": refit_steps}) if name in VARIANTS else (name, {})
    if not rest.endswith("]") or name not in STRATEGY_NAMES:
        raise UsageError(f"bad --strategies entry {label!r}: write NAME or NAME[KEY=VALUE,...] with NAME a strategy "
                         "(references and variants take no options)")  # fmt: skip
    options: dict[str, Any] = {}
    for item in rest[:-1].split(","):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise UsageError(f"bad --strategies entry {label!r}: {item!r} is not KEY=VALUE")
        options[key.strip()] = option_value(value.strip())
    get_strategy(name, **options)  # unknown options and bad values end here, named
    return name, options


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def parse_ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"bad --client-ranks {text!r}: write comma-separated ranks, e.g. 2,4,8") from None
    return ranks


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"bad --seeds {text!r}: write comma-separated non-negative integers, e.g. 0,1,2") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"bad --seeds {text!r}: seeds must be distinct non-negative integers, e.g. 0,1,2")
    return seeds


@dataclasses.dataclass(frozen=True)
class SimulationSettings:
    """Attributes:
    out: where results, per-run files and plots go; a second run with the same settings resumes there.
    scenario: a built-in synthetic scenario (``SCENARIOS``), or None with ``data``.
    data: RLAIF-V parquet / JSON Lines shards (a folder, a file or a glob), split into clients by ``partition``.
    partition: how ``data`` is split (scenario data is split by the generator itself).
    skip_bad: skip bad ``data`` rows (counted per reason, reported with the results) instead of stopping.
    max_examples: use at most this many ``data`` rows, drawn per seed before the split (None: all).
    max_per_client: each client keeps at most this many of its rows (train and test), drawn per seed
        (None: all). A client's working set is bounded by this, not by the shards' size.
    clients: number of clients.
    test_fraction: share of each client's ``data`` records held out as its test set.
    examples_per_client / test_examples_per_client: sizes of each client's synthetic splits.
    model: the base model: a folder, or a Hugging Face id in the local cache; None builds the
        pre-trained ``small`` model in ``DEFAULT_MODEL_DIR``.
    strategies: federated strategies and references (``centralised``, ``base``) to run.
    rounds: federated rounds.
    local_steps: optimiser steps per selected client per round.
    fraction: share of clients selected each round (at least one).
    seeds: one run per seed; a seed fixes the data split, the LoRA initialisation, client
        selection and batch order, identically for every strategy.
    learning_rate, batch_size, lora_rank: local training and adapter size, the same for every strategy.
    client_ranks: LoRA ranks of the clients, in turn (client k gets ``client_ranks[k % len]``), for
        strategies whose devices may differ in rank (flexlora); empty: every client at ``lora_rank``.
        Other strategies always run every client at ``lora_rank``.
    lora_parts, lora_layers, lora_target_modules: which layers get LoRA factors
        (:class:`~fedvlm.shared.lora_config.LoraSettings`).
    quantization: of the frozen base (``auto``, ``none``, ``nf4``, ``int8``).
    global_test_size: examples drawn from the pooled test set of all clients for ``global_accuracy``.
    objective: local training's objective, ``sft`` (on ``chosen``) or ``dpo`` (chosen against
        rejected, the reference being the adapter a client holds at the start of its round).
    dpo_beta: DPO's beta; also scales the reported reward margin under either objective.
    max_new_tokens: length of the greedy answers scored (exact match, ROUGE-L, BLEU); None:
        8 for short answers, the longest reference plus some slack for long ones.
    late_joiners: clients of the scenario (drawn after the federated ones) that never take part in
        a round: after the last one each takes the final global version and trains only its
        personal part for ``late_joiner_steps`` on its own data, then is scored on its own
        test set (under ``local``: trains everything alone for as many steps).
    late_joiner_steps: optimiser steps of that adaptation.
    score_every_round: score every client after every round (the per-round curves); off, only
        after the last round, which takes about half the time off a run.
    progress: show the progress bar.
    threads: torch CPU threads. One by default: the small models gain little from more, and
        on a shared CPU two threads that contend were measured 10x slower than one.
    """

    out: Path = Path("work/simulate")
    scenario: str | None = "concept-shift"
    data: Path | None = None
    partition: PartitionSpec = PartitionSpec("by_key", "origin_dataset")
    skip_bad: bool = False
    max_examples: int | None = None
    max_per_client: int | None = None
    clients: int = 8
    test_fraction: float = 0.2
    examples_per_client: int = 32
    test_examples_per_client: int = 32
    model: Path | str | None = None
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    rounds: int = 5
    local_steps: int = 10
    fraction: float = 1.0
    seeds: tuple[int, ...] = (0,)
    learning_rate: float = 3e-3
    batch_size: int = 8
    lora_rank: int = 8
    client_ranks: tuple[int, ...] = ()
    lora_parts: tuple[str, ...] = ("language",)
    lora_layers: tuple[str, ...] = ("attention", "mlp")
    lora_target_modules: str | None = None
    quantization: str = "auto"
    global_test_size: int = 128
    objective: str = "sft"
    dpo_beta: float = 0.1
    max_new_tokens: int | None = None
    late_joiners: int = 0
    late_joiner_steps: int = 10
    score_every_round: bool = True
    progress: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        if (self.scenario is None) == (self.data is None):
            raise UsageError("give either --scenario NAME or --data DIR (not both)")
        if self.scenario is not None and self.scenario not in SCENARIOS:
            raise UsageError(f"unknown --scenario {self.scenario!r}; choose one of {', '.join(SCENARIOS)}")
        if self.data is not None and not self.data.exists() and not glob.has_magic(str(self.data)):
            raise UsageError(f"--data {self.data} does not exist: point it at a folder of RLAIF-V parquet or "
                             "JSON Lines files (or a glob of shards)")
        for name in ("max_examples", "max_per_client"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 2 (one row to train, one to test), "
                                 f"got {getattr(self, name)}")
        if self.model is not None:
            from fedvlm.edge.model_loading import check_model_dir

            check_model_dir(self.model)  # a folder holding a model, or a cached hub id: else one clear line
        for name in ("clients", "rounds", "local_steps", "batch_size", "lora_rank", "global_test_size", "threads",
                     "late_joiner_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.clients < 2:
            raise UsageError("--clients must be at least 2: a federation needs more than one client")
        if self.scenario is not None and (self.examples_per_client < 1 or self.test_examples_per_client < 1):
            raise UsageError("--examples-per-client and --test-examples-per-client must be at least 1")
        if self.late_joiners < 0:
            raise UsageError(f"--late-joiners cannot be negative, got {self.late_joiners}")
        if self.late_joiners and self.scenario is None:
            raise UsageError("--late-joiners needs a --scenario: late clients are drawn from the same scenario "
                             "(with --data, every record already belongs to a federated client)")
        if not 0 < self.fraction <= 1:
            raise UsageError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"--test-fraction must be between 0 and 1 (exclusive), got {self.test_fraction}")
        if not self.learning_rate > 0:
            raise UsageError(f"--learning-rate must be positive, got {self.learning_rate}")
        check_objective(self.objective, self.dpo_beta)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.strategies or not self.seeds:
            raise UsageError("name at least one strategy and one seed")
        parse_strategies(",".join(self.strategies))  # same checks as the flag
        if PLORA_REFIT in self.strategies and self.local_steps < 2:
            raise UsageError(f"{PLORA_REFIT} splits --local-steps between joint training and the refit of A: "
                             "give at least 2")
        if any(not 1 <= rank <= self.lora_rank for rank in self.client_ranks):
            raise UsageError(f"--client-ranks {','.join(map(str, self.client_ranks))}: every rank must be between 1 "
                             f"and --lora-rank {self.lora_rank}, the federation's")  # fmt: skip
        lora = LoraSettings(r=self.lora_rank, parts=self.lora_parts, layers=self.lora_layers,
                            target_modules=self.lora_target_modules)
        for label in self.strategies:
            name, options = strategy_spec(label, self.refit_steps)
            if name in STRATEGY_NAMES:  # options that do not fit the layout end here, before any run
                build_strategy(name, options, lora)
            if name in STRATEGY_NAMES and get_strategy(name, **options).refit_steps >= self.local_steps:
                raise UsageError(f"{label} refits the personal factors for {options['refit_steps']} of each round's "
                                 f"--local-steps {self.local_steps}: give more local steps or fewer refit_steps")

    @property
    def refit_steps(self) -> int:
        """Steps of the personal refit in ``plora-refit`` (the rest of ``local_steps`` train both factors)."""
        return max(1, self.local_steps // 4)

    @property
    def selected_per_round(self) -> int:
        return max(1, round(self.fraction * self.clients))

    def run_key(self) -> dict[str, Any]:
        """Everything that changes a (strategy, seed) run's result; a resumed ``--out`` must match it.

        Strategies and seeds are left out: adding one to a finished run only runs what is new.
        """
        key = {name: value for name, value in dataclasses.asdict(self).items()
               if name not in ("out", "strategies", "seeds", "progress", "threads", "score_every_round")}
        key["partition"] = str(self.partition)
        key["lora_parts"], key["lora_layers"] = list(self.lora_parts), list(self.lora_layers)  # as JSON reads back
        for name in ("data", "model"):
            key[name] = str(key[name]) if key[name] is not None else None
        if not self.client_ranks:  # so simulations from before the option still resume
            key.pop("client_ranks")
        if not self.late_joiners:  # likewise
            key.pop("late_joiners"), key.pop("late_joiner_steps")
        else:
            key["client_ranks"] = list(self.client_ranks)
        for name in ("skip_bad", "max_examples", "max_per_client"):  # likewise, at their defaults
            if not key[name]:
                key.pop(name)
        if self.objective == "sft":  # likewise: DPO's beta scales only a score that was not reported then
            key.pop("objective"), key.pop("dpo_beta")
        if self.max_new_tokens is None:
            key.pop("max_new_tokens")
        if self.scenario is not None:  # only --data runs are split by these
            key.pop("partition"), key.pop("test_fraction")
            for name in ("skip_bad", "max_examples", "max_per_client"):
                key.pop(name, None)
        else:
            key.pop("examples_per_client"), key.pop("test_examples_per_client")
        return key

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(out=str(self.out), data=str(self.data) if self.data else None,
                    model=str(self.model) if self.model else None, partition=str(self.partition),
                    strategies=list(self.strategies), seeds=list(self.seeds), lora_parts=list(self.lora_parts),
                    lora_layers=list(self.lora_layers), client_ranks=list(self.client_ranks))
        return data
