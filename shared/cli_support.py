"""What every FedVLM command line shares: user errors end in one clear line, not a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .usage_error import UsageError

__all__ = ["USER_ERROR_EXIT", "UsageError", "option_value", "parse_option", "read_secret_file", "run_command"]

# Exit status for a user mistake (bad flag, missing file, malformed data), as argparse uses.
USER_ERROR_EXIT = 2


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
