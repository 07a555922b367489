"""The edge SDK's user-facing errors, in one light module.

The command line catches these and prints one clear line instead of a traceback; keeping
them here (no torch import) keeps ``fedvlm-edge --help`` fast.
"""

from __future__ import annotations


class EdgeError(Exception):
    """A mistake the user can fix: the message says what was wrong and what to do."""


class ModelLoadError(EdgeError):
    """The model directory is missing, incomplete or not a vision-language model."""


class QuantizationError(EdgeError):
    """The requested quantisation cannot be applied."""


class LoraTargetError(EdgeError):
    """The LoRA targets match no layer of this model."""


class ChatFormatError(EdgeError):
    """The processor's chat template or tokenizer does not say where an answer starts or ends."""


class DeviceStateError(EdgeError):
    """The state directory is unreadable or belongs to another federation or model."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What ``fedvlm-edge`` reports in one line. Not ValueError or KeyError in general: those
    from deep inside are bugs, and their traceback is what a bug report needs."""
    from fedvlm.edge.data.records import DataError
    from fedvlm.shared.usage_error import UsageError
    from fedvlm.shared.mqtt_link import BrokerUnavailable
    from fedvlm.shared.protocol import ProtocolError
    from fedvlm.shared.tensor_codec import CodecError

    return (EdgeError, DataError, UsageError, BrokerUnavailable, ProtocolError, CodecError, FileNotFoundError,
            FileExistsError, NotADirectoryError, PermissionError, IsADirectoryError, TimeoutError)
