"""``fedvlm-hub``: the hub's command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fedvlm.shared.cli_support import run_command

PROGRAM = "fedvlm-hub"


def build_parser() -> argparse.ArgumentParser:
    from fedvlm import __version__

    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="FedVLM hub: aggregates the shared LoRA factors of a federation's devices and "
                    "broadcasts the global ones over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv, (ValueError, FileNotFoundError), PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
