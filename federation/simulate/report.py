"""Per-run results in, what a person reads out: ``results.json``, ``results.md`` and two plots.

Across seeds: a strategy's ``personal_accuracy`` is the mean over clients and seeds;
``personal_accuracy_std`` is the standard deviation of the per-seed means (the spread a
rerun with another seed shows; 0 with one seed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedvlm.shared.durable_files import write_durably
from fedvlm.simulate.settings import REFERENCES, SimulationSettings


def summarise(name: str, runs: Sequence[dict]) -> dict:
    """One strategy's entry of ``results.json`` from its runs (one per seed)."""
    per_seed = [run["personal_accuracy"] for run in runs]
    late = [run["late_joiner_accuracy"] for run in runs if run.get("late_joiner_accuracy") is not None]
    reference = name in REFERENCES
    n_rounds = len(runs[0]["rounds"])
    per_round = [float(np.mean([run["rounds"][r]["personal_accuracy"] for run in runs])) for r in range(n_rounds)]
    up = float(np.mean([r["bytes_up_per_client"] for run in runs for r in run["rounds"]]))
    down = float(np.mean([r["bytes_down_per_client"] for run in runs for r in run["rounds"]]))
    per_client = []
    for index, client in enumerate(runs[0]["per_client"]):
        rows = [run["per_client"][index] for run in runs]
        per_client.append({"client_id": client["client_id"], "description": client["description"],
                           "test_examples": client["test_examples"], "lora_rank": client.get("lora_rank"),
                           "personal_accuracy": float(np.mean([r["personal_accuracy"] for r in rows])),
                           "global_accuracy": float(np.mean([r["global_accuracy"] for r in rows]))})
    return {
        "personal_accuracy": float(np.mean(per_seed)),
        "personal_accuracy_std": float(np.std(per_seed)),
        "personal_accuracy_per_seed": {str(run["seed"]): run["personal_accuracy"] for run in runs},
        "global_accuracy": float(np.mean([run["global_accuracy"] for run in runs])),
        # Clients that never took part, after adapting their personal part (None without late joiners).
        "late_joiner_accuracy": float(np.mean(late)) if late else None,
        "late_joiner_accuracy_std": float(np.std(late)) if late else None,
        "per_client": per_client,
        # References are not federations: nothing is sent.
        "bytes_up_per_client_round": None if reference else up,
        "bytes_down_per_client_round": None if reference else down,
        "rounds": n_rounds,
        "personal_accuracy_per_round": per_round,
        "shared_tensors": runs[0]["shared"],
        "seconds": float(sum(run["seconds"] for run in runs)),
        "seeds": [run["seed"] for run in runs],
    }


def build_results(settings: SimulationSettings, runs: Mapping[str, Sequence[dict]], version: str) -> dict:
    return {"strategies": {name: summarise(name, rs) for name, rs in runs.items() if rs},
            "args": settings.to_dict(), "version": version}


def _bytes(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1000:.1f} kB" if value else "0"


