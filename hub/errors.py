"""Errors the hub reports to the person running it.

Each is a ``ValueError`` subclass, so the command line prints it as one line (no
traceback): they describe a mistake in the setup, not a bug.
"""

from __future__ import annotations

__all__ = ["HubError", "HubConfigError", "BrokerPortInUse", "StateDirMismatch", "ClientRegistryError"]


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
