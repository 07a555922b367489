"""The personalisation benchmark (issues 6 and 15): when does federation beat training alone?

Runs ``fedvlm simulate`` (one process, FedVLM's own trainer, strategies, aggregation and
wire encoding) on a base pre-trained to see (:mod:`fedvlm.edge.vision_pretraining`; its
accuracy per question kind on 256 held-out questions each is printed first), then:

1. ``few-shot-codes`` (16 clients x 32 examples, 3 seeds, 4 late joiners): every client answers
   colours and shapes in one shared code vocabulary the base never answered with (the common
   part) and its camera is mounted its own way (the personal part). Every strategy of the
   benchmark but the sweep-only ones, pLoRA also tuned (``PLORA_TUNED``), with the
   ``centralised`` and ``base`` references. Target:
   the best federated strategy >= +10 % relative personal accuracy over ``local``, and >= FedSA.
2. ``few-shot`` (the same clients' cameras; counts past four, side and height in the clients'
   phrasing: a common part the pooled data does not teach in the budget; seed 0 only by
   default, see ``--few-shot-seeds``): the same verdict, the negative case.
3. ``concept-shift`` (8 clients, 3 seeds): pLoRA against FedIT (the paper's +24.5 %).
4. Examples per client 16 -> 256 on ``few-shot-codes`` (seed 0) for every strategy: pLoRA,
   FedIT, FedSA, the rank split, the dual adapter (FedDPA), heterogeneous ranks (FlexLoRA,
   clients at ranks 2, 4, 8 in turn), vision-shared (on LoRA that also adapts the vision tower
   and the projector) and ``local``: where federation stops paying (``examples_per_client.png``).
   Every size takes the same rounds and local steps.

Accuracy per question kind is reported beside every mean. Clients are scored after the last
round only (``score_every_round`` off: scoring every client every round was half of each
run's time). ``--jobs N`` runs the simulations in N processes (one CPU thread each; every run
is seeded, so results do not depend on N).

Each part's results.json / results.md / plots are under ``--out/<part>``; ``summary.json``
and ``summary.md`` hold the verdicts. An interrupted benchmark resumes.

    python benchmarks/personalisation.py --out work/bench/personalisation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from fedvlm.edge.pretraining import score_card
from fedvlm.simulate import SimulationSettings, simulate
from fedvlm.simulate.report import kind_table, save_accuracy_figure
from fedvlm.simulate.runner import prepare_model
from fedvlm.simulate.settings import REFERENCES, parse_seeds, parse_strategies

PAPER_RELATIVE_GAIN = 0.245  # pLoRA over FedIT (the paper's claim)
FEW_SHOT_TARGET = 0.10  # best federated over `local` (issue 15)
# pLoRA as the paper has it, and tuned: B (the factor that travels) at twice the round's
# learning rate (LoRA+), the setting chosen on seeds 3-5 (benchmarks/README.md, "Tuning pLoRA").
PLORA_TUNED = "plora[shared_lr_scale=2]"
CODES_STRATEGIES = ("plora", PLORA_TUNED, "fedit", "fedsa", "rank-split", "local", "centralised", "base")
FEW_SHOT_STRATEGIES = ("plora", "fedsa", "local")
# The few-shot parts whose verdict is the target: (part, the option naming its strategies).
FEW_SHOT_PARTS = (("few-shot-codes", "codes"), ("few-shot", "few_shot"))
CONCEPT_SHIFT_STRATEGIES = ("plora", "fedit", "local")
SWEEP_STRATEGIES = ("plora", "fedit", "fedsa", "rank-split", "feddpa", "flexlora", "vision-shared", "local")
# Devices of three capabilities in turn under flexlora (the only strategy the setting changes).
CLIENT_RANKS = (2, 4, 8)
# vision-shared shares the vision side's factors, so its runs adapt the vision tower and the
# projector too (a setting of the whole simulation: its own part).
VISION_STRATEGIES = ("vision-shared",)
VISION_LORA_PARTS = ("language", "vision", "projector")


@dataclasses.dataclass(frozen=True)
class Part:
    """One simulation of the benchmark: its name (the folder under --out) and settings."""

    name: str
    settings: SimulationSettings


def _run_seed(settings: SimulationSettings) -> float:
    """A worker's task: one part's runs of one seed, no reports (the parent writes them)."""
    started = time.perf_counter()
    simulate(settings, reports=False)
    return time.perf_counter() - started


def run_parts(parts: list[Part], jobs: int) -> None:
    """Every run of every part, in ``jobs`` processes, a (part, seed) per task so each task
    encodes its seed's data once; the longest tasks (most strategies, most examples) first."""
    tasks = [dataclasses.replace(part.settings, seeds=(seed,), progress=False)
             for part in parts for seed in part.settings.seeds]
    tasks.sort(key=lambda t: -len(t.strategies) * t.clients * (1 + t.examples_per_client / 256))
    if jobs <= 1:
        for task in tasks:
            _run_seed(task)
        return
    # spawn: a fresh interpreter per worker, no forked torch thread pools.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for task, seconds in zip(tasks, pool.map(_run_seed, tasks)):
            print(f"   {task.out.name} seed {task.seeds[0]}: {', '.join(task.strategies)} ({seconds:.0f} s)",
                  flush=True)


