"""``fedvlm-hub broker-config``: the files a production mosquitto needs for one federation.

Written into one folder:

- ``passwords``: a mosquitto ``password_file`` (PBKDF2-SHA512, the ``$7$`` format of
  mosquitto 2.x) with one account per active client (username = client id, password
  derived from its secret: ``fedvlm.shared.broker_credentials``) and one for the hub;
- ``acl``: each client may publish only its own announcement and updates and read only
  the hub's broadcasts and its own acks; the hub reads and writes its federation's tree;
- ``mosquitto.conf``: a TLS listener, no anonymous access, the two files above, and
  ``use_username_as_clientid`` so no account can take over another's MQTT session;
- ``hub.password``: the hub's broker password, for ``fedvlm-hub start --password-file``;
- the hub's publisher account (``<hub username>-publisher``): the hub's second connection,
  for its own publishes (state, global versions, selections, acks), so that they do not
  queue at the broker behind the update chunks it delivers to the hub's first connection.
  Its password is derived from the hub's (``publisher_password``), so the hub needs nothing
  more than ``--password-file hub.password``; it writes only what the hub publishes;
- with ``workers``: one account per hub worker (``<hub username>-worker-<index>``, its
  password in ``worker-<index>.password``), allowed only what a worker does. Each worker
  needs its own: under ``use_username_as_clientid`` two connections of one account have one
  client id, and each would knock the other off (a worker on the hub's account, the hub);
- ``README.txt``: what to do with them.

Nothing here can sign an update: the password file holds one-way hashes of one-way
derivations of the secrets, and the hub's broker password is random. Revoked clients get
no account. Re-run after ``clients add`` or ``clients revoke`` and reload mosquitto
(SIGHUP re-reads the password and ACL files).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path

from fedvlm.shared.broker_credentials import broker_password
from fedvlm.shared.durable_files import write_durably
from fedvlm.shared.mqtt_link import BrokerAddress
from fedvlm.shared.protocol import ProtocolError, Topics, validate_client_id, validate_federation_id

from .errors import HubError
from .store import HubStore

__all__ = [
    "DEFAULT_HUB_USERNAME",
    "DEFAULT_TLS_PORT",
    "BROKER_CONFIG_DIR_META",
    "previous_options",
    "BrokerConfigFiles",
    "mosquitto_password_hash",
    "acl_text",
    "worker_username",
    "publisher_username",
    "publisher_password",
    "publisher_address",
    "is_hub_account",
    "hub_username_of",
    "write_broker_config",
]

DEFAULT_HUB_USERNAME = "fedvlm-hub"
DEFAULT_TLS_PORT = 8883
_HUB_PASSWORD_META = "broker_hub_password"
_WORKER_PASSWORD_META = "broker_worker_password_{index}"
# Where broker-config last wrote and with which options, so `clients add`/`revoke` can
# remind the operator to refresh it and a re-run needs no options repeated.
BROKER_CONFIG_DIR_META = "broker_config_dir"
_OPTIONS_META = "broker_config_options"
_REMEMBERED = ("federation", "hub_username", "port", "bind", "cafile", "certfile", "keyfile", "workers")
# mosquitto_passwd's own defaults (mosquitto 2.x): 12-byte salt, 101 PBKDF2 iterations.
# Every password here is 256 random bits (or derived from them), so key stretching adds
# nothing against guessing; it would only cost the broker CPU on every connection.
_SALT_BYTES = 12
_ITERATIONS = 101
# A valid client id standing for mosquitto's %u while the ACL is built from the protocol's
# own topic patterns (Topics.client_permissions), so the two can never drift apart.
_USERNAME_STANDIN = "fedvlm-acl-username-standin"
_PLACEHOLDER_CERTS = {"cafile": "/etc/mosquitto/certs/ca.crt", "certfile": "/etc/mosquitto/certs/server.crt",
                      "keyfile": "/etc/mosquitto/certs/server.key"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BrokerConfigFiles:
    """What ``write_broker_config`` wrote."""

    out_dir: Path
    password_file: Path
    acl_file: Path
    conf_file: Path
    hub_password_file: Path
    readme_file: Path
    federation: str
    hub_username: str
    clients: tuple[str, ...]
    readme: str
    worker_usernames: tuple[str, ...] = ()
    worker_password_files: tuple[Path, ...] = ()


def previous_options(state_dir: str | Path) -> dict:
    """The options broker-config was last run with for this state dir ({} if never)."""
    try:
        with HubStore.in_state_dir(state_dir, create=False) as store:
            stored = store.get_meta(_OPTIONS_META)
    except HubError:
        return {}
    try:
        options = json.loads(stored) if stored else {}
    except ValueError:
        return {}
    return {key: options[key] for key in _REMEMBERED if options.get(key) is not None}


def mosquitto_password_hash(password: str) -> str:
    """``$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512, as mosquitto_passwd writes it."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, _ITERATIONS, 64)
    return f"$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def worker_username(hub_username: str, index: int) -> str:
    """Hub worker ``index``'s broker account."""
    return f"{hub_username}-worker-{index}"


