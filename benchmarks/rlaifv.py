"""RLAIF-V-like preference data, split by source, every default strategy, SFT and DPO (``make bench-rlaifv``).

Nothing can be downloaded here, so the data are the offline look-alike of RLAIF-V
(``fedvlm make-rlaifv-data``: long-form ``chosen`` descriptions of drawn scenes that get
every detail right, ``rejected`` ones with hallucinated colours, counts or places, four
sources that differ in question, style and what they describe), written in the exact
published parquet schema and read back through the same reader as the real shards. Each
source goes to one client (``--partition origin_dataset``, the paper's split). Then
``fedvlm simulate`` runs every strategy of the default comparison (plora, fedit, ffa, fedsa,
fedex, local and the centralised and base references) for each seed, once under SFT and once
under DPO, and this prints, per objective and score, which strategy wins and how
pLoRA compares with FedIT. Everything, with plots, is under ``--out``; an interrupted run resumes.

The base is a tiny random-weight LLaVA (``fedvlm-edge make-tiny-model``), so that the whole
comparison fits in under 30 minutes on a 2-core CPU: it learns the answers' words and style,
not to see. Read the scores as what each strategy does with the same training signal, not as
what a real VLM reaches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fedvlm.simulate import SimulationSettings, simulate
from fedvlm.simulate.engine import METRICS
from fedvlm.simulate.report import LOWER_IS_BETTER, METRIC_LABELS, winners
from fedvlm.simulate.settings import DEFAULT_STRATEGIES, Partition, parse_seeds


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("work/bench/rlaifv"))
    parser.add_argument("--rows", type=int, default=192, help="preference pairs generated (dealt over 4 sources)")
    parser.add_argument("--clients", type=int, default=4, help="one source each (origin_dataset partition)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--objectives", default="sft,dpo")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="greedy answer length for ROUGE-L/BLEU (the descriptions run 30-70 tokens)")
    parser.add_argument("--model", type=Path, help="base model (default: a tiny LLaVA built in --out)")
    parser.add_argument("--pretrained-small", action="store_true",
                        help="use fedvlm simulate's default base instead: the small LLaVA pre-trained to name colours "
                             "(built once into work/models/small-pretrained, 3-7 min)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    from fedvlm.edge.data.preference_scenes import write_preference_shards
    from fedvlm.edge.tiny_model import make_tiny_model
    from fedvlm.simulate.clients import image_size_of

    if args.pretrained_small:
        from fedvlm.simulate.runner import prepare_model

        model = prepare_model(SimulationSettings(progress=not args.quiet))  # no --model: the pre-trained small base
    else:
        model = args.model or args.out / "model"
        if args.model is None and not (model / "config.json").exists():
            make_tiny_model(model, "tiny", seed=0)
    shards = args.out / "shards"
    if not any(shards.glob("*.parquet")):
        write_preference_shards(shards, args.rows, shards=2, image_size=image_size_of(model), seed=0)
    return model, shards


def summary(results: dict[str, dict]) -> dict:
    """Per objective: the winning strategy on each score (references left out), and pLoRA against FedIT."""
    out: dict = {}
    for objective, result in results.items():
        strategies = result["strategies"]
        entry: dict = {"winners": winners(strategies), "plora_vs_fedit": {}, "scores": {}}
        for name, values in strategies.items():
            entry["scores"][name] = {m: [values[f"personal_{m}"], values[f"personal_{m}_std"]]
                                     for m in METRICS if values[f"personal_{m}"] is not None}
        if "plora" in strategies and "fedit" in strategies:
            plora, fedit = strategies["plora"], strategies["fedit"]
            for metric in METRICS:
                p, f = plora[f"personal_{metric}"], fedit[f"personal_{metric}"]
                if p is None or f is None:
                    continue
                spread = max(plora[f"personal_{metric}_std"], fedit[f"personal_{metric}_std"])
                better = p < f if metric in LOWER_IS_BETTER else p > f
                verdict = "tie (within one std over seeds)" if abs(p - f) <= spread else (
                    "plora better" if better else "fedit better")
                entry["plora_vs_fedit"][metric] = {"plora": p, "fedit": f, "std": spread, "verdict": verdict}
            entry["bytes_up_ratio"] = plora["bytes_up_per_client_round"] / fedit["bytes_up_per_client_round"]
        out[objective] = entry
    return out


def markdown(summary_: dict, seconds: float) -> str:
    lines = []
    for objective, entry in summary_.items():
        lines += [f"### {objective.upper()}", "",
                  "| strategy | " + " | ".join(METRIC_LABELS[m] for m in METRICS if any(
                      m in s for s in entry["scores"].values())) + " |"]
        shown = [m for m in METRICS if any(m in s for s in entry["scores"].values())]
        lines.append("| --- |" + " ---: |" * len(shown))
        for name, scores in entry["scores"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{scores[m][0]:.3f} ± {scores[m][1]:.3f}" if m in scores else "—" for m in shown) + " |")
        lines += ["", "Best strategy (references left out, local counted): " + "; ".join(
            f"{METRIC_LABELS[m]}: {', '.join(names)}" for m, names in entry["winners"].items()) + "."]
        if entry["plora_vs_fedit"]:
            lines += ["", "pLoRA vs FedIT: " + "; ".join(
                f"{METRIC_LABELS[m]} {v['plora']:.3f} vs {v['fedit']:.3f} ({v['verdict']})"
                for m, v in entry["plora_vs_fedit"].items())
                + f"; pLoRA sends {entry['bytes_up_ratio']:.2f}× FedIT's bytes up.", ""]
    lines.append(f"Elapsed {seconds / 60:.1f} min in this invocation (runs already in --out are not redone).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    model, shards = prepare(args)
    results = {}
    for objective in [o.strip() for o in args.objectives.split(",") if o.strip()]:
        settings = SimulationSettings(
            out=args.out / objective, scenario=None, data=shards, partition=Partition.parse("origin_dataset"),
            clients=args.clients, test_fraction=0.25, model=model,
            strategies=tuple(s.strip() for s in args.strategies.split(",")), rounds=args.rounds,
            local_steps=args.local_steps, seeds=parse_seeds(args.seeds), learning_rate=args.learning_rate,
            batch_size=args.batch_size, lora_rank=8, quantization="none", objective=objective,
            dpo_beta=args.dpo_beta, max_new_tokens=args.max_new_tokens, progress=not args.quiet)
        print(f"== {objective}: {len(settings.strategies)} strategies x {len(settings.seeds)} seeds", flush=True)
        results[objective] = simulate(settings)
    seconds = time.perf_counter() - started
    table = summary(results)
    (args.out / "summary.json").write_text(json.dumps({"summary": table, "seconds": seconds,
                                                       "args": {k: str(v) for k, v in vars(args).items()}},
                                                      indent=2))
    text = markdown(table, seconds)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
