"""Names that end up inside MQTT topics: federation ids, client ids, share groups.

They are topic levels, so they must not contain the MQTT separators and wildcards
(``/ + #``), must not start with ``$`` (reserved for broker topics such as ``$SYS`` and
``$share``), and are bounded so every topic stays short. The same charset is safe in file
names, SQL and log lines, which the hub also uses them in.
"""

from __future__ import annotations

import re

from .errors import ProtocolError, ReasonCode

__all__ = ["MAX_ID_LENGTH", "validate_federation_id", "validate_client_id", "validate_share_group"]

MAX_ID_LENGTH = 64
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ALLOWED = "letters, digits, '.', '_' and '-', starting with a letter or digit"


def _validate_id(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(ReasonCode.MALFORMED, f"{what} must be a string, got {type(value).__name__} {value!r}")
    if not value:
        raise ProtocolError(ReasonCode.MALFORMED, f"{what} is empty; use 1 to {MAX_ID_LENGTH} characters: {_ALLOWED}")
    if len(value) > MAX_ID_LENGTH:
        raise ProtocolError(ReasonCode.MALFORMED,
                            f"{what} {value[:20]!r}... is {len(value)} characters; the limit is {MAX_ID_LENGTH}")
    if not _ID_PATTERN.fullmatch(value):
        wildcard = next((c for c in value if c in "/+#"), None)
        if wildcard is not None:
            problem = f"contains {wildcard!r}, which MQTT reserves as a topic separator or wildcard"
        elif not (value[0].isascii() and value[0].isalnum()):
            problem = f"starts with {value[0]!r}"
        else:
            bad = next(c for c in value if not (c.isascii() and (c.isalnum() or c in "._-")))
            problem = f"contains {bad!r}"
        raise ProtocolError(ReasonCode.MALFORMED, f"{what} {value!r} {problem}; use only {_ALLOWED}")
    return value


def validate_federation_id(value: object) -> str:
    """Return ``value`` if it is a valid federation id, else raise ``ProtocolError``."""
    return _validate_id(value, "federation id")


def validate_client_id(value: object) -> str:
    """Return ``value`` if it is a valid client id, else raise ``ProtocolError``."""
    return _validate_id(value, "client id")


def validate_share_group(value: object) -> str:
    """Return ``value`` if it is a valid MQTT 5 shared-subscription group name."""
    return _validate_id(value, "shared subscription group")
