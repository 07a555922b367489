"""Per-run results in, what a person reads out: ``results.json``, ``results.md`` and two plots.

Across seeds: a strategy's ``personal_<score>`` (exact match ``accuracy``, ``loss``,
``perplexity``, ``preference_accuracy``, ``reward_margin``, ``rouge_l``, ``bleu``) is the
mean over clients and seeds; ``personal_<score>_std`` is the standard deviation of the
per-seed means (the spread a rerun with another seed shows; 0 with one seed). A score that
does not apply to the data (exact match of long answers, preference scores without
rejected answers) is None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedvlm.shared.durable_files import write_durably
from fedvlm.simulate import data_report
from fedvlm.simulate.engine import METRICS
from fedvlm.simulate.settings import REFERENCES, SimulationSettings


# How each score reads in a table, and whether higher is better.
METRIC_LABELS: dict[str, str] = {
    "accuracy": "exact match", "loss": "loss (chosen)", "perplexity": "perplexity", "preference_accuracy":
    "preference accuracy", "reward_margin": "reward margin", "rouge_l": "ROUGE-L", "bleu": "BLEU"}
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
# The one score a curve over rounds shows: the first of these that applies to the data.
HEADLINE_ORDER: tuple[str, ...] = ("accuracy", "preference_accuracy", "rouge_l", "loss")


def _run_scores(run: dict, kind: str) -> dict:
    """A run's ``personal`` or ``global`` scores (runs written before long answers were scored hold accuracy only)."""
    return run.get(kind) or {"accuracy": run[f"{kind}_accuracy"]}


def _round_scores(round_record: dict) -> dict:
    return round_record.get("personal") or {"accuracy": round_record["personal_accuracy"]}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if len(present) == len(values) and present else None


def _std(values: Sequence[float | None]) -> float | None:
    return float(np.std(values)) if values and all(v is not None for v in values) else None


def summarise(name: str, runs: Sequence[dict]) -> dict:
    """One strategy's entry of ``results.json`` from its runs (one per seed): for every score,
    ``personal_<score>`` (mean over clients and seeds), ``personal_<score>_std`` (over the per-seed
    means), ``personal_<score>_per_seed`` and ``global_<score>``; None where it does not apply.
    ``late_joiner_accuracy`` (± std over seeds): clients that never took part, after adapting
    their personal part (None without late joiners)."""
    late = [run["late_joiner_accuracy"] for run in runs if run.get("late_joiner_accuracy") is not None]
    reference = name in REFERENCES
    n_rounds = len(runs[0]["rounds"])
    entry: dict = {}
    for metric in METRICS:
        per_seed = [_run_scores(run, "personal").get(metric) for run in runs]
        entry[f"personal_{metric}"] = _mean(per_seed)
        entry[f"personal_{metric}_std"] = _std(per_seed)
        entry[f"personal_{metric}_per_seed"] = {str(run["seed"]): value for run, value in zip(runs, per_seed)}
        entry[f"global_{metric}"] = _mean([_run_scores(run, "global").get(metric) for run in runs])
    entry["metrics"] = [m for m in METRICS if entry[f"personal_{m}"] is not None]
    entry["headline"] = next((m for m in HEADLINE_ORDER if m in entry["metrics"]), "loss")
    entry["personal_per_round"] = {
        m: [_mean([_round_scores(run["rounds"][r]).get(m) for run in runs]) for r in range(n_rounds)]
        for m in entry["metrics"]}
    entry["personal_accuracy_per_round"] = entry["personal_per_round"].get("accuracy")
    up = float(np.mean([r["bytes_up_per_client"] for run in runs for r in run["rounds"]]))
    down = float(np.mean([r["bytes_down_per_client"] for run in runs for r in run["rounds"]]))
    per_client = []
    for index, client in enumerate(runs[0]["per_client"]):
        rows = [run["per_client"][index] for run in runs]
        scores = {f"{kind}_{m}": _mean([_run_scores(row, kind).get(m) for row in rows])
                  for kind in ("personal", "global") for m in METRICS}
        per_client.append({"client_id": client["client_id"], "description": client["description"],
                           "test_examples": client["test_examples"], "lora_rank": client.get("lora_rank"), **scores})
    entry.update({
        # Exact match per question kind (synthetic scenarios), mean over seeds.
        "personal_accuracy_by_kind": _mean_by_kind([run.get("personal_accuracy_by_kind") or {} for run in runs]),
        "late_joiner_accuracy_by_kind": _mean_by_kind([run.get("late_joiner_accuracy_by_kind") or {} for run in runs]),
        "late_joiner_accuracy": float(np.mean(late)) if late else None,
        "late_joiner_accuracy_std": float(np.std(late)) if late else None,
        "per_client": per_client,
        # References are not federations: nothing is sent.
        "bytes_up_per_client_round": None if reference else up,
        "bytes_down_per_client_round": None if reference else down,
        "rounds": n_rounds,
        "shared_tensors": runs[0]["shared"],
        "seconds": float(sum(run["seconds"] for run in runs)),
        "seeds": [run["seed"] for run in runs],
    })
    return entry