def best_federated(results: dict) -> tuple[str, dict]:
    """The federated strategy (not `local`, not a reference) of highest personal accuracy."""
    federated = {name: entry for name, entry in results["strategies"].items()
                 if name not in REFERENCES and name != "local"}
    name = max(federated, key=lambda n: federated[n]["personal_accuracy"])
    return name, federated[name]


def relative(a: float, b: float) -> float:
    return a / b - 1 if b else float("inf")


def few_shot_verdict(results: dict) -> dict:
    """The issue's few-shot target on one part: the best federated strategy >= +10 % over `local`
    and >= FedSA (mean over seeds), with every strategy's gain over `local` per seed beside it."""
    strategies = results["strategies"]
    local, fedsa = strategies["local"], strategies["fedsa"]
    best_name, best = best_federated(results)
    gain = relative(best["personal_accuracy"], local["personal_accuracy"])
    local_per_seed = local["personal_accuracy_per_seed"]
    return {
        "best_federated": best_name,
        "best_personal_accuracy": best["personal_accuracy"], "best_std": best["personal_accuracy_std"],
        "local_personal_accuracy": local["personal_accuracy"], "local_std": local["personal_accuracy_std"],
        "fedsa_personal_accuracy": fedsa["personal_accuracy"],
        "relative_gain_over_local": gain, "target": FEW_SHOT_TARGET,
        "meets_target": gain >= FEW_SHOT_TARGET and best["personal_accuracy"] >= fedsa["personal_accuracy"],
        "gain_over_local": {n: relative(e["personal_accuracy"], local["personal_accuracy"])
                            for n, e in strategies.items() if n != "local"},
        "gain_over_local_per_seed": {n: {seed: relative(value, local_per_seed[seed])
                                         for seed, value in e["personal_accuracy_per_seed"].items()}
                                     for n, e in strategies.items() if n != "local"},
        "late_joiner_accuracy": {n: e["late_joiner_accuracy"] for n, e in strategies.items()},
        "accuracy_by_kind": {n: e.get("personal_accuracy_by_kind", {}) for n, e in strategies.items()},
    }


def sweep_accuracy(entry: dict, seeds: tuple[int, ...]) -> float:
    """A strategy's personal accuracy at one size: the mean over the sweep's seeds."""
    per_seed = entry["personal_accuracy_per_seed"]
    return float(np.mean([per_seed[str(seed)] for seed in seeds]))


