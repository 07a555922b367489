"""What every FedVLM command line shares: user errors end in one clear line, not a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .usage_error import UsageError

__all__ = ["USER_ERROR_EXIT", "UsageError", "add_lora_target_options", "lora_target_fields", "option_value",
           "parse_option", "read_secret_file", "run_command"]

# Exit status for a user mistake (bad flag, missing file, malformed data), as argparse uses.
USER_ERROR_EXIT = 2


def add_lora_target_options(parser) -> None:
    """``--lora-parts``, ``--lora-layers``, ``--lora-target-modules``: which layers get LoRA
    factors (:class:`~fedvlm.shared.lora_config.LoraSettings`), the same flags on every command."""
    from .lora_config import LAYER_KINDS, PARTS

    parser.add_argument("--lora-parts", metavar="PARTS",
                        help=f"comma-separated parts of the VLM to adapt: {', '.join(PARTS)} (default: language)")
    parser.add_argument("--lora-layers", metavar="KINDS",
                        help=f"comma-separated layer kinds in those parts: {', '.join(LAYER_KINDS)} "
                             "(default: attention,mlp)")
    parser.add_argument("--lora-target-modules", metavar="REGEX",
                        help="instead of parts and layers: a regex that the full names of the linear layers to "
                             "adapt must match, e.g. '.*language_model.*\\.(q_proj|v_proj)'")


def lora_target_fields(args) -> dict:
    """The LoRA target settings given on the command line (absent ones are left to the defaults)."""
    fields: dict = {}
    for flag, field in (("lora_parts", "parts"), ("lora_layers", "layers")):
        text = getattr(args, flag, None)
        if text is not None:
            fields[field] = tuple(name.strip() for name in text.split(",") if name.strip())
    if getattr(args, "lora_target_modules", None) is not None:
        fields["target_modules"] = args.lora_target_modules
    return fields


def read_secret_file(path: str | os.PathLike[str], what: str) -> str:
    """The one-line secret in ``path`` (a client secret, a broker password), stripped.

    Secrets come from files rather than flags so they never show in ``ps``.
    """
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the {what} file {str(path)!r} is not text; give the file holding the {what} as one "
                         "line of text") from None
    if not secret:
        raise UsageError(f"the {what} file {str(path)!r} is empty")
    return secret


def option_value(text: str) -> Any:
    """An option's value as written on a command line: JSON (numbers, true, false, null,
    lists) when it parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as (key, ``option_value(VALUE)``), for flags such as ``--strategy-option``."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. shared_rank=4)")
    return key.strip(), option_value(value.strip())


def run_command(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None,
                user_errors: tuple[type[BaseException], ...], program: str) -> int:
    """Run ``main(argv)``; exceptions in ``user_errors`` print ``program: error: ...`` and exit 2.

    Set FEDVLM_DEBUG=1 to see the traceback anyway. Anything else is a bug and keeps its
    traceback so it can be reported.
    """
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    except user_errors as exc:
        if os.environ.get("FEDVLM_DEBUG"):
            raise
        print(f"{program}: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