def _mean_by_kind(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {kind: float(np.mean([seed[kind] for seed in per_seed]))
            for kind in per_seed[0] if all(kind in seed for seed in per_seed)} if per_seed else {}


def winners(strategies: Mapping[str, dict]) -> dict[str, list[str]]:
    """Per score, the strategies with the best personal mean, ties included; the references
    (centralised, base) are left out, ``local`` is not (it is the bar federation must clear)."""
    best: dict[str, list[str]] = {}
    candidates = {n: e for n, e in strategies.items() if n not in REFERENCES}
    for metric in METRICS:
        values = {n: e[f"personal_{metric}"] for n, e in candidates.items() if e[f"personal_{metric}"] is not None}
        if values:
            target = (min if metric in LOWER_IS_BETTER else max)(values.values())
            best[metric] = [n for n, v in values.items() if np.isclose(v, target, rtol=0, atol=1e-9)]
    return best


def build_results(settings: SimulationSettings, runs: Mapping[str, Sequence[dict]], version: str) -> dict:
    return {"strategies": {name: summarise(name, rs) for name, rs in runs.items() if rs},
            "args": settings.to_dict(), "version": version}


def _bytes(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1000:.1f} kB" if value else "0"


def _value(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if metric in ("bleu", "perplexity") else f"{value:.3f}"


def markdown(results: dict) -> str:
    args, strategies = results["args"], results["strategies"]
    source = f"scenario `{args['scenario']}`" if args["scenario"] else f"`{args['data']}` split by {args['partition']}"
    objective = args.get("objective", "sft").upper()
    if objective == "DPO":
        objective += f", beta {args['dpo_beta']}"
    shown = [m for m in METRICS if any(m in e["metrics"] for e in strategies.values())]
    first = next(iter(strategies.values()))
    headline = first["headline"]
    lines = [f"# fedvlm simulate: {source}", "",
             f"{args['clients']} clients, {args['rounds']} rounds of {args['local_steps']} local steps "
             f"({objective}), "
             f"fraction {args['fraction']}, seeds {', '.join(map(str, args['seeds']))}; "
             f"fedvlm {results['version']}.", "",
             "Personal scores: each client's model after the last round on its own held-out data, mean over "
             "clients and seeds (± std of the per-seed means). Exact match only where answers are short; "
             "loss and perplexity of the chosen answer per token; preference accuracy: chosen more likely per "
             "token than rejected; reward margin: beta·((log-ratio of chosen) − (log-ratio of rejected)) against "
             "the shared LoRA initialisation; ROUGE-L and BLEU (0-100) of greedy answers against chosen. "
             f"Global: {METRIC_LABELS[headline]} of the same models on a pooled test set of all clients. "
             "Bytes: encoded payloads per client per round.", "",
             "| strategy | " + " | ".join(METRIC_LABELS[m] for m in shown)
             + f" | global {METRIC_LABELS[headline]} | up / client / round | down / client / round | seconds |",
             "| --- |" + " ---: |" * (len(shown) + 4)]
    for name, entry in strategies.items():
        cells = [_value(m, entry[f"personal_{m}"]) + (f" ± {_value(m, entry[f'personal_{m}_std'])}"
                                                       if entry[f"personal_{m}"] is not None else "") for m in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_value(headline, entry[f'global_{headline}'])} | "
                     f"{_bytes(entry['bytes_up_per_client_round'])} | {_bytes(entry['bytes_down_per_client_round'])} "
                     f"| {entry['seconds']:.0f} |")
    best = winners(strategies)
    if best:
        lines += ["", "Best strategy per score (personal; references left out, local counted): "
                  + "; ".join(f"{METRIC_LABELS[m]}: {', '.join(names)}" for m, names in best.items()) + "."]
    lines += kind_table(strategies)
    if any(entry.get("late_joiner_accuracy") is not None for entry in strategies.values()):
        lines += ["", f"Late joiners ({args['late_joiners']} clients that never took part): each takes the final "
                      f"global version and trains only its personal part for {args['late_joiner_steps']} steps on its "
                      "own data (`local`: everything, alone), then is scored on its own test set.", "",
                  "| strategy | late-joiner accuracy | ± |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {entry['late_joiner_accuracy']:.3f} | {entry['late_joiner_accuracy_std']:.3f} |"
                  for name, entry in strategies.items() if entry.get("late_joiner_accuracy") is not None]
    if "plora" in strategies and "fedit" in strategies:
        plora, fedit = strategies["plora"], strategies["fedit"]
        key = f"personal_{headline}"
        relative = (plora[key] / fedit[key] - 1) if plora[key] is not None and fedit[key] else None
        ratio = (plora["bytes_up_per_client_round"] / fedit["bytes_up_per_client_round"]
                 if fedit["bytes_up_per_client_round"] else None)
        lines += ["", f"plora vs fedit: personal {METRIC_LABELS[headline]} "
                      f"{_value(headline, plora[key])} vs {_value(headline, fedit[key])} "
                      f"({'n/a' if relative is None else f'{relative:+.1%} relative'}); "
                      f"plora sends {'n/a' if ratio is None else f'{ratio:.2f}×'} fedit's bytes up per round."]
    lines += ["", f"Per client (personal {METRIC_LABELS[headline]}, mean over seeds):", "",
              "| strategy | " + " | ".join(c["client_id"] for c in first["per_client"]) + " |",
              "| --- |" + " ---: |" * len(first["per_client"])]
    for name, entry in strategies.items():
        lines.append(f"| {name} | " + " | ".join(_value(headline, c[f"personal_{headline}"])
                                                 for c in entry["per_client"]) + " |")
    lines += ["", "Clients: " + "; ".join(f"{c['client_id']}: {c['description']}" for c in first["per_client"])]
    return "\n".join(lines) + "\n"


def kind_table(strategies: Mapping[str, dict]) -> list[str]:
    """Markdown lines: personal exact match per question kind (none when the data has no kinds)."""
    kinds = sorted({kind for entry in strategies.values() for kind in entry.get("personal_accuracy_by_kind") or {}})
    if not kinds:
        return []
    lines = ["", "Personal exact match per question kind (every client's held-out examples of that kind pooled, "
                 "mean over seeds):", "", "| strategy | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
    for name, entry in strategies.items():
        values = entry.get("personal_accuracy_by_kind") or {}
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.3f}" if k in values else "—" for k in kinds) + " |")
    return lines


def save_accuracy_figure(figure, axis, path: Path, *, ncol: int = 1, legend_size: str = "small",
                         bounded: bool = True) -> Path:
    """A score plot's common finish: the 0-1 range (``bounded`` scores), a light grid, the legend;
    saved and closed."""
    import matplotlib.pyplot as plt

    if bounded:
        axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=legend_size, ncol=ncol)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plots(results: dict, runs: Mapping[str, Sequence[dict]], out: Path) -> list[Path]:
    """``personal_accuracy_per_round.png`` and ``accuracy_vs_bytes.png`` (the headline score:
    exact match for short answers, else preference accuracy or ROUGE-L; only when every round
    was scored) and ``scores.png`` (every score that applies, per strategy, ± std over seeds);
    none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return []
    strategies = results["strategies"]
    headline = next(iter(strategies.values()))["headline"]
    bounded = headline not in ("loss", "perplexity", "bleu", "reward_margin")
    every_round = all(v is not None for e in strategies.values() for v in e["personal_per_round"][headline])
    return ([*_round_plots(strategies, runs, out, headline, bounded)] if every_round else []) + [
        _scores_plot(strategies, out)]


def _round_plots(strategies: Mapping[str, dict], runs: Mapping[str, Sequence[dict]], out: Path, headline: str,
                 bounded: bool) -> list[Path]:
    """Per round (only when every round was scored): the headline score, and against bytes sent."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    label = METRIC_LABELS[headline]
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, entry in strategies.items():
        series = entry["personal_per_round"][headline]
        axis.plot(range(1, len(series) + 1), series, marker="o", label=name,
                  linestyle="--" if name in REFERENCES else "-")
    axis.set_xlabel("round")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_ylabel(f"personal {label} (mean over clients, seeds)")
    per_round = save_accuracy_figure(figure, axis, out / "personal_accuracy_per_round.png", ncol=2, bounded=bounded)

    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, entry in strategies.items():
        if name in REFERENCES:
            continue
        # Cumulative bytes one client sent (up) per round, mean over seeds; the score after that round.
        ups = np.mean([np.cumsum([r["bytes_up_per_client"] for r in run["rounds"]]) for run in runs[name]], axis=0)
        axis.plot(ups / 1000, entry["personal_per_round"][headline], marker="o", label=name)
    axis.set_xscale("symlog", linthresh=1.0)
    axis.set_xlabel("kB sent by one client, cumulative over rounds (symlog)")
    axis.set_ylabel(f"personal {label}")
    versus_bytes = save_accuracy_figure(figure, axis, out / "accuracy_vs_bytes.png", bounded=bounded)
    return [per_round, versus_bytes]


