"""What a hub worker takes from its coordinator: the federation's settings, and its connection.

The coordinator (``fedvlm-hub start``) stores the settings that decide how an update is
judged and counted (strategy, LoRA layout, limits, norm bound, rounds) in the state
directory; a worker reads them, so it cannot judge by other rules than the hub's. Only
the connection (broker, login, TLS, secrets key) comes from the worker's own flags or
config file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from .config import HubConfig, read_toml
from .console import Console
from .errors import HubConfigError, HubError
from .store import HubStore

__all__ = ["DEFAULT_GROUP", "SETTINGS_META_KEY", "federation_settings", "worker_config"]

# The shared subscription group of a federation's workers (``$share/<group>/...``).
DEFAULT_GROUP = "fedvlm-workers"

# The coordinator's federation settings, stored for its workers (meta table).
SETTINGS_META_KEY = "federation_settings"
# What decides how an update is judged and counted: a worker takes these from the coordinator.
_JUDGING_FIELDS = ("federation", "strategy", "strategy_options", "rounds", "min_clients", "fraction", "quorum",
                   "round_timeout_s", "selection_seed", "chunk_size", "max_update_bytes", "lora", "base_fingerprint",
                   "max_update_norm", "norm_factor", "norm_action", "max_sample_count", "clients_per_round",
                   "inflight_window", "commit_batch", "reassembly_slots")
_CONNECTION_FIELDS = ("broker", "username", "password", "ca_file", "cert_file", "key_file", "secrets_key_file")
_SETTINGS_WAIT_S = 60.0


def federation_settings(config: HubConfig) -> str:
    """The coordinator's judging settings as JSON, for ``worker_config``."""
    values: dict[str, Any] = {field: getattr(config, field) for field in _JUDGING_FIELDS}
    values["lora"] = config.lora.to_dict()
    values["strategy_options"] = dict(config.strategy_options)
    return json.dumps(values, sort_keys=True)


def worker_config(config_file: str | None, connection: Mapping[str, Any], *, console: Console,
                  wait_s: float = _SETTINGS_WAIT_S) -> HubConfig:  # fmt: skip
    """A worker's configuration: the coordinator's stored settings, the connection from
    ``connection`` (flags; None: not given) over ``config_file``'s.

    Waits up to ``wait_s`` for a coordinator that has not stored its settings yet.
    """
    file_values = read_toml(config_file) if config_file is not None else {}
    given = {key: value for key, value in connection.items() if value is not None}
    values = {key: file_values[key] for key in (*_CONNECTION_FIELDS, "state_dir") if key in file_values}
    values.update({key: value for key, value in given.items() if key != "federation"})
    if values.get("broker") is None:
        raise HubConfigError("hub workers need an MQTT 5 broker with shared subscriptions, which the embedded broker "
                             "lacks: run mosquitto 2 or EMQX and pass --broker mqtt://HOST:PORT to `fedvlm-hub start "
                             "--workers N` and to every worker")  # fmt: skip
    state_dir = values.get("state_dir")
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        with HubStore.in_state_dir(state_dir, create=False) as store:
            stored = store.get_meta(SETTINGS_META_KEY)
        if stored is not None or time.monotonic() >= deadline:
            break
        if not told:
            console.event(f"waiting for the coordinator (`fedvlm-hub start --workers N`) to store its settings in "
                          f"{state_dir}")  # fmt: skip
            told = True
        time.sleep(0.2)
    if stored is None:
        raise HubError(f"no coordinator has run on {state_dir}: start `fedvlm-hub start --workers N --broker URL "
                       f"--state-dir {state_dir}` first; workers take its settings")  # fmt: skip
    settings = json.loads(stored)
    federation = given.get("federation") or file_values.get("federation")
    if federation is not None and federation != settings["federation"]:
        raise HubConfigError(f"the state dir {state_dir} holds federation {settings['federation']!r}, not "
                             f"{federation!r}; pass the coordinator's --state-dir")  # fmt: skip
    return HubConfig.from_mapping({**settings, **values})
