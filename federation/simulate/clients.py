"""The simulated clients' data: a built-in synthetic scenario, or RLAIF-V records split by a partition.

Every split is a function of the seed, so all strategies of one seed see the same clients.
The pooled test set (for ``global_accuracy``) is drawn from all clients' held-out records.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from fedvlm.shared.usage_error import UsageError
from fedvlm.simulate.settings import Partition, SimulationSettings


@dataclasses.dataclass
class SimulatedClient:
    client_id: str
    train: list
    test: list
    description: str  # e.g. "french, mirrored camera" or "VQAv2, OKVQA"


def scenario_clients(settings: SimulationSettings, seed: int, image_size: int) -> list[SimulatedClient]:
    """Clients of a built-in synthetic scenario (``fedvlm.edge.data``), drawn for ``seed``: the
    federated ones, then ``settings.late_joiners`` more."""
    from fedvlm.edge.data import ScenarioConfig, generate_federation

    config = ScenarioConfig.preset(settings.scenario, n_clients=settings.clients + settings.late_joiners,
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


def data_clients(settings: SimulationSettings, seed: int) -> list[SimulatedClient]:
    """``settings.data`` split into ``settings.clients`` clients, each with a held-out test share."""
    from fedvlm.edge.data import DataError, load_records

    try:
        records = load_records(settings.data).records
    except DataError as problem:
        raise UsageError(str(problem)) from None
    rng = np.random.default_rng([seed, 17])
    shares = partition(records, settings.partition, settings.clients, rng)
    clients = []
    for index, share in enumerate(shares):
        if len(share) < 2:
            raise UsageError(f"--partition {settings.partition} gave client {index} only {len(share)} record(s) of "
                             f"{len(records)}: it needs one to train and one to test; use fewer --clients, a larger "
                             "ALPHA or more data")
        order = rng.permutation(len(share))
        n_test = min(max(1, round(settings.test_fraction * len(share))), len(share) - 1)
        test = [share[i] for i in order[:n_test]]
        train = [share[i] for i in order[n_test:]]
        origins = sorted({r.origin_dataset or "unnamed" for r in share})
        clients.append(SimulatedClient(f"client_{index:02d}", train, test, ", ".join(origins[:3])
                                       + (f" (+{len(origins) - 3})" if len(origins) > 3 else "")))
    return clients


def partition(records: Sequence, how: Partition, n_clients: int, rng: np.random.Generator) -> list[list]:
    """Split records into ``n_clients`` lists.

    - ``origin_dataset``: each source data set goes whole to one client (sources sorted by
      name, dealt round robin), so clients differ in task; needs as many sources as clients.
    - ``iid``: a seeded shuffle dealt evenly.
    - ``dirichlet:ALPHA``: per source data set, client shares drawn from Dirichlet(ALPHA)
      (the usual label-skew partition, with the source as the label).
    """
    by_origin: dict[str, list] = defaultdict(list)
    for record in records:
        by_origin[record.origin_dataset or "unnamed"].append(record)
    if how.kind == "origin_dataset":
        origins = sorted(by_origin)
        if len(origins) < n_clients:
            raise UsageError(f"--partition origin_dataset needs at least one source data set per client: the data "
                             f"has {len(origins)} ({', '.join(origins[:5])}) for {n_clients} clients; use fewer "
                             "--clients or --partition dirichlet:ALPHA / iid")
        shares: list[list] = [[] for _ in range(n_clients)]
        for index, origin in enumerate(origins):
            shares[index % n_clients].extend(by_origin[origin])
        return shares
    if how.kind == "iid":
        order = rng.permutation(len(records))
        return [[records[i] for i in order[k::n_clients]] for k in range(n_clients)]
    shares = [[] for _ in range(n_clients)]
    for origin in sorted(by_origin):
        group = by_origin[origin]
        order = rng.permutation(len(group))
        cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, how.alpha))) * len(group)).astype(int)[:-1]
        for client, part in enumerate(np.split(order, cuts)):
            shares[client].extend(group[i] for i in part)
    return shares


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