def _scores_plot(strategies: Mapping[str, dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

    shown = [m for m in METRICS if any(m in e["metrics"] for e in strategies.values())]
    figure, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown) + 1, 3.6), dpi=120, squeeze=False)
    names = list(strategies)
    for axis, metric in zip(axes[0], shown):
        values = [strategies[n][f"personal_{metric}"] or 0.0 for n in names]
        errors = [strategies[n][f"personal_{metric}_std"] or 0.0 for n in names]
        axis.bar(range(len(names)), values, yerr=errors, capsize=2,
                 color=["0.7" if n in REFERENCES else f"C{i}" for i, n in enumerate(names)])
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
        axis.set_title(METRIC_LABELS[metric] + (" (lower is better)" if metric in LOWER_IS_BETTER else ""),
                       fontsize="small")
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    scores = out / "scores.png"
    figure.savefig(scores)
    plt.close(figure)
    return scores


def write_reports(settings: SimulationSettings, runs: Mapping[str, Sequence[dict]], version: str) -> dict:
    results = build_results(settings, runs, version)
    splits = data_report.load_splits(settings.out)  # --data runs: the partition and the bad rows skipped
    if splits:
        results["data"] = splits
    write_durably(settings.out / "results.json", json.dumps(results, indent=2).encode())
    write_durably(settings.out / "results.md", (markdown(results) + data_report.markdown_section(splits)).encode())
    plots(results, runs, settings.out)
    return results
