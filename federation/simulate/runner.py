"""``fedvlm simulate``: every (strategy, seed) run, resumable, then the reports.

Each finished run is written to ``<out>/runs/<strategy>-seed<k>.json`` atomically, so an
interrupted simulation started again with the same settings skips what is done; the
settings that change results are in ``<out>/simulation.json`` and must match to resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from fedvlm.shared.durable_files import write_durably
from fedvlm.shared.usage_error import UsageError
from fedvlm.simulate import data_report, report
from fedvlm.simulate.clients import data_clients, image_size_of, pooled_test, scenario_clients
from fedvlm.simulate.engine import EncodedData, run
from fedvlm.simulate.settings import DEFAULT_MODEL_DIR, SimulationSettings


def prepare_model(settings: SimulationSettings) -> Path:
    """The base to simulate on: ``settings.model``, else the default seeing base
    (:func:`fedvlm.edge.pretraining.seeing_base_recipe`), built once into ``DEFAULT_MODEL_DIR``."""
    if settings.model is not None:
        from fedvlm.edge.model_loading import check_model_dir

        return check_model_dir(settings.model)
    from fedvlm.edge.pretraining import is_built, make_pretrained_tiny_model, seeing_base_recipe

    recipe = seeing_base_recipe(progress=settings.progress)
    if not is_built(DEFAULT_MODEL_DIR, "small", **recipe):
        print(f"building the pre-trained small model in {DEFAULT_MODEL_DIR} (once; about 9 minutes)", flush=True)
    # The build pins its own thread count (one), whatever settings.threads says: the same recipe
    # must give the same base (fedvlm.edge.pretraining.deterministic_cpu_build).
    return make_pretrained_tiny_model(DEFAULT_MODEL_DIR, "small", **recipe)


def run_file(out: Path, strategy: str, seed: int) -> Path:
    return out / "runs" / f"{strategy}-seed{seed}.json"


def _check_resumable(settings: SimulationSettings, key: dict) -> None:
    marker = settings.out / "simulation.json"
    if marker.exists():
        previous = _previous_settings(marker)
        if previous != key:
            changed = sorted(k for k in set(previous) | set(key) if previous.get(k) != key.get(k))
            raise UsageError(f"{settings.out} holds a simulation with other settings ({', '.join(changed)} differ); "
                             "use another --out, or delete it to start over")
    else:
        write_durably(marker, json.dumps(key, indent=2).encode())


def _previous_settings(marker: Path) -> dict:
    """The settings a simulation in ``--out`` was started with; written atomically by us, so a
    broken one was edited or copied in by hand, and --out is the user's to change."""
    try:
        previous = json.loads(marker.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{marker} is not a simulation's settings ({error}); use another --out, "
                         "or delete it to start over") from None
    if not isinstance(previous, dict):
        raise UsageError(f"{marker} is not a simulation's settings; use another --out, or delete it to start over")
    return previous


def simulate(settings: SimulationSettings, *, reports: bool = True) -> dict | None:
    """Run every (strategy, seed) not already in ``settings.out``, then write the reports; returns
    results.json. ``reports=False``: only the runs (None), for processes that share an ``out``
    (each run writes its own file; a last call writes the reports of them all)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _simulate(settings, reports)
    finally:
        torch.set_num_threads(threads)  # the caller's process as it was


def _simulate(settings: SimulationSettings, reports: bool = True) -> dict | None:
    import transformers

    from fedvlm import __version__

    transformers.utils.logging.disable_progress_bar()  # a loading bar per run would bury the simulation's own
    from fedvlm.edge.model_loading import base_fingerprint

    model_dir = prepare_model(settings)
    # The fingerprint, not just the folder: a base rebuilt in place must not mix with runs on the old one.
    _check_resumable(settings, {**settings.run_key(), "model": str(model_dir),
                                "base_fingerprint": base_fingerprint(model_dir)})
    units_per_run = settings.rounds
    # Seed by seed, so one seed's clients are drawn once and shared by all its strategies.
    todo = [(name, seed) for seed in settings.seeds for name in settings.strategies]
    done = {pair for pair in todo if run_file(settings.out, *pair).exists()}
    bar = tqdm(total=len(todo) * units_per_run, initial=len(done) * units_per_run, unit="round",
               desc="simulate", disable=not settings.progress)
    started = time.perf_counter()
    data_by_seed: dict = {}
    for name, seed in todo:
        if (name, seed) in done:
            continue
        if seed not in data_by_seed:
            if settings.scenario:
                drawn = scenario_clients(settings, seed, image_size_of(model_dir))
            else:
                split = data_clients(settings, seed)
                drawn = split.clients
                data_report.record_split(settings.out, seed, split.summary)
                tqdm.write(data_report.console_text(seed, split.table.markdown(), split.summary))
            # Late joiners (scenarios only) are drawn after the federated clients.
            clients, late = drawn[:settings.clients], drawn[settings.clients:]
            # One seed's data at a time, encoded once for all its strategies.
            data_by_seed = {seed: (clients, late, pooled_test(clients, settings.global_test_size, seed), EncodedData())}
        clients, late, pooled, encoded = data_by_seed[seed]
        bar.set_postfix_str(f"{name} seed {seed}")
        result = run(name, model_dir, settings, seed, clients, pooled, on_round=bar.update, late_joiners=late,
                     encoded=encoded)
        write_durably(run_file(settings.out, name, seed), json.dumps(result.to_dict(), indent=2).encode())
    bar.close()
    if not reports:
        return None
    runs = {name: [json.loads(run_file(settings.out, name, seed).read_text()) for seed in settings.seeds]
            for name in settings.strategies}
    results = report.write_reports(settings, runs, __version__)
    results["elapsed_seconds"] = time.perf_counter() - started
    return results