def publisher_username(hub_username: str) -> str:
    """The broker account of the hub's second connection (its own publishes)."""
    return f"{hub_username}-publisher"


def is_hub_account(name: str, hub_username: str = DEFAULT_HUB_USERNAME) -> bool:
    """Whether ``name`` is (or would be) one of the hub's broker accounts: the hub's, its
    publisher's, or a worker's (any index). A device of that name could not get a broker
    account of its own, so ``clients add`` refuses it."""
    if name in (hub_username, publisher_username(hub_username)):
        return True
    prefix = worker_username(hub_username, 0)[:-1]
    return name.startswith(prefix) and name[len(prefix):].isdigit() and name[len(prefix):].isascii()


def hub_username_of(store: HubStore) -> str:
    """The hub's broker username as broker-config was last run with (the default if never)."""
    try:
        options = json.loads(store.get_meta(_OPTIONS_META) or "{}")
    except ValueError:
        options = {}
    name = options.get("hub_username") if isinstance(options, dict) else None
    return name if isinstance(name, str) and name else DEFAULT_HUB_USERNAME


def publisher_password(hub_password: str) -> str:
    """The publisher account's password, derived one way from the hub's: whoever has the hub's
    login has more than this one, and the hub needs no second password file."""
    if not hub_password:
        raise HubError("the hub has no broker password to derive its publisher's from; give it one "
                       "(fedvlm-hub broker-config writes hub.password)")
    digest = hmac.new(hub_password.encode("utf-8"), b"fedvlm-hub-publisher/v1", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def publisher_address(address: BrokerAddress) -> BrokerAddress:
    """The hub's login as its publisher connection uses it (the same without a login)."""
    if not address.username:
        return address
    return dataclasses.replace(address, username=publisher_username(address.username),
                               password=publisher_password(address.password or ""))  # fmt: skip


def acl_text(federation: str, hub_username: str = DEFAULT_HUB_USERNAME, workers: int = 0) -> str:
    """A mosquitto ``acl_file`` confining each client (username = client id) to its own topics."""
    topics = Topics(federation)
    client = topics.client_permissions(_USERNAME_STANDIN)
    hub = topics.hub_permissions()

    def pattern(topic: str) -> str:
        return topic.replace(_USERNAME_STANDIN, "%u")

    # The device patterns below apply to every account, the hub's own included. The hub's
    # account reads and writes its whole tree anyway; its publisher and workers must not
    # act as a device of their own name (announce, send updates, read acks as one): mosquitto
    # checks a user's ``deny`` lines before any grant, patterns included.
    own_topics = sorted({topic for topic in (*client.publish, *client.subscribe) if _USERNAME_STANDIN in topic})

    def not_a_device(username: str) -> list[str]:
        return [f"topic deny {topic.replace(_USERNAME_STANDIN, username)}" for topic in own_topics]

    lines = [
        f"# FedVLM federation {federation!r}: written by fedvlm-hub broker-config.",
        "# Devices log in with their client id as username (use_username_as_clientid in mosquitto.conf).",
        "# A device may publish only its own announcement and updates, and read only the hub's",
        "# broadcasts and its own acks: never another device's updates, acks or announcements.",
        "# No other topic (including $SYS) is granted to anyone.",
        "",
        "# the hub: reads announcements and updates, writes state, global versions and acks",
        f"user {hub_username}",
        *(f"topic readwrite {topic}" for topic in sorted(set(hub.publish) | set(hub.subscribe))),
        "",
        "# the hub's second connection: its own publishes (state, global versions, selections, acks)",
        f"user {publisher_username(hub_username)}",
        *(f"topic write {topic}" for topic in topics.hub_publisher_permissions().publish),
        *not_a_device(publisher_username(hub_username)),
        "",
    ]
    for index in range(workers):
        worker = topics.worker_permissions(index)
        # mosquitto checks a $share/GROUP/... subscription against the topic after the group.
        lines += [f"# hub worker {index}: its share of the updates, chunks relayed to it; relays and acks",
                  f"user {worker_username(hub_username, index)}",
                  *(f"topic read {topic}" for topic in worker.subscribe),
                  *(f"topic write {topic}" for topic in worker.publish),
                  *not_a_device(worker_username(hub_username, index)), ""]  # fmt: skip
    lines += [
        "# every device (%u = its username = its client id). The hub's broadcasts are patterns",
        "# without %u on purpose: patterns apply to every account, plain 'topic' lines here would",
        "# apply to anonymous clients only. mosquitto warns about them at start; that is expected.",
        *(f"pattern write {pattern(topic)}" for topic in client.publish),
        *(f"pattern read {pattern(topic)}" for topic in client.subscribe),
        "",
    ]
    return "\n".join(lines)


def _conf_text(*, federation: str, port: int, bind: str | None, tls: dict[str, str], placeholders: bool,
               password_file: Path, acl_file: Path) -> str:  # fmt: skip
    placeholder_note = ("# TLS: REPLACE the three placeholder paths below with your CA, the broker's certificate\n"
                        "# (its name must match the host devices connect to) and its private key.\n"
                        if placeholders else "# TLS files as given to broker-config.\n")  # fmt: skip
    return (
        f"# mosquitto 2.x configuration for FedVLM federation {federation!r}, written by fedvlm-hub broker-config\n"
        f"# on {time.strftime('%Y-%m-%d %H:%M:%S')}. Use it as mosquitto.conf, or include it from there.\n"
        "per_listener_settings false\n"
        "# Nobody connects without an account; the ACL confines each account to its own topics.\n"
        "allow_anonymous false\n"
        f"password_file {password_file}\n"
        f"acl_file {acl_file}\n"
        "\n"
        "# The hub acknowledges an update only once it is stored, so the broker holds a round's\n"
        "# backlog for it (QoS 1): do not drop queued messages of a connected or persistent\n"
        "# client (mosquitto's default keeps only 1000; 0, unlimited, stalls\n"
        "# QoS 1 publishes the ACL refuses in mosquitto 2.0). The hub's own --inflight-window is\n"
        "# its MQTT 5 receive maximum (the broker's window towards it).\n"
        "max_queued_messages 1000000\n"
        "\n"
        "# Listener settings follow the listener line (before it they would create a default\n"
        "# plain-text listener on port 1883).\n"
        f"listener {port}{' ' + bind if bind else ''}\n"
        "# The MQTT client id is forced to the username, so one device cannot take over (and\n"
        "# disconnect) another device's session by reusing its client id.\n"
        "use_username_as_clientid true\n"
        f"{placeholder_note}"
        f"cafile {tls['cafile']}\n"
        f"certfile {tls['certfile']}\n"
        f"keyfile {tls['keyfile']}\n"
        "# TLS 1.2 at least; devices verify the broker against the CA (fedvlm-edge join --ca-file).\n"
        "tls_version tlsv1.2\n"
    )


def _readme_text(files: BrokerConfigFiles, *, port: int, placeholders: bool) -> str:
    out = files.out_dir
    cert_step = ("   The TLS paths in mosquitto.conf are placeholders: put the CA, the broker's certificate\n"
                 "   and key there (or edit the paths), e.g. with your PKI or `openssl`.\n"
                 if placeholders
                 else "   The TLS files are the ones you passed; keep the key readable by mosquitto only.\n")
    return f"""\
FedVLM broker configuration for federation {files.federation!r}
{'=' * (42 + len(files.federation))}

Files in {out}:
  mosquitto.conf  TLS listener on port {port}, no anonymous access, password_file, acl_file
  passwords       mosquitto password file: {len(files.clients)} device account(s) + the hub ({files.hub_username},
                  and {files.hub_username}-publisher for its own publishes, password derived from the hub's)
  acl             each device publishes only its own updates/announcements and reads only the
                  hub's topics and its own acks; the hub reads and writes its federation
  hub.password    the hub's broker password (keep it on the hub machine only)
{_worker_files_text(files)}
1. On the broker machine: copy mosquitto.conf, passwords and acl (e.g. to /etc/mosquitto/conf.d/)
   and fix the password_file and acl_file paths in mosquitto.conf if you moved them. Make
   passwords and acl readable by the mosquitto user only: chown mosquitto passwords acl;
   chmod 600 passwords acl. Do NOT copy hub.password or the hub's state directory there.
{cert_step}2. Start (or restart) mosquitto: mosquitto -c /etc/mosquitto/conf.d/mosquitto.conf
3. Start the hub against it (the password comes from a file, so it never shows in `ps`):
     fedvlm-hub start --broker mqtts://BROKER_HOST:{port} --username {files.hub_username} \\
         --password-file {files.hub_password_file} --ca-file CA.crt --state-dir STATE_DIR ...
{_worker_step_text(files, port)}4. Each device logs in as its client id with the password derived from its secret:
     fedvlm-edge join --hub mqtts://BROKER_HOST:{port} --federation {files.federation} --client-id NAME \\
         --secret-file NAME.secret --broker-login --ca-file CA.crt ...
5. After every `fedvlm-hub clients add` or `clients revoke`, run broker-config again and
   reload mosquitto so the accounts follow the registry:
     fedvlm-hub broker-config --state-dir STATE_DIR --out {out}   # then copy passwords again
     kill -HUP $(pidof mosquitto)                                 # re-reads passwords and acl
   (A revoked device's updates are refused by the hub at once; the reload also shuts it
   out of the broker.)

What an attacker gets from these files: the password file holds salted PBKDF2-SHA512 hashes
of passwords that are themselves one-way derivations (HMAC-SHA256) of the devices' secrets,
so neither it nor a broker that sees the passwords at login can sign an update; the hub
refuses every update whose HMAC does not verify under the device's secret.
"""


def _worker_files_text(files: BrokerConfigFiles) -> str:
    if not files.worker_usernames:
        return ""
    return (f"  worker-I.password  the broker passwords of the {len(files.worker_usernames)} hub worker account(s) "
            f"({', '.join(files.worker_usernames)})\n")


def _worker_step_text(files: BrokerConfigFiles, port: int) -> str:
    if not files.worker_usernames:
        return ""
    last = len(files.worker_usernames) - 1
    return (f"   Hub workers (start the hub with --workers {last + 1}), each on its own account:\n"
            f"     fedvlm-hub worker --broker mqtts://BROKER_HOST:{port} --index I --workers {last + 1} \\\n"
            f"         --username {files.hub_username}-worker-I --password-file {files.out_dir}/worker-I.password "
            "--ca-file CA.crt --state-dir STATE_DIR   # I = 0"
            f"{f' .. {last}' if last else ''}\n")


def write_broker_config(state_dir: str | Path, out_dir: str | Path, *, federation: str | None = None,
                        hub_username: str = DEFAULT_HUB_USERNAME, port: int = DEFAULT_TLS_PORT,
                        bind: str | None = None, cafile: str | None = None, certfile: str | None = None,
                        keyfile: str | None = None, workers: int = 0,
                        secrets_key_file: str | Path | None = None) -> BrokerConfigFiles:  # fmt: skip
    """Write the broker's password file, ACL and config for the clients registered in ``state_dir``
    (and accounts for ``workers`` hub workers)."""
    if workers < 0:
        raise HubError(f"--workers must be 0 or more, got {workers}")
    try:
        validate_client_id(hub_username)  # same alphabet: safe in the ACL and password file
    except ProtocolError as error:
        raise HubError(f"hub username {hub_username!r}: {error}") from None
    if not 1 <= port <= 65535:
        raise HubError(f"port must be 1-65535, got {port}")
    given = {"cafile": cafile, "certfile": certfile, "keyfile": keyfile}
    if any(given.values()) and not (certfile and keyfile):
        raise HubError("TLS needs both --tls-certfile and --tls-keyfile (and usually --tls-cafile); "
                       "or pass none of them to get placeholders to fill in")  # fmt: skip
    placeholders = not any(given.values())
    tls = {key: str(Path(value).resolve()) if value else _PLACEHOLDER_CERTS[key] for key, value in given.items()}

    with HubStore.in_state_dir(state_dir, create=False, secrets_key_file=secrets_key_file) as store:
        bound = store.get_meta("federation")
        if federation is not None and bound is not None and federation != bound:
            raise HubError(f"the hub state in {state_dir} belongs to federation {bound!r}, not {federation!r}; "
                           "drop --federation or use that federation's state dir")  # fmt: skip
        federation = federation or bound
        if federation is None:
            raise HubError(f"the hub in {state_dir} has not started a federation yet: pass --federation NAME "
                           "(the name you will give `fedvlm-hub start --federation`)")  # fmt: skip
        try:
            validate_federation_id(federation)
        except ProtocolError as error:
            raise HubError(f"federation: {error}") from None
        store.protect_secrets()
        client_secrets = store.active_secrets()
        worker_names = tuple(worker_username(hub_username, index) for index in range(workers))
        hub_names = {hub_username, publisher_username(hub_username), *worker_names}
        taken = {record.client_id for record in store.list_clients()} & hub_names
        if taken:
            raise HubError(f"a client is registered as {sorted(taken)[0]!r}, a hub broker username (the hub's, its "
                           f"publisher's: {hub_username}-publisher, or a worker's: {hub_username}-worker-I); choose "
                           "another with --hub-username")  # fmt: skip
        worker_passwords = []
        for index in range(workers):
            key = _WORKER_PASSWORD_META.format(index=index)
            password = store.private_meta(key)
            if password is None:  # kept like the hub's, so a re-run keeps running workers' logins valid
                password = secrets.token_urlsafe(32)
                store.set_private_meta(key, password)
            worker_passwords.append(password)
        hub_password = store.private_meta(_HUB_PASSWORD_META)
        if hub_password is None:
            # Kept (encrypted) in the state, so re-running after a `clients add` keeps the
            # hub's login valid on a broker that was already set up.
            hub_password = secrets.token_urlsafe(32)
            store.set_private_meta(_HUB_PASSWORD_META, hub_password)
        out = _output_folder(Path(out_dir))
        options = {"federation": federation, "hub_username": hub_username, "port": port, "bind": bind, **tls,
                   "workers": workers}
        if placeholders:
            options.update(cafile=None, certfile=None, keyfile=None)
        store.set_meta({BROKER_CONFIG_DIR_META: str(out), _OPTIONS_META: json.dumps(options)})
    password_lines = [f"{hub_username}:{mosquitto_password_hash(hub_password)}",
                      f"{publisher_username(hub_username)}:{mosquitto_password_hash(publisher_password(hub_password))}"]
    password_lines += [f"{name}:{mosquitto_password_hash(password)}" for name, password in zip(worker_names,
                                                                                                worker_passwords)]
    password_lines += [f"{client_id}:{mosquitto_password_hash(broker_password(secret))}"
                       for client_id, secret in client_secrets.items()]  # fmt: skip
    files = BrokerConfigFiles(
        out_dir=out, password_file=out / "passwords", acl_file=out / "acl", conf_file=out / "mosquitto.conf",
        hub_password_file=out / "hub.password", readme_file=out / "README.txt", federation=federation,
        hub_username=hub_username, clients=tuple(client_secrets), readme="", worker_usernames=worker_names,
        worker_password_files=tuple(out / f"worker-{index}.password" for index in range(workers)),
    )  # fmt: skip
    # 0600, replaced atomically: the password and ACL files hold credentials.
    write_durably(files.password_file, ("\n".join(password_lines) + "\n").encode())
    write_durably(files.acl_file, acl_text(federation, hub_username, workers).encode())
    write_durably(files.hub_password_file, (hub_password + "\n").encode())
    for path, password in zip(files.worker_password_files, worker_passwords):
        write_durably(path, (password + "\n").encode())
    write_durably(files.conf_file, _conf_text(federation=federation, port=port, bind=bind, tls=tls,
                                              placeholders=placeholders, password_file=files.password_file,
                                              acl_file=files.acl_file).encode())  # fmt: skip
    readme = _readme_text(files, port=port, placeholders=placeholders)
    write_durably(files.readme_file, readme.encode())
    return dataclasses.replace(files, readme=readme)


def _output_folder(out: Path) -> Path:
    """``--out``, created if missing; a file or a folder that cannot be made is the user's to fix."""
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise HubError(f"--out {out} is a file, not a folder: pass a folder for the broker's files") from None
    except OSError as error:
        raise HubError(f"cannot create the --out folder {out}: {error.strerror}") from None
    return out.resolve()