def markdown(results: dict) -> str:
    args, strategies = results["args"], results["strategies"]
    source = f"scenario `{args['scenario']}`" if args["scenario"] else f"`{args['data']}` split by {args['partition']}"
    lines = [f"# fedvlm simulate: {source}", "",
             f"{args['clients']} clients, {args['rounds']} rounds of {args['local_steps']} local steps, "
             f"fraction {args['fraction']}, seeds {', '.join(map(str, args['seeds']))}; "
             f"fedvlm {results['version']}.", "",
             "Personal accuracy: each client's exact-match accuracy on its own held-out data with its own model "
             "after the last round, mean over clients and seeds (± std over seeds). Global: the same models on "
             "a pooled test set of all clients. Bytes: encoded payloads per client per round.", "",
             "| strategy | personal accuracy | ± | global accuracy | up / client / round | down / client / round "
             "| seconds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, entry in strategies.items():
        lines.append(f"| {name} | {entry['personal_accuracy']:.3f} | {entry['personal_accuracy_std']:.3f} | "
                     f"{entry['global_accuracy']:.3f} | {_bytes(entry['bytes_up_per_client_round'])} | "
                     f"{_bytes(entry['bytes_down_per_client_round'])} | {entry['seconds']:.0f} |")
    if any(entry.get("late_joiner_accuracy") is not None for entry in strategies.values()):
        lines += ["", f"Late joiners ({args['late_joiners']} clients that never took part): each takes the final "
                      f"global version and trains only its personal part for {args['late_joiner_steps']} steps on its "
                      "own data (`local`: everything, alone), then is scored on its own test set.", "",
                  "| strategy | late-joiner accuracy | ± |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {entry['late_joiner_accuracy']:.3f} | {entry['late_joiner_accuracy_std']:.3f} |"
                  for name, entry in strategies.items() if entry.get("late_joiner_accuracy") is not None]
    if "plora" in strategies and "fedit" in strategies:
        plora, fedit = strategies["plora"], strategies["fedit"]
        relative = (plora["personal_accuracy"] / fedit["personal_accuracy"] - 1) if fedit["personal_accuracy"] else None
        ratio = (plora["bytes_up_per_client_round"] / fedit["bytes_up_per_client_round"]
                 if fedit["bytes_up_per_client_round"] else None)
        lines += ["", f"plora vs fedit: personal accuracy "
                      f"{'n/a' if relative is None else f'{relative:+.1%} relative'}; "
                      f"plora sends {'n/a' if ratio is None else f'{ratio:.2f}×'} fedit's bytes up per round."]
    first = next(iter(strategies.values()))
    lines += ["", "Per client (personal accuracy, mean over seeds):", "",
              "| strategy | " + " | ".join(c["client_id"] for c in first["per_client"]) + " |",
              "| --- |" + " ---: |" * len(first["per_client"])]
    for name, entry in strategies.items():
        lines.append(f"| {name} | " + " | ".join(f"{c['personal_accuracy']:.2f}" for c in entry["per_client"]) + " |")
    lines += ["", "Clients: " + "; ".join(f"{c['client_id']}: {c['description']}" for c in first["per_client"])]
    return "\n".join(lines) + "\n"


def save_accuracy_figure(figure, axis, path: Path, *, ncol: int = 1, legend_size: str = "small") -> Path:
    """An accuracy plot's common finish: the 0-1 range, a light grid, the legend; saved and closed."""
    import matplotlib.pyplot as plt

    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=legend_size, ncol=ncol)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plots(results: dict, runs: Mapping[str, Sequence[dict]], out: Path) -> list[Path]:
    """``personal_accuracy_per_round.png`` and ``accuracy_vs_bytes.png`` (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return []
    strategies = results["strategies"]
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, entry in strategies.items():
        series = entry["personal_accuracy_per_round"]
        axis.plot(range(1, len(series) + 1), series, marker="o", label=name,
                  linestyle="--" if name in REFERENCES else "-")
    axis.set_xlabel("round")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_ylabel("personal accuracy (mean over clients, seeds)")
    per_round = save_accuracy_figure(figure, axis, out / "personal_accuracy_per_round.png", ncol=2)

    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, entry in strategies.items():
        if name in REFERENCES:
            continue
        # Cumulative bytes one client sent (up) per round, mean over seeds; accuracy after that round.
        ups = np.mean([np.cumsum([r["bytes_up_per_client"] for r in run["rounds"]]) for run in runs[name]], axis=0)
        axis.plot(ups / 1000, entry["personal_accuracy_per_round"], marker="o", label=name)
    axis.set_xscale("symlog", linthresh=1.0)
    axis.set_xlabel("kB sent by one client, cumulative over rounds (symlog)")
    axis.set_ylabel("personal accuracy")
    versus_bytes = save_accuracy_figure(figure, axis, out / "accuracy_vs_bytes.png")
    return [per_round, versus_bytes]


def write_reports(settings: SimulationSettings, runs: Mapping[str, Sequence[dict]], version: str) -> dict:
    results = build_results(settings, runs, version)
    write_durably(settings.out / "results.json", json.dumps(results, indent=2).encode())
    write_durably(settings.out / "results.md", markdown(results).encode())
    plots(results, runs, settings.out)
    return results
