"""Field checks shared by the JSON control messages: exact types, bounded strings, clear errors.

Every check raises ``ProtocolError(MALFORMED)`` naming the message, the field, what it
got and what it needs, because these messages come from the network.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import ProtocolError, ReasonCode

# A token is an opaque id from elsewhere in FedVLM (fingerprints, config hashes, strategy
# names, versions): printable, no spaces, short enough to log.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._:+-]{1,128}")
SHA256_HEX_PATTERN = re.compile(r"[0-9a-f]{64}")
MESSAGE_ID_HEX_PATTERN = re.compile(r"[0-9a-f]{32}")


def malformed(owner: str, field: str, problem: str) -> ProtocolError:
    return ProtocolError(ReasonCode.MALFORMED, f"{owner}.{field} {problem}")


def check_int(owner: str, field: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise malformed(owner, field, f"must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise malformed(owner, field, f"must be at least {minimum}, got {value}")
    return value


def check_optional_int(owner: str, field: str, value: Any, *, minimum: int = 0) -> int | None:
    return None if value is None else check_int(owner, field, value, minimum=minimum)


def check_timestamp(owner: str, field: str, value: Any) -> float:
    """Unix time in seconds; JSON may carry it as an integer."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise malformed(owner, field, f"must be a Unix time in seconds, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise malformed(owner, field, f"must be a finite, non-negative Unix time, got {value!r}")
    return float(value)


def check_bool(owner: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise malformed(owner, field, f"must be true or false, got {type(value).__name__} {value!r}")
    return value


def check_text(owner: str, field: str, value: Any, *, max_length: int) -> str:
    if not isinstance(value, str):
        raise malformed(owner, field, f"must be a string, got {type(value).__name__} {value!r}")
    if len(value) > max_length:
        raise malformed(owner, field, f"is {len(value)} characters; the limit is {max_length}")
    return value


def check_pattern(owner: str, field: str, value: Any, pattern: re.Pattern[str], description: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise malformed(owner, field, f"must be {description}, got {value!r}")
    return value


def check_token(owner: str, field: str, value: Any) -> str:
    return check_pattern(owner, field, value, TOKEN_PATTERN,
                         "1 to 128 letters, digits or '._:+-' (no spaces)")  # fmt: skip


def check_enum(owner: str, field: str, value: Any, enum_type: type) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in enum_type)
        raise malformed(owner, field, f"must be one of {choices}, got {value!r}") from None


def check_json_object(owner: str, field: str, value: Any) -> dict[str, Any]:
    """A JSON object of JSON values, returned as a deep copy so the message owns it."""
    if not isinstance(value, Mapping):
        raise malformed(owner, field, f"must be a JSON object, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise malformed(owner, field, f"must hold only JSON values (str, number, bool, null, list, "
                                      f"object with string keys): {error}") from None  # fmt: skip
