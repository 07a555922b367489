"""A device's broker login, derived from the secret the hub issued it.

On a locked-down broker (``fedvlm-hub broker-config``) a device logs in with its client
id as the MQTT username and ``broker_password(secret)`` as the password. Both sides derive
the same password, so a device needs one secret, not two.

Why derived, and why this way: the broker password travels to the broker at every
connection and the broker's password file keeps a hash of it, so the broker (and anyone
who takes over the broker machine) must learn nothing that can sign updates. The
password is HMAC-SHA256 keyed by the secret over a fixed label: one-way, so neither the
password nor its hash gives back the secret; a stolen broker account can at most publish
on that client's own topics, where the hub refuses anything not signed with the secret
(``bad_signature``). The secret is 256 random bits, so the derived password is as hard to
guess as a fresh random one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress

from .usage_error import UsageError

__all__ = ["broker_password", "plaintext_warning"]

# Versioned, so a future scheme can never produce the same password by accident.
_LABEL = b"fedvlm/v1 broker password"


def broker_password(secret: str | bytes) -> str:
    """The MQTT password of the client holding ``secret`` (URL-safe text, 43 characters)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise UsageError("cannot derive a broker password from an empty secret")
    digest = hmac.new(key, _LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def plaintext_warning(host: str, *, tls: bool, has_password: bool) -> str | None:
    """A warning when a connection leaves this machine without TLS (None when it is fine).

    Updates are signed either way, but without TLS anyone on the path reads them (the
    shared factors, sample counts, metrics) and any broker password sent with them.
    """
    if tls or _is_loopback(host):
        return None
    exposed = "the broker password and every message" if has_password else "every message"
    return (f"connecting to the broker at {host} without TLS: {exposed} crosses the network in clear; "
            "use mqtts:// with --ca-file (fedvlm-hub broker-config sets up a TLS listener)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
