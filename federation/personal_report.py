"""Score every client of a finished federation on its own held-out data, three ways.

* ``before``: the base with the federation's fresh LoRA initialisation (B = 0: the base);
* ``personal``: the client's own model after federation (global shared factors + its
  personal factors, as its device keeps them);
* ``shared_only``: the global shared factors with a fresh personal part, i.e. what the
  federation learnt in common, without what stayed on the device.

One model is loaded once; only adapters are swapped between clients.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

from fedvlm.edge.device_state import DeviceState
from fedvlm.edge.personal_model import PersonalVLM
from fedvlm.edge.training import QAExample


@dataclasses.dataclass
class ClientScores:
    client_id: str
    examples: int
    before: float
    personal: float
    shared_only: float
    per_round: list[float]  # the client's own accuracy after its local training, round by round


def score_clients(
    model: PersonalVLM,
    test_sets: Mapping[str, Sequence[QAExample]],
    states: Mapping[str, DeviceState],
) -> list[ClientScores]:
    rows = []
    for client_id, examples in test_sets.items():
        state = states[client_id]
        model.reset_adapters()
        before = model.evaluate(examples).accuracy
        model.restore(state)
        personal = model.evaluate(examples).accuracy
        model.reset_adapters()
        if state.global_state:
            model.apply_global(state.global_state)
        shared_only = model.evaluate(examples).accuracy
        per_round = [m["evaluation"]["accuracy"] for m in state.metrics if m.get("evaluation")]
        rows.append(ClientScores(client_id, len(examples), before, personal, shared_only, per_round))
    model.reset_adapters()
    return rows


def format_table(rows: Sequence[ClientScores]) -> str:
    """A Markdown table a person reads in a terminal or a README."""
    lines = ["| client | test examples | before federation | after pLoRA (personal) | shared model alone |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row.client_id} | {row.examples} | {row.before:.2f} | {row.personal:.2f} | {row.shared_only:.2f} |")
    if rows:
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        lines.append(f"| **mean** | {sum(r.examples for r in rows)} | {mean([r.before for r in rows]):.2f} | "
                     f"{mean([r.personal for r in rows]):.2f} | {mean([r.shared_only for r in rows]):.2f} |")
    return "\n".join(lines)


def plot_rounds(rows: Sequence[ClientScores], out_file: Path, title: str) -> Path | None:
    """Accuracy per round per client, as a PNG (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for row in rows:
        rounds = list(range(0, len(row.per_round) + 1))
        axis.plot(rounds, [row.before] + row.per_round, marker="o", label=row.client_id)
    axis.set_xlabel("round (0: before federation; r: after the device's local training in round r)")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_ylabel("accuracy on the client's own test set")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file)
    plt.close(figure)
    return out_file