def sweep_plot(sweep: dict[int, dict], out: Path, clients: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = sorted(sweep)
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in next(iter(sweep.values()))["strategies"]:
        values = [sweep[size]["strategies"][name]["personal_accuracy"] for size in sizes]
        axis.plot(sizes, values, marker="o", label=name, linestyle="--" if name in REFERENCES or name == "local" else "-",
                  linewidth=2.2 if name == "local" else 1.4)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.set_xlabel(f"training examples per client (few-shot-codes scenario, {clients} clients)")
    axis.set_ylabel("personal accuracy")
    return save_accuracy_figure(figure, axis, out / "examples_per_client.png", ncol=2, legend_size="x-small")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("work/bench/personalisation"))
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the few-shot-codes and concept-shift parts")
    parser.add_argument("--few-shot-seeds", default="0",
                        help="seeds of the few-shot part (one by default: its verdict is known, and 3 seeds of it "
                             "would take the benchmark past 30 minutes)")
    parser.add_argument("--few-shot-clients", type=int, default=16, help="clients of both few-shot parts")
    parser.add_argument("--late-joiners", type=int, default=4)
    parser.add_argument("--concept-shift-clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--examples-per-client", type=int, default=32)
    parser.add_argument("--test-examples-per-client", type=int, default=16,
                        help="held-out examples per client (16 clients x 16 = 256 per seed; scoring is half a run's time)")
    parser.add_argument("--sweep", default="16,256",
                        help="examples per client of the sweep (plus --examples-per-client from part 1); empty: none")
    parser.add_argument("--sweep-seeds", default="0")
    parser.add_argument("--codes-strategies", default=",".join(CODES_STRATEGIES))
    parser.add_argument("--few-shot-strategies", default=",".join(FEW_SHOT_STRATEGIES))
    parser.add_argument("--concept-shift-strategies", default=",".join(CONCEPT_SHIFT_STRATEGIES))
    parser.add_argument("--sweep-strategies", default=",".join(SWEEP_STRATEGIES))
    parser.add_argument("--model", type=Path, default=None,
                        help="a base other than the default pre-trained one (e.g. a shared cache of it; its "
                             "card is measured once on it if it was built with another card size)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="simulations run in this many processes, one CPU thread each (default 2: the "
                             "benchmark machine's cores; results do not depend on it)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        seeds, few_shot_seeds = parse_seeds(args.seeds), parse_seeds(args.few_shot_seeds)
        sweep_seeds = parse_seeds(args.sweep_seeds)
        strategies = {part: parse_strategies(getattr(args, f"{part}_strategies"))
                      for part in ("codes", "few_shot", "concept_shift", "sweep")}
        sweep_sizes = [int(n) for n in args.sweep.split(",") if n]
    except ValueError as error:
        parser.error(str(error))
    if not {"plora", "fedit"} <= set(strategies["concept_shift"]):
        parser.error("--concept-shift-strategies must include plora and fedit: the headline compares them")
    for _, option in FEW_SHOT_PARTS:
        if not {"local", "fedsa"} <= set(strategies[option]):
            parser.error(f"--{option.replace('_', '-')}-strategies must include local and fedsa: "
                         "the target compares with them")

    started = time.perf_counter()
    common = dict(rounds=args.rounds, local_steps=args.local_steps, global_test_size=32, model=args.model,
                  test_examples_per_client=args.test_examples_per_client, score_every_round=False)
    model_dir = prepare_model(SimulationSettings(**common))
    card = score_card(model_dir)
    for phrasing, scores in card["accuracy"].items():
        print(f"base model, accuracy per question kind on {card['card_examples_per_kind']} held-out pictures each "
              f"({phrasing.replace('_', ' ')}): " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
    card_seconds = time.perf_counter() - started

    def part_of(name: str, **values) -> Part:
        return Part(name, SimulationSettings(out=args.out / name, **{**common, "model": model_dir, **values}))

    # The few-shot scenarios as every part of them runs: late joiners everywhere (they are drawn
    # after the federated clients, so the federated clients are the same ones at every size)
    # and flexlora's client ranks (no other strategy reads them).
    few_shot_values = dict(clients=args.few_shot_clients, late_joiners=args.late_joiners,
                           late_joiner_steps=2 * args.local_steps, client_ranks=CLIENT_RANKS)
    codes_values = dict(scenario="few-shot-codes", **few_shot_values)
    parts = [part_of("few-shot-codes", examples_per_client=args.examples_per_client, strategies=strategies["codes"],
                      seeds=seeds, **codes_values),
             part_of("few-shot", scenario="few-shot", examples_per_client=args.examples_per_client,
                      strategies=strategies["few_shot"], seeds=few_shot_seeds, **few_shot_values),
             part_of("concept-shift", scenario="concept-shift", clients=args.concept_shift_clients,
                      examples_per_client=args.examples_per_client, strategies=strategies["concept_shift"],
                      seeds=seeds)]
    sweep_parts: dict[int, list[Part]] = {}
    for size in sorted({args.examples_per_client, *sweep_sizes}) if sweep_sizes else []:
        # At the few-shot-codes part's size, its runs of the sweep's seeds are the sweep's.
        todo = [n for n in strategies["sweep"]
                if size != args.examples_per_client or n not in strategies["codes"] or set(sweep_seeds) - set(seeds)]
        plain = tuple(n for n in todo if n not in VISION_STRATEGIES)
        vision = tuple(n for n in todo if n in VISION_STRATEGIES)
        sweep_parts[size] = ([part_of(f"few-shot-codes-{size}-examples", examples_per_client=size, strategies=plain,
                                       seeds=sweep_seeds, **codes_values)] if plain else []) + \
            ([part_of(f"few-shot-codes-{size}-examples-vision-lora", examples_per_client=size, strategies=vision,
                       seeds=sweep_seeds, lora_parts=VISION_LORA_PARTS, **codes_values)] if vision else [])
    every_part = parts + [part for size_parts in sweep_parts.values() for part in size_parts]
    print(f"== {len(every_part)} simulations in {args.jobs} process(es): "
          + ", ".join(part.name for part in every_part), flush=True)
    run_parts(every_part, args.jobs)

    def report(part: Part) -> dict:
        simulation = part.settings
        print(f"== {part.name}: {simulation.clients} clients x {simulation.examples_per_client} examples, "
              f"seeds {','.join(map(str, simulation.seeds))}", flush=True)
        results = simulate(simulation)  # every run is done: the reports
        print((simulation.out / "results.md").read_text(), flush=True)
        return results

    codes, few_shot, concept = (report(part) for part in parts)
    sweep: dict[int, dict] = {}
    for size, size_parts in sweep_parts.items():
        entries = {n: e for part in size_parts for n, e in report(part)["strategies"].items()}
        if size == args.examples_per_client:
            entries = {**{n: e for n, e in codes["strategies"].items() if n in strategies["sweep"]}, **entries}
        sweep[size] = {"strategies": {n: {**entries[n], "personal_accuracy": sweep_accuracy(entries[n], sweep_seeds)}
                                      for n in strategies["sweep"] if n in entries}}
    plot = sweep_plot(sweep, args.out, args.few_shot_clients) if len(sweep) > 1 else None

    plora, fedit = concept["strategies"]["plora"], concept["strategies"]["fedit"]
    verdict = {
        "base_accuracy": card["accuracy"],
        "base_card_examples_per_kind": card["card_examples_per_kind"],
        "base_earlier_cards": card.get("earlier_cards", {}),
        "base_vision_heads_accuracy": card.get("vision_heads_accuracy", {}),
        "base_build_seconds": card["seconds"],
        "base_build_cpu_seconds": card.get("cpu_seconds"),
        "few_shot_codes": few_shot_verdict(codes),
        "few_shot": few_shot_verdict(few_shot),
        "concept_shift": {
            "plora_personal_accuracy": plora["personal_accuracy"], "plora_std": plora["personal_accuracy_std"],
            "fedit_personal_accuracy": fedit["personal_accuracy"], "fedit_std": fedit["personal_accuracy_std"],
            "relative_gain": relative(plora["personal_accuracy"], fedit["personal_accuracy"]),
            "paper_relative_gain": PAPER_RELATIVE_GAIN,
            "meets_paper": relative(plora["personal_accuracy"], fedit["personal_accuracy"]) >= PAPER_RELATIVE_GAIN,
        },
        "few_shot_clients": args.few_shot_clients,
        "examples_per_client": {str(size): {n: e["personal_accuracy"] for n, e in s["strategies"].items()}
                                for size, s in sorted(sweep.items())},
        "base_card_seconds": card_seconds,
        "this_invocation_seconds": time.perf_counter() - started,
    }
    parts_results = {"few-shot-codes": codes, "few-shot": few_shot, "concept-shift": concept}
    (args.out / "summary.json").write_text(json.dumps({
        "verdict": verdict, "parts": {name: r["strategies"] for name, r in parts_results.items()}}, indent=2))
    (args.out / "summary.md").write_text(summary_markdown(verdict, parts_results, plot))
    print((args.out / "summary.md").read_text(), flush=True)
    return 0


def _few_shot_line(name: str, fs: dict) -> str:
    return (f"{name}: best federated `{fs['best_federated']}` {fs['best_personal_accuracy']:.3f} ± {fs['best_std']:.3f} "
            f"vs `local` {fs['local_personal_accuracy']:.3f} ± {fs['local_std']:.3f}: "
            f"{fs['relative_gain_over_local']:+.2%} relative (target +{fs['target']:.0%} and ≥ FedSA "
            f"{fs['fedsa_personal_accuracy']:.3f}: {'met' if fs['meets_target'] else 'NOT met'}).")


def summary_markdown(verdict: dict, parts: dict[str, dict], plot: Path | None) -> str:
    cs = verdict["concept_shift"]
    base = verdict["base_accuracy"]
    kinds = list(base["client_questions"])
    cpu = f", {verdict['base_build_cpu_seconds']:.0f} s of CPU" if verdict.get("base_build_cpu_seconds") else ""
    lines = ["# Personalisation benchmark: summary", "",
             f"The base (built in {verdict['base_build_seconds']:.0f} s{cpu}), accuracy per question kind on "
             f"{verdict['base_card_examples_per_kind']} held-out pictures each, English answers (`vertical`, "
             "`relation` and `many` are never taught):", "",
             "| phrasing | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
    for phrasing, scores in base.items():
        lines.append(f"| {phrasing.replace('_', ' ')} | " + " | ".join(f"{scores.get(k, 0):.2f}" for k in kinds) + " |")
    for size, card in verdict.get("base_earlier_cards", {}).items():
        lines += ["", f"The same base's earlier card, {size} per kind (pre-training's phrasing): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in card["pretraining_questions"].items()) + "."]
    heads = verdict.get("base_vision_heads_accuracy") or {}
    if heads:
        lines += ["", "Vision stage's own heads (last 20 steps' fresh pictures): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in heads.items()) + "."]
    lines += ["", "| part | strategy | personal accuracy | ± | per seed | vs `local` | late joiners |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for part, results in parts.items():
        local = results["strategies"]["local"]["personal_accuracy"]
        for name, entry in results["strategies"].items():
            late = entry.get("late_joiner_accuracy")
            per_seed = " / ".join(f"{v:.3f}" for v in entry["personal_accuracy_per_seed"].values())
            lines.append(f"| {part} | {name} | {entry['personal_accuracy']:.3f} | {entry['personal_accuracy_std']:.3f} "
                         f"| {per_seed} | {relative(entry['personal_accuracy'], local):+.2%} "
                         f"| {'—' if late is None else f'{late:.3f}'} |")
    lines += ["", _few_shot_line("Few-shot-codes", verdict["few_shot_codes"]), "",
              _few_shot_line("Few-shot", verdict["few_shot"]),
              "", "Few-shot-codes:", *kind_table(parts["few-shot-codes"]["strategies"]), "",
              "Few-shot:", *kind_table(parts["few-shot"]["strategies"]), "",
              f"Concept shift: pLoRA {cs['plora_personal_accuracy']:.3f} ± {cs['plora_std']:.3f} vs FedIT "
              f"{cs['fedit_personal_accuracy']:.3f} ± {cs['fedit_std']:.3f}: {cs['relative_gain']:+.1%} relative "
              f"(paper +{cs['paper_relative_gain']:.1%}: {'met' if cs['meets_paper'] else 'NOT met'}).", ""]
    if verdict["examples_per_client"]:
        lines += [f"Personal accuracy against examples per client (few-shot-codes, {verdict['few_shot_clients']} "
                  "clients, the sweep's seeds):", "",
                  "| strategy | " + " | ".join(verdict["examples_per_client"]) + " |",
                  "| --- |" + " ---: |" * len(verdict["examples_per_client"])]
        names = next(iter(verdict["examples_per_client"].values()))
        for name in names:
            lines.append(f"| {name} | " + " | ".join(f"{row[name]:.3f}" if name in row else "—"
                                                    for row in verdict["examples_per_client"].values()) + " |")
    if plot is not None:
        lines += ["", f"![personal accuracy vs examples per client]({plot.name})"]
    lines += ["", f"This invocation: {verdict['this_invocation_seconds'] / 60:.1f} min (the base's card: "
                  f"{verdict['base_card_seconds']:.0f} s of it)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
