"""``fedvlm-hub``: run a federation's hub, manage its clients, show its status.

    fedvlm-hub start [--config hub.toml] [--broker URL] [--federation NAME] [--rounds N] ...
    fedvlm-hub clients add NAME        # prints the new secret alone on the last line
    fedvlm-hub clients list
    fedvlm-hub clients revoke NAME
    fedvlm-hub status [--json]
    fedvlm-hub broker-config --out DIR # password file, ACL and TLS config for a production mosquitto
    fedvlm-hub worker --broker URL --index I --workers N   # a share of the uploads (MQTT 5 shared subscription)

Every sub-command takes ``--state-dir`` (default ``./fedvlm-hub``) and ``--config``
(whose ``state_dir`` is used when ``--state-dir`` is not given).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from fedvlm.shared.cli_support import (
    add_lora_target_options,
    lora_target_fields,
    parse_option,
    read_secret_file,
    run_command,
)
from fedvlm.shared.strategies import STRATEGY_NAMES
from fedvlm.shared.objective_names import OBJECTIVE_NAMES

from .config import DEFAULT_STATE_DIR, HubConfig, load_config, read_toml
from .errors import HubConfigError, user_errors

PROGRAM = "fedvlm-hub"
PASSWORD_ENVIRONMENT = "FEDVLM_BROKER_PASSWORD"
_SECRETS_KEY_HELP = ("key file that encrypts the client secrets in the state database (default: "
                     "$FEDVLM_HUB_SECRETS_KEY_FILE, else secrets.key in the state dir; created with the first client)")

_START_EPILOG = """\
Settings come from the TOML file (--config), then the flags on top. TOML keys are the
HubConfig field names (federation, strategy, rounds, min_clients, fraction, quorum,
round_timeout_s, selection_seed, state_dir, broker, username, password, ca_file,
cert_file, key_file, secrets_key_file, mqtt_protocol, embedded_host, embedded_port, chunk_size,
max_update_bytes, base_fingerprint, local_steps, learning_rate, objective, dpo_beta, done_linger_s,
max_update_norm, norm_factor, norm_action, max_sample_count, clients_per_round,
keep_updates, inflight_window, commit_batch, reassembly_slots, workers) plus a
[lora] table (r, alpha, dropout, parts, layers, target_modules, init_seed) and a
[strategy_options] table (the strategy's parameters, listed in its class's docstring).
Without --broker the hub starts an embedded MQTT 3.1.1 broker on 127.0.0.1:--port.
The broker password may also come from a file (--password-file, so it never shows in
`ps`) or the environment variable FEDVLM_BROKER_PASSWORD.
Stop with Ctrl-C or SIGTERM: the hub publishes its offline state and exits.
"""


def build_parser() -> argparse.ArgumentParser:
    from fedvlm import __version__

    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="FedVLM hub: aggregates the shared LoRA factors of a federation's devices and "
                    "broadcasts the global ones over MQTT.",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    start = commands.add_parser("start", help="run the federation's rounds", description="Run the hub: wait for "
                                "clients, open rounds, collect signed updates, aggregate, publish global versions.",
                                epilog=_START_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_state_arguments(start)
    federation = start.add_argument_group("federation")
    federation.add_argument("--federation", help="federation id (default: default)")
    federation.add_argument("--strategy", choices=STRATEGY_NAMES, help="aggregation strategy (default: plora)")
    federation.add_argument("--strategy-option", dest="strategy_options", action="append", type=parse_option,
                            metavar="KEY=VALUE", help="a parameter of the strategy, e.g. shared_rank=4 for rank-split "
                            "or refit_steps=2 for plora (repeatable; VALUE is read as JSON, else as text)")
    federation.add_argument("--rounds", type=int, help="rounds to run, then exit (default: run forever)")
    federation.add_argument("--min-clients", type=int, help="online clients needed to open a round (default: 2)")
    federation.add_argument("--fraction", type=float, help="share of online clients selected per round (default: 1)")
    federation.add_argument("--clients-per-round", type=int, metavar="N", help="select at most N of the online "
                            "clients per round, sampled (default: no cap; --fraction applies first)")
    federation.add_argument("--quorum", type=int, help="accepted updates needed at the deadline "
                                                       "(default: half the selected clients, rounded up)")
    federation.add_argument("--round-timeout", type=float, metavar="SECONDS", help="seconds from opening a round to "
                            "its deadline (default: 600)")
    federation.add_argument("--selection-seed", type=int, help="seed of the per-round client sampling (default: 0)")
    federation.add_argument("--base-fingerprint", help="base model every client must use "
                            "(default: the first accepted update's)")
    federation.add_argument("--lora-rank", type=int, help="LoRA rank r announced to clients (default: 8)")
    federation.add_argument("--lora-alpha", type=int, help="LoRA alpha announced to clients (default: 16)")
    federation.add_argument("--lora-seed", type=int, help="seed of the shared LoRA initialisation (default: 0)")
    add_lora_target_options(federation)
    federation.add_argument("--local-steps", type=int, help="training steps per round, a hint in the round config")
    federation.add_argument("--learning-rate", type=float, help="learning rate, a hint in the round config")
    federation.add_argument("--objective", choices=OBJECTIVE_NAMES, help="what devices' local training minimises: "
                            "sft (the chosen answer) or dpo (chosen against rejected), announced in the round "
                            "config; devices follow it (default: sft)")
    federation.add_argument("--dpo-beta", type=float, help="DPO's beta, announced with --objective dpo (default: 0.1)")
    bounding = start.add_argument_group("bounding one client's pull", "how far one update may move the global "
                                        "shared factors (L2 norm of update - global) and how much weight it may "
                                        "claim; see docs/reliability.md")
    bounding.add_argument("--max-update-norm", type=float, metavar="NORM", help="absolute bound (default: none)")
    bounding.add_argument("--norm-factor", type=float, metavar="K", help="relative bound: K x the previous round's "
                          "median update norm (default: 5; 0 turns it off)")
    bounding.add_argument("--norm-action", choices=("clip", "reject"), help="what to do with an update over the "
                          "bound (default: clip it onto the bound)")
    bounding.add_argument("--max-samples", dest="max_sample_count", type=int, metavar="N",
                          help="a client's claimed sample count (its weight in the mean) counts as at most N "
                               "(default: as claimed)")  # fmt: skip
    transport = start.add_argument_group("broker")
    transport.add_argument("--broker", metavar="URL", help="use this broker: mqtt://host:port or mqtts://host:port "
                           "(default: start an embedded broker)")
    transport.add_argument("--username", help="broker username")
    password = transport.add_mutually_exclusive_group()
    password.add_argument("--password", help="broker password (visible to other users in `ps`: prefer "
                          f"--password-file or {PASSWORD_ENVIRONMENT})")
    password.add_argument("--password-file", type=Path, metavar="FILE", help="file holding the broker password "
                          "(e.g. hub.password from `fedvlm-hub broker-config`)")
    transport.add_argument("--ca-file", help="CA certificates to verify the broker (PEM); implies TLS")
    transport.add_argument("--cert-file", help="client certificate for TLS (PEM)")
    transport.add_argument("--key-file", help="private key of --cert-file (PEM)")
    transport.add_argument("--mqtt-protocol", choices=("auto", "5", "3.1.1"), help="MQTT version (default: auto)")
    transport.add_argument("--host", dest="embedded_host", help="address of the embedded broker (default: 127.0.0.1)")
    transport.add_argument("--port", dest="embedded_port", type=int, help="port of the embedded broker "
                           "(default: 1883)")
    transport.add_argument("--chunk-size", type=int, help="payload bytes per chunk of a global version")
    transport.add_argument("--max-update-bytes", type=int, help="largest signed update accepted, in bytes")
    transport.add_argument("--inflight-window", type=int, metavar="N", help="update chunks held unacknowledged at "
                           "once: the broker's flow control towards the hub (MQTT 5 receive maximum; default 1024)")
    transport.add_argument("--commit-batch", type=int, metavar="N", help="accepted updates committed to SQLite "
                           "together (group commit; default 64)")
    transport.add_argument("--reassembly-slots", type=int, metavar="N", help="updates reassembled at once; more "
                           "are refused as overloaded with a retry hint (default 64)")
    transport.add_argument("--workers", type=int, metavar="N", help="N hub workers (`fedvlm-hub worker`) take the "
                           "updates through an MQTT 5 shared subscription; this hub only opens rounds, merges their "
                           "partial sums and publishes (needs --broker; default: 0, the hub takes them itself)")
    transport.add_argument("--keep-updates", action="store_true", default=None, help="also keep each accepted "
                           "update as a file in the state dir (default: only the round's running sum)")
    transport.add_argument("--linger", dest="done_linger_s", type=float, metavar="SECONDS", help="with the embedded "
                           "broker, keep serving this long after the last round so clients get the last global "
                           "version (default: 30)")
    start.add_argument("--secrets-key-file", help=_SECRETS_KEY_HELP)
    start.add_argument("--quiet", action="store_true", help="no progress lines on the console")

    clients = commands.add_parser("clients", help="register, list or revoke clients",
                                  description="Manage the clients allowed to send updates.")
    clients.set_defaults(print_clients_help=clients.print_help)
    client_commands = clients.add_subparsers(dest="clients_command", metavar="ACTION")
    add = client_commands.add_parser("add", help="register a client and print its secret once",
                                     description="Register a client. Its secret is printed once, alone on the last "
                                                 "line; give it to the device (e.g. in a file only it can read).")
    add.add_argument("name", help="client id: letters, digits, '.', '_', '-'")
    _add_state_arguments(add)
    add.add_argument("--secrets-key-file", help=_SECRETS_KEY_HELP)
    listing = client_commands.add_parser("list", help="list registered clients (never their secrets)",
                                         description="List the registered clients and their presence.")
    _add_state_arguments(listing)
    revoke = client_commands.add_parser("revoke", help="revoke a client: its secret is deleted",
                                        description="Revoke a client: its secret is deleted, so its next update is "
                                                    "refused as unknown_client, even by a hub that is running. On a "
                                                    "broker set up with broker-config, run broker-config again and "
                                                    "reload the broker to remove its broker account too.")
    revoke.add_argument("name")
    _add_state_arguments(revoke)

    status = commands.add_parser("status", help="show the federation's state (hub running or not)",
                                 description="Show round, phase, clients online, last aggregation and accepted/"
                                             "rejected counts, read from the hub's state directory.")
    _add_state_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")

    broker = commands.add_parser(
        "broker-config", help="write a locked-down mosquitto setup (accounts, ACL, TLS) for this federation",
        description="Write what a production mosquitto 2.x needs for this federation into --out: a password "
                    "file (one account per active client, username = client id, password derived from its "
                    "secret; plus the hub's account), an ACL confining each client to its own topics, a "
                    "mosquitto.conf with a TLS listener and no anonymous access, hub.password for `start "
                    "--password-file`, and README.txt saying what to do with them. Run it again after adding or "
                    "revoking clients, then reload mosquitto (SIGHUP); options not given are those of the previous run "
        "for the same state dir.",
        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _add_state_arguments(broker)
    broker.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the files into")
    broker.add_argument("--federation", help="federation id (default: the one the hub's state dir belongs to)")
    broker.add_argument("--hub-username", help="the hub's broker username (default: fedvlm-hub; must not be a "
                        "client id)")
    broker.add_argument("--port", type=int, help="TLS listener port (default: 8883)")
    broker.add_argument("--bind", metavar="ADDRESS", help="address the listener binds (default: all)")
    broker.add_argument("--tls-cafile", metavar="FILE", help="CA certificate (PEM) for the listener "
                        "(default: a placeholder path to fill in)")
    broker.add_argument("--tls-certfile", metavar="FILE", help="the broker's certificate (PEM)")
    broker.add_argument("--tls-keyfile", metavar="FILE", help="the broker's private key (PEM)")
    broker.add_argument("--workers", type=int, metavar="N", help="also write N hub worker accounts "
                        "(HUB_USERNAME-worker-I, password in worker-I.password), each allowed only what a worker "
                        "does; every worker needs its own, since the broker makes the username the client id "
                        "(default: the previous run's, else 0)")
    broker.add_argument("--secrets-key-file", help=_SECRETS_KEY_HELP)
    _add_worker_parser(commands)
    return parser


_WORKER_EPILOG = """\
A worker judges updates by the federation settings the coordinator stored in the state
directory (strategy, LoRA layout, limits, norm bound), so it takes no federation flags:
start the coordinator with `fedvlm-hub start --broker URL --workers N ...` and N workers
with `fedvlm-hub worker --broker URL --index I --workers N` (I = 0 .. N-1), all on the
same --state-dir (the hub's machine, or a shared directory). The broker must speak
MQTT 5 with shared subscriptions (mosquitto 2, EMQX, HiveMQ); the embedded broker cannot.
The coordinator opens a round only once all N workers hold their subscription (a broker
drops updates that no subscription matches). A worker restarted with the same --index resumes its broker session: updates it had not
committed come back to it. See docs/capacity.md.
"""


def _add_worker_parser(commands: Any) -> None:
    from .worker_settings import DEFAULT_GROUP

    worker = commands.add_parser("worker", help="take a share of the uploads (MQTT 5 shared subscription)",
                                 description="Run a hub worker: verify, reassemble and sum a share of the "
                                             "federation's updates, committing a partial sum the coordinator "
                                             "(`fedvlm-hub start --workers N`) merges.",
                                 epilog=_WORKER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_state_arguments(worker)
    worker.add_argument("--federation", help="federation id (default: the one the state dir belongs to)")
    worker.add_argument("--index", type=int, default=0, help="this worker's number, 0 to --workers - 1 (default: 0)")
    worker.add_argument("--workers", type=int, default=1, help="how many workers share the uploads (default: 1)")
    worker.add_argument("--group", default=DEFAULT_GROUP, help=f"shared subscription group (default: {DEFAULT_GROUP})")
    worker.add_argument("--no-relay", dest="relay", action="store_false", help="the broker keeps each device's "
                        "messages on one worker (EMQX shared_subscription_strategy hash_clientid or hash_topic): "
                        "do not relay the chunks of multi-chunk updates to their owner (mosquitto needs the relay)")
    transport = worker.add_argument_group("broker")
    transport.add_argument("--broker", metavar="URL", help="the MQTT 5 broker: mqtt://host:port or mqtts://host:port")
    transport.add_argument("--username", help="broker username")
    password = transport.add_mutually_exclusive_group()
    password.add_argument("--password", help=f"broker password (prefer --password-file or {PASSWORD_ENVIRONMENT})")
    password.add_argument("--password-file", type=Path, metavar="FILE", help="file holding the broker password")
    transport.add_argument("--ca-file", help="CA certificates to verify the broker (PEM); implies TLS")
    transport.add_argument("--cert-file", help="client certificate for TLS (PEM)")
    transport.add_argument("--key-file", help="private key of --cert-file (PEM)")
    transport.add_argument("--mqtt-protocol", choices=("5",), help="MQTT version (workers need 5)")
    worker.add_argument("--secrets-key-file", help=_SECRETS_KEY_HELP)
    worker.add_argument("--quiet", action="store_true", help="no progress lines on the console")


def _add_state_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, help=f"the hub's state directory (default: ./{DEFAULT_STATE_DIR}, "
                                                       "or state_dir from --config)")
    parser.add_argument("--config", type=Path, help="hub TOML config file")


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return args.state_dir
    configured = _configured_path(args, "state_dir")
    return Path(configured) if configured else DEFAULT_STATE_DIR


def _secrets_key_file(args: argparse.Namespace) -> str | None:
    """--secrets-key-file, else secrets_key_file from --config (None: env var or state dir)."""
    if getattr(args, "secrets_key_file", None):
        return args.secrets_key_file
    return _configured_path(args, "secrets_key_file")


def _configured_path(args: argparse.Namespace, key: str) -> str | None:
    """The path ``key`` of the --config file, if any. Sub-commands other than ``start`` read only
    this one key, so HubConfig never checks it: a number there must not reach Path() as a bug."""
    if args.config is None:
        return None
    value = read_toml(args.config).get(key)
    if value is not None and not isinstance(value, str):
        raise HubConfigError(f"config file {args.config}: {key} must be a path in quotes, got {value!r}")
    return value


def _start_config(args: argparse.Namespace) -> HubConfig:
    overrides: dict[str, Any] = {
        key: getattr(args, key)
        for key in ("federation", "strategy", "rounds", "min_clients", "fraction", "quorum", "selection_seed",
                    "state_dir", "broker", "username", "password", "ca_file", "cert_file", "key_file",
                    "mqtt_protocol", "embedded_host", "embedded_port", "chunk_size", "max_update_bytes",
                    "base_fingerprint", "local_steps", "learning_rate", "objective", "dpo_beta", "done_linger_s",
                    "max_update_norm", "norm_factor", "norm_action", "max_sample_count", "clients_per_round",
                    "inflight_window", "commit_batch", "keep_updates", "reassembly_slots", "workers")
    }  # fmt: skip
    overrides["round_timeout_s"] = args.round_timeout
    overrides["secrets_key_file"] = args.secrets_key_file
    overrides["password"] = _broker_password(args)
    lora = {"r": args.lora_rank, "alpha": args.lora_alpha, "init_seed": args.lora_seed, **lora_target_fields(args)}
    return load_config(args.config, overrides, lora, dict(args.strategy_options or ()))


def _broker_password(args: argparse.Namespace) -> str | None:
    """--password, else --password-file, else $FEDVLM_BROKER_PASSWORD (None: none given)."""
    if args.password_file is not None:
        return read_secret_file(args.password_file, "broker password")
    return args.password or os.environ.get(PASSWORD_ENVIRONMENT) or None


def _run_start(args: argparse.Namespace) -> int:
    from .console import Console
    from .service import HubService

    config = _start_config(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = HubService(config, console=Console(enabled=not args.quiet))
    if not config.uses_embedded_broker:
        from fedvlm.shared.broker_credentials import plaintext_warning

        address = service.address
        warning = plaintext_warning(address.host, tls=address.tls, has_password=bool(address.password))
        if warning:
            print(f"{PROGRAM}: warning: {warning}", file=sys.stderr)

    _serve_until_signalled(service.serve, service.request_stop)
    return 0


def _serve_until_signalled(serve: Any, request_stop: Any) -> None:
    """Run ``serve``; Ctrl-C and SIGTERM end it cleanly (``request_stop``) instead of mid-write."""

    def stop(signum: int, frame: Any) -> None:
        request_stop()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_worker(args: argparse.Namespace) -> int:
    from .console import Console
    from .worker import HubWorker
    from .worker_settings import worker_config

    connection: dict[str, Any] = {key: getattr(args, key) for key in ("federation", "broker", "username", "password",
                                                                      "ca_file", "cert_file", "key_file")}
    connection["state_dir"] = _state_dir(args)
    connection["secrets_key_file"] = _secrets_key_file(args)
    connection["password"] = _broker_password(args)
    console = Console(enabled=not args.quiet)
    config = worker_config(args.config, connection, console=console)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = HubWorker(config, index=args.index, workers=args.workers, group=args.group, relay=args.relay,
                       console=console)
    _serve_until_signalled(worker.serve, worker.request_stop)
    return 0


def _run_clients(args: argparse.Namespace) -> int:
    from .clients import broker_config_dir, list_clients, register_client, revoke_client

    if args.clients_command is None:
        args.print_clients_help()
        return 0
    state_dir = _state_dir(args)
    if args.clients_command == "add":
        secret = register_client(state_dir, args.name, secrets_key_file=_secrets_key_file(args))
        _remind_broker_config(state_dir, broker_config_dir(state_dir), f"give {args.name!r} a broker account")
        print(f"registered client {args.name!r} in {state_dir}. Its secret follows, shown only this once; "
              "give it to the device and keep it private:")  # fmt: skip
        print(secret)
        return 0
    if args.clients_command == "revoke":
        revoke_client(state_dir, args.name)
        print(f"revoked client {args.name!r}: its updates are now refused")
        _remind_broker_config(state_dir, broker_config_dir(state_dir), f"remove the broker account of {args.name!r}")
        return 0
    if args.clients_command == "list":
        records = list_clients(state_dir)
        if not records:
            print(f"no clients registered in {state_dir}; add one with `{PROGRAM} clients add NAME`")
            return 0
        print(f"{'client':<32} {'status':<8} {'last presence':<13} registered")
        for record in records:
            status = "active" if record.active else "revoked"
            print(f"{record.client_id:<32} {status:<8} {record.presence:<13} {_when(record.created_at)}")
        return 0
    raise AssertionError(f"unhandled clients action {args.clients_command!r}")


def _remind_broker_config(state_dir: Path, out_dir: str | None, purpose: str) -> None:
    """After add/revoke on a hub whose broker was set up with broker-config: how to catch it up."""
    if out_dir:
        print(f"the broker's accounts are now out of date: to {purpose}, run `{PROGRAM} broker-config "
              f"--state-dir {state_dir} --out {out_dir}` (it reuses the previous options), install the new "
              "password file and reload mosquitto (SIGHUP)")  # fmt: skip


def _run_status(args: argparse.Namespace) -> int:
    from .status import read_status, status_json

    status = read_status(_state_dir(args))
    print(status_json(status) if args.json else status.format())
    return 0


def _run_broker_config(args: argparse.Namespace) -> int:
    from .broker_config import DEFAULT_HUB_USERNAME, DEFAULT_TLS_PORT, previous_options, write_broker_config

    state_dir = _state_dir(args)
    given = {"federation": args.federation, "hub_username": args.hub_username, "port": args.port, "bind": args.bind,
             "cafile": args.tls_cafile, "certfile": args.tls_certfile, "keyfile": args.tls_keyfile,
             "workers": args.workers}
    # A re-run after `clients add`/`revoke` needs no options again: the previous run's fill the gaps
    # (TLS files as a set: giving any of them replaces all three).
    previous = previous_options(state_dir)
    if any(given[key] for key in ("cafile", "certfile", "keyfile")):
        previous = {key: value for key, value in previous.items() if key not in ("cafile", "certfile", "keyfile")}
    options = {**{"hub_username": DEFAULT_HUB_USERNAME, "port": DEFAULT_TLS_PORT}, **previous,
               **{key: value for key, value in given.items() if value is not None}}
    files = write_broker_config(state_dir, args.out, secrets_key_file=_secrets_key_file(args), **options)
    print(files.readme, end="")
    return 0


def _when(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "start":
        return _run_start(args)
    if args.command == "worker":
        return _run_worker(args)
    if args.command == "clients":
        return _run_clients(args)
    if args.command == "status":
        return _run_status(args)
    if args.command == "broker-config":
        return _run_broker_config(args)
    parser.print_help()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv, user_errors(), PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
