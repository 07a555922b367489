"""Errors the hub reports to the person running it.

Each is a ``ValueError`` subclass, so library callers that catch ValueError keep working;
``fedvlm-hub`` prints them as one line (no traceback): they describe a mistake in the
setup, not a bug.
"""

from __future__ import annotations

__all__ = ["HubError", "HubConfigError", "BrokerPortInUse", "StateDirMismatch", "ClientRegistryError", "user_errors"]


class HubError(ValueError):
    """A problem the hub's operator can fix; the message says how."""


class HubConfigError(HubError):
    """A configuration value (TOML file or command-line flag) that is missing, unknown or invalid."""


class BrokerPortInUse(HubError):
    """The embedded broker's port is taken, usually by a broker that already runs there."""


class StateDirMismatch(HubError):
    """The state directory belongs to another federation, strategy or LoRA layout."""


class ClientRegistryError(HubError):
    """Registering, listing or revoking a client failed (e.g. the name is taken)."""


class RoundNotCollecting(HubError):
    """A hub worker tried to commit to a round the coordinator closed or sealed."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What ``fedvlm-hub`` reports in one line.

    Not ValueError or KeyError in general: one from deep inside (numpy, safetensors,
    sqlite) is a bug, and its traceback is what a bug report needs. Mistakes in flags,
    config files, secrets keys and state dirs raise HubError or UsageError instead.
    """
    from fedvlm.shared.mqtt_link import BrokerUnavailable
    from fedvlm.shared.usage_error import UsageError

    return (HubError, UsageError, BrokerUnavailable, FileNotFoundError, PermissionError, IsADirectoryError)
