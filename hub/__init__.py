"""FedVLM hub: aggregates the shared LoRA factors and broadcasts the global ones.

- ``HubConfig`` (config.py): every setting, from a TOML file and flags.
- ``HubService`` (service.py): runs a federation's rounds over MQTT, durably.
- ``EmbeddedBroker`` (broker.py): an in-process MQTT 3.1.1 broker on loopback.

The command line is ``fedvlm-hub`` (cli.py). The hub imports only ``fedvlm.shared`` and
third-party packages (no torch, no transformers).
"""

from .broker import EmbeddedBroker
from .config import HubConfig, load_config
from .errors import BrokerPortInUse, ClientRegistryError, HubConfigError, HubError, StateDirMismatch
from .service import HubService
from .status import HubStatus, read_status

__all__ = [
    "BrokerPortInUse",
    "ClientRegistryError",
    "EmbeddedBroker",
    "HubConfig",
    "HubConfigError",
    "HubError",
    "HubService",
    "HubStatus",
    "StateDirMismatch",
    "load_config",
    "read_status",
]
