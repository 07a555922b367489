"""The ``fedvlm simulate`` sub-command: flags, their checks, and the summary printed at the end."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fedvlm.shared.cli_support import add_lora_target_options, lora_target_fields
from fedvlm.shared.objective_names import OBJECTIVE_NAMES
from fedvlm.simulate.settings import (
    ALL_STRATEGIES,
    DEFAULT_STRATEGIES,
    SCENARIOS,
    Partition,
    SimulationSettings,
    parse_ranks,
    parse_seeds,
    parse_strategies,
)

# The flags' defaults are the settings' own, so the two cannot drift apart.
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(SimulationSettings)}


def add_simulate_command(commands) -> None:
    simulate = commands.add_parser(
        "simulate", help="every strategy side by side on non-IID data, in one process",
        description="Simulate whole federations in one process: one base model in memory, each client an adapter "
                    "swapped in to train and to be scored, with FedVLM's own trainer, strategies, aggregation and "
                    "wire encoding. Writes results.json, results.md and plots to --out; started again with the "
                    "same settings it resumes from the (strategy, seed) runs already there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = simulate.add_mutually_exclusive_group()
    source.add_argument("--scenario", choices=SCENARIOS, default=None,
                        help="a built-in synthetic scenario (the default is concept-shift when --data is not given)")
    source.add_argument("--data", type=Path, metavar="SHARDS",
                        help="RLAIF-V data to split into clients: a folder of parquet shards (the published schema) "
                             "or JSON Lines files, one file, or a glob such as 'rlaifv/*.parquet'; streamed, only "
                             "the rows the clients keep are read")
    simulate.add_argument("--partition", default="origin_dataset",
                          help="how --data is split: origin_dataset (the paper's), model, feedback_model or type "
                               "(from origin_split; each value whole to one client), iid, or dirichlet:ALPHA[:KEY] "
                               "(Dirichlet skew over KEY, default origin_dataset)")
    simulate.add_argument("--max-examples", type=int, metavar="N",
                          help="use at most N --data rows, drawn per seed before the split; None: every row")
    simulate.add_argument("--max-per-client", type=int, metavar="N",
                          help="each client keeps at most N of its rows, train and test, drawn per seed; None: "
                               "all of its share")
    simulate.add_argument("--skip-bad", action="store_true",
                          help="skip bad --data rows (unreadable image, empty chosen, missing rejected under DPO, "
                               "broken origin_split) and count them per reason, instead of stopping at the first")
    simulate.add_argument("--clients", type=int, default=_DEFAULTS["clients"], help="number of clients")
    simulate.add_argument("--test-fraction", type=float, default=_DEFAULTS["test_fraction"],
                          help="share of each client's --data records held out as its test set (seeded)")
    simulate.add_argument("--examples-per-client", type=int, default=_DEFAULTS["examples_per_client"],
                          help="training examples per client (--scenario)")
    simulate.add_argument("--test-examples-per-client", type=int, default=_DEFAULTS["test_examples_per_client"],
                          help="held-out examples per client (--scenario)")
    simulate.add_argument("--model", default=None, metavar="DIR|ID",
                          help="base VLM: a folder, or a Hugging Face id in the local cache (default: the "
                               "pre-trained small model in work/models/small-pretrained, built if missing)")
    simulate.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                          help="comma-separated, of " + ",".join(ALL_STRATEGIES) + "; centralised (one LoRA on the "
                               "union of the clients' data) and base (no training) are references; a strategy takes "
                               "options in brackets, e.g. plora[refit_steps=2] or rank-split[shared_rank=2]; "
                               "plora-refit is plora[refit_steps=LOCAL_STEPS/4]")
    simulate.add_argument("--rounds", type=int, default=_DEFAULTS["rounds"], help="federated rounds")
    simulate.add_argument("--local-steps", type=int, default=_DEFAULTS["local_steps"],
                          help="optimiser steps per client per round")
    simulate.add_argument("--fraction", type=float, default=_DEFAULTS["fraction"],
                          help="share of clients selected per round")
    simulate.add_argument("--seeds", default=",".join(map(str, _DEFAULTS["seeds"])),
                          help="comma-separated seeds, e.g. 0,1,2: one run per seed")
    simulate.add_argument("--learning-rate", type=float, default=_DEFAULTS["learning_rate"],
                          help="local AdamW learning rate")
    simulate.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"], help="examples per optimiser step")
    simulate.add_argument("--lora-rank", type=int, default=_DEFAULTS["lora_rank"], help="LoRA rank r (alpha = 2r)")
    simulate.add_argument("--client-ranks", metavar="R1,R2,...",
                          help="clients' own LoRA ranks, in turn, for strategies whose devices differ in rank "
                               "(flexlora; the others run every client at --lora-rank); default: all at --lora-rank")
    add_lora_target_options(simulate)
    simulate.add_argument("--quantization", default=_DEFAULTS["quantization"], choices=["auto", "none", "nf4", "int8"],
                          help="quantisation of the frozen base")
    simulate.add_argument("--global-test-size", type=int, default=_DEFAULTS["global_test_size"],
                          help="examples drawn from all clients' test sets for global_accuracy")
    simulate.add_argument("--objective", default=_DEFAULTS["objective"], choices=OBJECTIVE_NAMES,
                          help="local training: sft (on chosen) or dpo (chosen against rejected; the reference is "
                               "the adapter a client holds at the start of its round)")
    simulate.add_argument("--dpo-beta", type=float, default=_DEFAULTS["dpo_beta"],
                          help="DPO's beta; also scales the reported reward margin")
    simulate.add_argument("--max-new-tokens", type=int, default=None,
                          help="length of the greedy answers scored (default: 8 for short answers, the longest "
                               "reference plus 8 for long ones, at most 512)")
    simulate.add_argument("--late-joiners", type=int, default=_DEFAULTS["late_joiners"],
                          help="more clients of the scenario that never train in a round: after the last one each "
                               "trains only its personal part on its own data and is scored (default 0)")
    simulate.add_argument("--late-joiner-steps", type=int, default=_DEFAULTS["late_joiner_steps"],
                          help="optimiser steps of a late joiner's adaptation")
    simulate.add_argument("--score-last-round-only", action="store_true",
                          help="score the clients after the last round only, not every round (about half the time)")
    simulate.add_argument("--out", type=Path, default=_DEFAULTS["out"], help="where results go")
    simulate.add_argument("--threads", type=int, default=_DEFAULTS["threads"],
                          help="torch CPU threads (one suits the small models, and a CPU shared with other work)")
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    from fedvlm.simulate import SimulationSettings, simulate

    settings = SimulationSettings(
        out=args.out, scenario=args.scenario or (None if args.data is not None else "concept-shift"),
        data=args.data, partition=Partition.parse(args.partition), skip_bad=args.skip_bad,
        max_examples=args.max_examples, max_per_client=args.max_per_client, clients=args.clients,
        test_fraction=args.test_fraction, examples_per_client=args.examples_per_client,
        test_examples_per_client=args.test_examples_per_client, model=args.model,
        strategies=parse_strategies(args.strategies), rounds=args.rounds, local_steps=args.local_steps,
        fraction=args.fraction, seeds=parse_seeds(args.seeds), learning_rate=args.learning_rate,
        batch_size=args.batch_size, lora_rank=args.lora_rank,
        client_ranks=parse_ranks(args.client_ranks) if args.client_ranks else (), quantization=args.quantization,
        **{f"lora_{name}": value for name, value in lora_target_fields(args).items()},
        global_test_size=args.global_test_size, objective=args.objective, dpo_beta=args.dpo_beta,
        max_new_tokens=args.max_new_tokens, late_joiners=args.late_joiners,
        late_joiner_steps=args.late_joiner_steps, score_every_round=not args.score_last_round_only,
        progress=not args.quiet, threads=args.threads,
    )
    results = simulate(settings)
    print((settings.out / "results.md").read_text())
    print(f"done in {results['elapsed_seconds']:.0f} s; results.json, results.md and plots in {settings.out}")
    return 0
