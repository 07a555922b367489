"""The hub's configuration: one dataclass, loadable from a TOML file, overridable by flags.

A TOML file uses the field names of :class:`HubConfig` as top-level keys and a ``[lora]``
table with the fields of :class:`~fedvlm.shared.lora_config.LoraSettings`::

    federation = "clinic-vqa"
    strategy = "plora"
    rounds = 3
    min_clients = 3
    quorum = 2
    round_timeout_s = 300
    state_dir = "hub-state"          # relative paths are relative to this file
    # broker = "mqtts://broker.example:8883"   (omit for the embedded broker)
    local_steps = 20
    learning_rate = 0.0005
    objective = "dpo"                # or "sft" (the default); devices train with it
    dpo_beta = 0.1

    [lora]
    r = 8
    alpha = 16
    init_seed = 0

    [strategy_options]               # the strategy's parameters (see its class), e.g.
    refit_steps = 2                  # for plora

Unknown keys are an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.mqtt_link import BrokerAddress
from fedvlm.shared.objective_names import DEFAULT_DPO_BETA, DEFAULT_OBJECTIVE, check_objective
from fedvlm.shared.protocol import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ProtocolError,
    validate_federation_id,
)
from fedvlm.shared.strategies import DEFAULT_STRATEGY, STRATEGY_NAMES, Strategy, build_strategy
from fedvlm.shared.usage_error import UsageError

from .errors import HubConfigError
from .norm_bound import DEFAULT_NORM_FACTOR, NORM_ACTIONS, NormBoundRule

__all__ = ["HubConfig", "DEFAULT_STATE_DIR", "DEFAULT_EMBEDDED_PORT", "load_config", "read_toml"]

DEFAULT_STATE_DIR = Path("fedvlm-hub")
DEFAULT_EMBEDDED_PORT = 1883
# Keys whose values are file paths: relative ones in a TOML file are relative to that file.
_PATH_KEYS = ("state_dir", "ca_file", "cert_file", "key_file", "secrets_key_file")


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """Everything ``fedvlm-hub start`` needs. Every field has a usable default.

    Attributes:
        federation: federation id; the topic root is ``fedvlm/v1/<federation>/``.
        strategy: aggregation strategy (``fedvlm.shared.strategies.STRATEGY_NAMES``: ``plora``,
            ``fedit``, ``ffa``, ``fedsa``, ``fedex``, ``local``, ``rank-split``, ...).
        strategy_options: the strategy's parameters (its class's docstring lists them), a
            ``[strategy_options]`` table; announced to every device, so all build the same
            strategy. Options that change what travels are part of the layout hash.
        rounds: rounds to run, then stop; None runs forever.
        min_clients: registered clients that must be online before a round opens.
        fraction: share of the online clients selected per round (at least ``min_clients``
            and ``quorum`` are selected, never more than are online).
        clients_per_round: at most this many clients per round, sampled from those online
            (None: as many as ``fraction`` gives); no limit on how many are registered.
        quorum: accepted updates needed to aggregate when the deadline passes. None means
            half of the round's selected clients, rounded up (at least 1): with 3 selected,
            2 must answer. A round whose every selected client answered aggregates at once.
        round_timeout_s: seconds from opening a round to its deadline.
        selection_seed: seed of the per-round client sampling (reproducible selections).
        state_dir: SQLite database, accepted updates and global checkpoints.
        broker: ``mqtt://host:port`` or ``mqtts://…`` of an existing broker; None starts an
            embedded broker on ``embedded_host:embedded_port``.
        username, password, ca_file, cert_file, key_file: broker login and TLS files.
        secrets_key_file: the key that encrypts client secrets in the state database
            (default: ``$FEDVLM_HUB_SECRETS_KEY_FILE``, else ``secrets.key`` in the state dir).
        mqtt_protocol: ``auto`` (MQTT 5, falling back to 3.1.1), ``5`` or ``3.1.1``; the
            embedded broker always uses 3.1.1.
        embedded_host, embedded_port: where the embedded broker listens (loopback by default).
        chunk_size: payload bytes per chunk of a published global version.
        max_update_bytes: largest signed update accepted (bigger ones are refused as
            ``too_large`` from their first chunk, before any memory is allocated).
        lora: the LoRA layout every client must use; announced in the round config.
        base_fingerprint: base model clients must use; None pins the first accepted update's.
        local_steps, learning_rate: training hints for clients, put in the round config.
        objective, dpo_beta: what every device's local training minimises, ``sft`` (on the
            chosen answer) or ``dpo`` (chosen against rejected) with DPO's beta; announced in the
            round config, and devices follow it.
        done_linger_s: with the embedded broker, how long the hub keeps it running after
            the last round so clients can fetch the last global version (it stops sooner
            once every client has gone offline).
        max_update_norm: absolute bound on how far one update may move the shared factors
            (L2 norm of update - global over all its tensors); None: no absolute bound.
        norm_factor: relative bound, this many times the previous round's median update
            norm (default 5); 0 turns it off. See ``fedvlm.hub.norm_bound``.
        norm_action: ``clip`` (default) an update over the bound onto it, or ``reject`` it.
        workers: hub workers (``fedvlm-hub worker``) take the updates through an MQTT 5
            shared subscription; this hub then only coordinates: it opens rounds, sees the
            answers in the database and merges the workers' partial sums. 0: it takes the
            updates itself.
        keep_updates: also keep every accepted update's body as a file in the state dir
            (for audits); by default only the round's running sum is kept, committed with
            the receipts, so disk does not grow with the number of devices.
        inflight_window: update chunks the hub holds unacknowledged at once. On MQTT 5 it
            is sent to the broker as the receive maximum (the broker's flow control); on
            MQTT 3.1.1 set it at or below the broker's own window (mosquitto:
            ``max_inflight_messages``).
        reassembly_slots: updates reassembled at once (their chunks in memory); a new update
            beyond them is refused as ``overloaded`` with a retry hint, and its device sends
            it again later.
        commit_batch: accepted updates committed to SQLite in one transaction (group
            commit); their acks go out once the batch is committed.
        max_sample_count: an update's claimed sample count, its weight in the mean, counts
            as at most this many (None: no bound). Together with norm bounding it caps how
            far one client can pull a round: a client cannot buy weight by overstating.
    """

    federation: str = "default"
    strategy: str = DEFAULT_STRATEGY
    strategy_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rounds: int | None = None
    min_clients: int = 2
    fraction: float = 1.0
    quorum: int | None = None
    round_timeout_s: float = 600.0
    selection_seed: int = 0
    state_dir: Path = DEFAULT_STATE_DIR
    broker: str | None = None
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    secrets_key_file: str | None = None
    mqtt_protocol: str = "auto"
    embedded_host: str = "127.0.0.1"
    embedded_port: int = DEFAULT_EMBEDDED_PORT
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_update_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    base_fingerprint: str | None = None
    local_steps: int | None = None
    learning_rate: float | None = None
    objective: str = DEFAULT_OBJECTIVE
    dpo_beta: float = DEFAULT_DPO_BETA
    done_linger_s: float = 30.0
    max_update_norm: float | None = None
    norm_factor: float = DEFAULT_NORM_FACTOR
    norm_action: str = "clip"
    max_sample_count: int | None = None
    clients_per_round: int | None = None
    keep_updates: bool = False
    inflight_window: int = 1024
    commit_batch: int = 64
    workers: int = 0
    reassembly_slots: int = 64

    def __post_init__(self) -> None:
        try:
            validate_federation_id(self.federation)
        except ProtocolError as error:
            raise HubConfigError(f"federation: {error}") from None
        if self.strategy not in STRATEGY_NAMES:
            raise HubConfigError(f"strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGY_NAMES)}")
        _check_int("rounds", self.rounds, minimum=1, optional=True)
        _check_int("min_clients", self.min_clients, minimum=1)
        _check_number("fraction", self.fraction, above=0.0)
        if self.fraction > 1:
            raise HubConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        _check_int("quorum", self.quorum, minimum=1, optional=True)
        _check_number("round_timeout_s", self.round_timeout_s, above=0.0)
        _check_int("selection_seed", self.selection_seed, minimum=0)
        _check_int("clients_per_round", self.clients_per_round, minimum=1, optional=True)
        _check_int("inflight_window", self.inflight_window, minimum=2)
        if self.inflight_window > 65535:
            raise HubConfigError(f"inflight_window must be at most 65535 (MQTT's receive maximum), "
                                 f"got {self.inflight_window}")
        _check_int("commit_batch", self.commit_batch, minimum=1)
        _check_int("workers", self.workers, minimum=0)
        if self.workers and self.broker is None:
            raise HubConfigError("workers need an MQTT 5 broker with shared subscriptions, which the embedded broker "
                                 "lacks: run mosquitto 2 or EMQX and pass --broker mqtt://HOST:PORT")  # fmt: skip
        _check_int("reassembly_slots", self.reassembly_slots, minimum=1)
        if not isinstance(self.keep_updates, bool):
            raise HubConfigError(f"keep_updates must be true or false, got {self.keep_updates!r}")
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.broker is not None:
            _check_text("broker", self.broker)
            if not self.broker.startswith(("mqtt://", "mqtts://", "tcp://", "ssl://")):
                raise HubConfigError(f"broker {self.broker!r} must be a URL such as mqtt://127.0.0.1:1883 "
                                     "or mqtts://broker.example:8883")  # fmt: skip
        for key in ("username", "password", "ca_file", "cert_file", "key_file", "secrets_key_file", "base_fingerprint"):
            if getattr(self, key) is not None:
                _check_text(key, getattr(self, key))
        if self.key_file and not self.cert_file:
            raise HubConfigError("key_file needs cert_file (the client certificate it belongs to)")
        if self.mqtt_protocol not in ("auto", "5", "3.1.1"):
            raise HubConfigError(f"mqtt_protocol must be auto, 5 or 3.1.1, got {self.mqtt_protocol!r}")
        _check_text("embedded_host", self.embedded_host)
        _check_int("embedded_port", self.embedded_port, minimum=1)
        if self.embedded_port > 65535:
            raise HubConfigError(f"embedded_port must be at most 65535, got {self.embedded_port}")
        _check_int("chunk_size", self.chunk_size, minimum=MIN_CHUNK_SIZE)
        if self.chunk_size > MAX_CHUNK_SIZE:
            raise HubConfigError(f"chunk_size must be at most {MAX_CHUNK_SIZE} bytes, got {self.chunk_size}")
        _check_int("max_update_bytes", self.max_update_bytes, minimum=MIN_CHUNK_SIZE)
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", _lora_from_mapping(self.lora))
        if not isinstance(self.lora, LoraSettings):
            raise HubConfigError(f"lora must be LoRA settings (a [lora] table), got {self.lora!r}")
        _check_int("local_steps", self.local_steps, minimum=1, optional=True)
        if self.learning_rate is not None:
            _check_number("learning_rate", self.learning_rate, above=0.0)
        try:
            check_objective(self.objective, self.dpo_beta)
        except UsageError as error:
            raise HubConfigError(str(error).replace("--dpo-beta", "dpo_beta").replace("--objective", "objective")) \
                from None
        _check_number("done_linger_s", self.done_linger_s, above=0.0, allow_equal=True)
        if self.max_update_norm is not None:
            _check_number("max_update_norm", self.max_update_norm, above=0.0)
        _check_number("norm_factor", self.norm_factor, above=0.0, allow_equal=True)
        _check_int("max_sample_count", self.max_sample_count, minimum=1, optional=True)
        if self.norm_action not in NORM_ACTIONS:
            raise HubConfigError(f"norm_action must be one of {', '.join(NORM_ACTIONS)}, got {self.norm_action!r}")
        if not isinstance(self.strategy_options, Mapping):
            raise HubConfigError(f"strategy_options must be a table of the strategy's options, got "
                                 f"{self.strategy_options!r}")  # fmt: skip
        object.__setattr__(self, "strategy_options", dict(self.strategy_options))
        self.build_strategy()  # unknown options, or options that do not fit the LoRA layout

    def build_strategy(self) -> Strategy:
        """The federation's strategy: ``strategy`` with ``strategy_options`` resolved against ``lora``."""
        try:
            return build_strategy(self.strategy, self.strategy_options, self.lora)
        except UsageError as error:
            raise HubConfigError(f"strategy_options: {error}") from None

    # ------------------------------------------------------------------ derived values
    @property
    def norm_bound(self) -> NormBoundRule:
        """The norm-bounding rule for each update (see ``fedvlm.hub.norm_bound``)."""
        return NormBoundRule(max_update_norm=self.max_update_norm, norm_factor=self.norm_factor,
                             action=self.norm_action)  # fmt: skip

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker is None

    def broker_address(self) -> BrokerAddress:
        """The broker with the login and TLS settings (what ``MqttLink`` connects to)."""
        return BrokerAddress.parse(self.broker_url(), username=self.username, password=self.password,
                                   ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)

    def broker_url(self) -> str:
        """The broker the hub connects to (the embedded one when ``broker`` is None)."""
        return self.broker if self.broker is not None else f"mqtt://{self.embedded_host}:{self.embedded_port}"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HubConfig:
        """Build from plain values (a parsed TOML file, flags); unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise HubConfigError(f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except TypeError as error:  # a value of the wrong type reaching a comparison
            raise HubConfigError(f"invalid hub configuration: {error}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a dict of HubConfig fields, paths made relative to the file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise HubConfigError(f"config file {path} does not exist") from None
    except OSError as error:  # a folder, or a file this user may not read
        raise HubConfigError(f"cannot read config file {path}: {error.strerror}; pass a readable TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:  # TOML files are UTF-8
        raise HubConfigError(f"config file {path} is not valid TOML: {error}") from None
    base = path.resolve().parent
    for key in _PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            values[key] = str(base / value)
        elif isinstance(value, str):
            values[key] = str(Path(value).expanduser())
    if "lora" in values and not isinstance(values["lora"], dict):
        raise HubConfigError(f"config file {path}: 'lora' must be a table ([lora] with r, alpha, …)")
    if "strategy_options" in values and not isinstance(values["strategy_options"], dict):
        raise HubConfigError(f"config file {path}: 'strategy_options' must be a table ([strategy_options] with the "
                             "strategy's options)")  # fmt: skip
    return values


def load_config(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                lora_overrides: Mapping[str, Any] | None = None,
                strategy_option_overrides: Mapping[str, Any] | None = None) -> HubConfig:  # fmt: skip
    """The TOML file's settings (if any) with ``overrides`` on top; ``None`` overrides are ignored.

    ``lora_overrides`` replace single fields of the ``[lora]`` table (e.g. ``{"r": 16}``),
    ``strategy_option_overrides`` single entries of ``[strategy_options]``. A ``strategy``
    override that names another strategy than the file drops the file's options (they
    were another strategy's).
    """
    values = read_toml(config_file) if config_file is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if "strategy" in given and given["strategy"] != values.get("strategy", given["strategy"]):
        values.pop("strategy_options", None)
    values.update(given)
    if strategy_option_overrides:
        values["strategy_options"] = {**values.get("strategy_options", {}), **strategy_option_overrides}
    lora_changes = {key: value for key, value in (lora_overrides or {}).items() if value is not None}
    if lora_changes:
        lora = values.get("lora", {})
        lora = lora.to_dict() if isinstance(lora, LoraSettings) else dict(lora)
        lora.update(lora_changes)
        values["lora"] = lora
    return HubConfig.from_mapping(values)


def _lora_from_mapping(values: Mapping[str, Any]) -> LoraSettings:
    try:
        return LoraSettings.from_dict(values)
    except (TypeError, ValueError) as error:
        raise HubConfigError(f"lora: {error}") from None


def _check_int(key: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise HubConfigError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise HubConfigError(f"{key} must be at least {minimum}, got {value}")


def _check_number(key: str, value: Any, *, above: float, allow_equal: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HubConfigError(f"{key} must be a finite number, got {value!r}")
    if value < above or (value == above and not allow_equal):
        relation = "at least" if allow_equal else "greater than"
        raise HubConfigError(f"{key} must be {relation} {above:g}, got {value}")


def _check_text(key: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise HubConfigError(f"{key} must be a non-empty string, got {value!r}")
