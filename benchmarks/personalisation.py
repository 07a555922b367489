"""The personalisation benchmark (issue 6): pLoRA against the baselines on non-IID data.

Runs ``fedvlm simulate`` on every built-in scenario with all strategies and the
``local`` / ``centralised`` / ``base`` references, then prints the headline: on
``concept-shift`` (8 clients, 3 seeds) pLoRA's personal accuracy relative to FedIT's
(the paper's claim: +24.5 %) and the bytes each sends. Each scenario's results.json,
results.md and plots are under ``--out/<scenario>``; an interrupted benchmark resumes.

    python benchmarks/personalisation.py --out work/bench/personalisation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedvlm.simulate import DEFAULT_STRATEGIES, SimulationSettings, simulate
from fedvlm.simulate.settings import PLORA_REFIT, parse_seeds, parse_strategies

PAPER_RELATIVE_GAIN = 0.245


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("work/bench/personalisation"))
    parser.add_argument("--clients", type=int, default=8, help="clients of the concept-shift headline")
    parser.add_argument("--other-clients", type=int, default=4,
                        help="clients of the other scenarios (4 keeps the default run under 30 minutes)")
    parser.add_argument("--headline-seeds", default="0,1,2", help="seeds of the concept-shift headline")
    parser.add_argument("--other-seeds", default="0", help="seeds of the other scenarios (time budget)")
    parser.add_argument("--other-scenarios", default="label-skew,task-skew,mixed")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--examples-per-client", type=int, default=32)
    parser.add_argument("--global-test-size", type=int, default=64)
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES + (PLORA_REFIT,)),
                        help="every strategy and reference, and the plora-refit variant (beyond the paper)")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        strategies = parse_strategies(args.strategies)
        seeds_of = {text: parse_seeds(text) for text in (args.headline_seeds, args.other_seeds)}
    except ValueError as error:
        parser.error(str(error))
    if not {"plora", "fedit"} <= set(strategies):
        parser.error("--strategies must include plora and fedit: the headline compares them")

    started = time.perf_counter()
    plan = [("concept-shift", args.headline_seeds, args.clients)] + [
        (name, args.other_seeds, args.other_clients) for name in args.other_scenarios.split(",") if name]
    summary, run_seconds = {}, 0.0
    for scenario, seeds, clients in plan:
        settings = SimulationSettings(
            out=args.out / scenario, scenario=scenario, clients=clients, rounds=args.rounds,
            global_test_size=args.global_test_size, strategies=strategies,
            local_steps=args.local_steps, examples_per_client=args.examples_per_client, model=args.model,
            seeds=seeds_of[seeds])
        print(f"== {scenario}: {clients} clients, seeds {seeds}", flush=True)
        results = simulate(settings)
        print((settings.out / "results.md").read_text(), flush=True)
        run_seconds += sum(entry["seconds"] for entry in results["strategies"].values())
        summary[scenario] = {name: {k: entry[k] for k in ("personal_accuracy", "personal_accuracy_std",
                                                            "global_accuracy", "bytes_up_per_client_round",
                                                            "bytes_down_per_client_round")}
                             for name, entry in results["strategies"].items()}
    headline = summary["concept-shift"]
    plora, fedit = headline["plora"], headline["fedit"]
    gain = plora["personal_accuracy"] / fedit["personal_accuracy"] - 1 if fedit["personal_accuracy"] else float("inf")
    bytes_ratio = plora["bytes_up_per_client_round"] / fedit["bytes_up_per_client_round"]
    verdict = {
        "plora_personal_accuracy": plora["personal_accuracy"], "plora_std": plora["personal_accuracy_std"],
        "fedit_personal_accuracy": fedit["personal_accuracy"], "fedit_std": fedit["personal_accuracy_std"],
        "relative_gain": gain, "paper_relative_gain": PAPER_RELATIVE_GAIN, "meets_paper": gain >= PAPER_RELATIVE_GAIN,
        "plora_over_fedit_bytes_up": bytes_ratio,
        # Runs resumed from an earlier invocation keep their own time: this is all of them.
        "run_seconds": run_seconds, "this_invocation_seconds": time.perf_counter() - started,
    }
    (args.out / "summary.json").write_text(json.dumps({"headline": verdict, "scenarios": summary}, indent=2))
    print(f"headline (concept-shift, {args.clients} clients, seeds {args.headline_seeds}): plora "
          f"{plora['personal_accuracy']:.3f} ± {plora['personal_accuracy_std']:.3f} vs fedit "
          f"{fedit['personal_accuracy']:.3f} ± {fedit['personal_accuracy_std']:.3f}: {gain:+.1%} relative "
          f"(paper: +{PAPER_RELATIVE_GAIN:.1%}, {'met' if verdict['meets_paper'] else 'NOT met'}); "
          f"plora sends {bytes_ratio:.2f}x fedit's bytes up. Runs: {run_seconds / 60:.1f} min; this invocation "
          f"{verdict['this_invocation_seconds'] / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
