"""The simulated clients' data: a built-in synthetic scenario, or RLAIF-V shards split by a partition.

Every split is a function of the seed, so all strategies of one seed see the same clients.
The pooled test set (for ``global_accuracy``) is drawn from all clients' held-out records.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fedvlm.edge.data.partitioning import PartitionTable, client_shares, key_value
from fedvlm.shared.usage_error import UsageError
from fedvlm.simulate.settings import SimulationSettings

if TYPE_CHECKING:
    from fedvlm.edge.data import DataIndex


@dataclasses.dataclass
class SimulatedClient:
    client_id: str
    train: list
    test: list
    description: str  # e.g. "french, mirrored camera" or "VQAv2, OKVQA"


def scenario_clients(settings: SimulationSettings, seed: int, image_size: int) -> list[SimulatedClient]:
    """Clients of a built-in synthetic scenario (``fedvlm.edge.data``), drawn for ``seed``."""
    from fedvlm.edge.data import ScenarioConfig, generate_federation

    config = ScenarioConfig.preset(settings.scenario, n_clients=settings.clients,
                                   examples_per_client=settings.examples_per_client,
                                   test_examples_per_client=settings.test_examples_per_client,
                                   common_test_examples=0, image_size=image_size, seed=seed)
    federation = generate_federation(config)
    clients = []
    for client in federation.clients:
        convention = client.convention
        about = convention.description
        if client.profile.main_question_kind:
            about += f", mostly {client.profile.main_question_kind} questions"
        clients.append(SimulatedClient(client.client_id, client.train, client.test, about))
    return clients


@dataclasses.dataclass
class DataSplit:
    """One seed's split of ``--data``: the clients, and what the reports say about it."""

    clients: list[SimulatedClient]
    table: PartitionTable
    summary: dict  # partition, rows, the client x source table, bad rows skipped per reason


def data_clients(settings: SimulationSettings, seed: int) -> DataSplit:
    """``settings.data`` split into ``settings.clients`` clients, each with a held-out test share.

    The shards are scanned once without their images (cached across seeds); the split, the
    ``max_examples`` and ``max_per_client`` samples are drawn over row references, and only
    the rows the clients keep are read, so memory follows the clients' samples, not the shards.
    """
    from fedvlm.edge.data import DataError

    try:
        index = _scanned(settings.data, _files_state(settings.data), _needs_rejected(settings), settings.skip_bad,
                         settings.progress).fresh_tally()
        rng = np.random.default_rng([seed, 17])
        shares = client_shares(index.rows, settings.partition, settings.clients, rng,
                               max_examples=settings.max_examples, max_per_client=settings.max_per_client)
        loaded = index.load_by_place((ref for share in shares for ref in share), progress=settings.progress)
    except DataError as problem:
        raise UsageError(str(problem)) from None
    kept = [[loaded[ref.file, ref.number] for ref in share if (ref.file, ref.number) in loaded] for share in shares]
    ids = [f"client_{number:02d}" for number in range(settings.clients)]
    key = settings.partition.key  # iid is shown by origin_dataset, the default key
    table = PartitionTable.of(kept, key, ids)
    clients = []
    for client_id, share in zip(ids, kept):
        if len(share) < 2:
            raise UsageError(f"--partition {settings.partition} gave {client_id} only {len(share)} record(s) of "
                             f"{len(index.rows)}: it needs one to train and one to test; use fewer --clients, a larger "
                             "ALPHA, a larger --max-per-client or more data")
        order = rng.permutation(len(share))
        n_test = min(max(1, round(settings.test_fraction * len(share))), len(share) - 1)
        test = [share[i] for i in order[:n_test]]
        train = [share[i] for i in order[n_test:]]
        values = sorted({key_value(r, key) for r in share})
        clients.append(SimulatedClient(client_id, train, test, ", ".join(values[:3])
                                       + (f" (+{len(values) - 3})" if len(values) > 3 else "")))
    summary = {"partition": str(settings.partition), "files": len(index.files), "rows_usable": len(index.rows),
               "rows_kept": sum(map(len, kept)), "table": table.to_dict(),
               "skipped": index.skipped.to_dict()}
    return DataSplit(clients, table, summary)


def _needs_rejected(settings: SimulationSettings) -> bool:
    """Preference objectives train on (chosen, rejected): a row without ``rejected`` is bad for them."""
    return getattr(settings, "objective", "sft") == "dpo"


def _files_state(data: Path) -> tuple:
    """The data files with their sizes and times: a changed file is scanned again."""
    from fedvlm.edge.data.file_rows import data_files

    return tuple((str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in data_files(data))


@functools.lru_cache(maxsize=1)
def _scanned(data: Path, files_state: tuple, require_rejected: bool, skip_bad: bool, progress: bool) -> "DataIndex":
    """One scan of the shards per simulation: every seed draws its split from the same index."""
    from fedvlm.edge.data import scan_data

    return scan_data(data, require_rejected=require_rejected, skip_bad=skip_bad, progress=progress)


def pooled_test(clients: Sequence[SimulatedClient], size: int, seed: int) -> list:
    """Up to ``size`` examples drawn evenly from all clients' test sets (the global test set)."""
    rng = np.random.default_rng([seed, 29])
    pool = [record for client in clients for record in client.test]
    if len(pool) <= size:
        return pool
    return [pool[i] for i in sorted(rng.choice(len(pool), size, replace=False))]


def image_size_of(model_dir: Path) -> int:
    """The square image size the model's vision tower takes (synthetic pictures are drawn at it)."""
    import json

    from fedvlm.edge.data.scenes import MIN_IMAGE_SIZE

    config = json.loads((model_dir / "config.json").read_text())
    size = config.get("vision_config", {}).get("image_size", 64)
    size = max(size) if isinstance(size, (list, tuple)) else int(size)  # InternVL gives [height, width]
    # Families that tile or resize (Idefics3, Qwen2-VL) take any picture; shapes need some pixels.
    return max(size, MIN_IMAGE_SIZE)
