"""The client registry: who may send updates, each with a secret issued once.

The secret is the HMAC key of the client's signed updates. The hub keeps it encrypted in
its database (mode 0600; see ``secrets_at_rest``) and hands it out exactly once, when the
client is registered; a revoked client's secret is deleted, so its next update fails with
``unknown_client``. A running hub reads the secret from the database for every update
(no cache), so registering or revoking takes effect on the next message, without a
restart. The broker password of a client is derived from its secret
(``fedvlm.shared.broker_credentials``); revoking at the broker too means rewriting the
broker's password file (``fedvlm-hub broker-config``) and reloading the broker.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedvlm.shared.protocol import ProtocolError, new_client_secret, validate_client_id

from .broker_config import hub_username_of, is_hub_account
from .errors import ClientRegistryError
from .store import ClientRecord, HubStore

__all__ = ["register_client", "register_clients", "revoke_client", "list_clients", "broker_config_dir"]


def register_client(state_dir: str | Path, client_id: str, *, secrets_key_file: str | Path | None = None) -> str:
    """Register ``client_id`` and return its new secret (the only time it is shown)."""
    try:
        validate_client_id(client_id)
    except ProtocolError as error:
        raise ClientRegistryError(f"cannot register {client_id!r}: {error}") from None
    secret = new_client_secret()
    with HubStore.in_state_dir(state_dir, secrets_key_file=secrets_key_file) as store:
        _refuse_hub_accounts(store, [client_id])
        store.add_client(client_id, secret, time.time())
    return secret


def register_clients(state_dir: str | Path, client_ids: list[str], *,
                     secrets_key_file: str | Path | None = None) -> dict[str, str]:
    """Register many clients at once (one transaction); returns each one's new secret."""
    for client_id in client_ids:
        try:
            validate_client_id(client_id)
        except ProtocolError as error:
            raise ClientRegistryError(f"cannot register {client_id!r}: {error}") from None
    secrets = {client_id: new_client_secret() for client_id in client_ids}
    with HubStore.in_state_dir(state_dir, secrets_key_file=secrets_key_file) as store:
        _refuse_hub_accounts(store, client_ids)
        store.add_clients(secrets, time.time())
    return secrets


def _refuse_hub_accounts(store: HubStore, client_ids: list[str]) -> None:
    """A device named like one of the hub's broker accounts could never log in to the broker
    as itself (the account is the hub's, its publisher's or a worker's): refused now, not
    when broker-config runs."""
    hub_username = hub_username_of(store)
    for client_id in client_ids:
        if is_hub_account(client_id, hub_username):
            raise ClientRegistryError(f"cannot register {client_id!r}: it is the name of one of the hub's broker "
                                      f"accounts (the hub's {hub_username!r}, its publisher's or a worker's); "
                                      "choose another name")  # fmt: skip


def revoke_client(state_dir: str | Path, client_id: str) -> None:
    # No key needed: revoking deletes the ciphertext; the hub's next lookup finds nothing.
    with HubStore.in_state_dir(state_dir, create=False) as store:
        store.revoke_client(client_id, time.time())


def broker_config_dir(state_dir: str | Path) -> str | None:
    """Where ``fedvlm-hub broker-config`` last wrote the broker's files, if it ever ran."""
    from .broker_config import BROKER_CONFIG_DIR_META

    with HubStore.in_state_dir(state_dir, create=False) as store:
        return store.get_meta(BROKER_CONFIG_DIR_META)


def list_clients(state_dir: str | Path) -> list[ClientRecord]:
    with HubStore.in_state_dir(state_dir, create=False) as store:
        return store.list_clients()
