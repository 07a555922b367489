"""``fedvlm``: whole-federation commands (the demo; simulation comes with issue 6)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fedvlm.shared.cli_support import UsageError, run_command
from fedvlm.simulate.command import add_simulate_command

PROGRAM = "fedvlm"


def build_parser() -> argparse.ArgumentParser:
    from fedvlm import __version__
    from fedvlm.shared.strategies import STRATEGY_NAMES

    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="FedVLM: personalised federated fine-tuning of vision-language models (pLoRA). "
                    "Device commands are in fedvlm-edge, hub commands in fedvlm-hub.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="a whole federation on one machine: hub, embedded broker, devices",
        description="Run a whole federation on this machine with the real commands: a pre-trained tiny VLM, "
                    "non-IID synthetic data, `fedvlm-hub start` with its embedded broker and one "
                    "`fedvlm-edge join` process per device; then score every device on its own test set, export "
                    "client 0's personalised model to ONNX and ask one question with two clients' adapters.",
    )
    demo.add_argument("--work-dir", type=Path, default=Path("work/demo"),
                      help="where everything goes; model, data and the ONNX base export are reused by a "
                           "second run (default: work/demo)")
    demo.add_argument("--clients", type=int, default=4, help="devices (default: 4)")
    demo.add_argument("--rounds", type=int, default=5, help="federated rounds (default: 5)")
    demo.add_argument("--strategy", default="plora", choices=STRATEGY_NAMES, help="default: plora")
    demo.add_argument("--broker", metavar="URL", help="use an existing broker, e.g. mqtt://127.0.0.1:1883 "
                                                      "(default: the hub's embedded broker on a free port)")
    demo.add_argument("--local-steps", type=int, default=30, help="training steps per device per round (default: 30)")
    demo.add_argument("--examples-per-client", type=int, default=64, help="training examples per device (default: 64)")
    demo.add_argument("--quantization", default="nf4", choices=["none", "nf4", "int8"],
                      help="quantisation of the devices' frozen base (default: nf4)")
    demo.add_argument("--seed", type=int, default=0, help="data and model seed (default: 0)")
    demo.add_argument("--model-size", default="small", choices=["tiny", "small"],
                      help="tiny VLM size: small (~3M parameters, the demo) or tiny (<1M, a quick smoke run; "
                           "it learns little) (default: small)")
    from fedvlm.edge.zoo import ARCHITECTURES

    family = demo.add_mutually_exclusive_group()
    family.add_argument("--arch", default="llava", choices=list(ARCHITECTURES), metavar="NAME",
                        help=f"family of the tiny model built and pre-trained: {', '.join(ARCHITECTURES)} "
                             "(default: llava)")
    family.add_argument("--model", metavar="DIR|ID", help="run the federation on this model as it is (a folder, or "
                                                           "a Hugging Face id in the local cache): no pre-training")
    demo.add_argument("--pretrain-steps", type=int, default=800,
                      help="pre-training steps of the base model, cached per recipe (default: 800)")
    demo.set_defaults(handler=_demo)
    add_simulate_command(commands)
    _add_make_rlaifv_data_command(commands)
    return parser


def _add_make_rlaifv_data_command(commands) -> None:
    from fedvlm.edge.data.preference_scenes import SOURCES

    make = commands.add_parser(
        "make-rlaifv-data", help="write an offline RLAIF-V-like preference data set (parquet shards)",
        description="Draw scenes of coloured shapes and write preference pairs in the exact RLAIF-V parquet schema: "
                    "a long-form chosen description that gets every detail right, a rejected one with one or two "
                    "hallucinated details (wrong colour, count or place), from several sources that differ in "
                    "question, style and what they describe. Sources: "
                    + "; ".join(f"{name} ({s.model}, {s.type})" for name, s in SOURCES.items()) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    make.add_argument("out_dir", type=Path, metavar="OUT", help="folder for the parquet shards")
    make.add_argument("--rows", type=int, default=1000, help="preference pairs to write")
    make.add_argument("--sources", default=",".join(SOURCES), help="comma-separated sources, dealt in turn")
    make.add_argument("--shards", type=int, default=1, help="parquet files to spread the rows over")
    make.add_argument("--image-size", type=int, default=64, help="pixels per side")
    make.add_argument("--grain", type=int, default=0,
                      help="per-pixel noise amplitude (0-127): 0 gives small clean PNGs, ~40 photo-sized ones")
    make.add_argument("--seed", type=int, default=0, help="what is drawn")
    make.set_defaults(handler=_make_rlaifv_data)


def _make_rlaifv_data(args: argparse.Namespace) -> int:
    from collections import Counter

    from fedvlm.edge.data import scan_data
    from fedvlm.edge.data.preference_scenes import write_preference_shards
    from fedvlm.edge.data.scenes import MIN_IMAGE_SIZE

    if args.image_size < MIN_IMAGE_SIZE:
        raise UsageError(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    if not 0 <= args.grain <= 127:
        raise UsageError(f"--grain must be between 0 and 127, got {args.grain}")
    sources = [name.strip() for name in args.sources.split(",") if name.strip()]
    files = write_preference_shards(args.out_dir, args.rows, sources=sources, shards=args.shards,
                                    image_size=args.image_size, seed=args.seed, grain=args.grain)
    counts = Counter(ref.origin_dataset for file in files for ref in scan_data(file).rows)
    size = sum(file.stat().st_size for file in files)
    print(f"wrote {args.rows} preference pairs in {len(files)} shard(s), {size / 1e6:.1f} MB, to {args.out_dir}: "
          + ", ".join(f"{name} {count}" for name, count in sorted(counts.items())))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedvlm.demo import DemoSettings, run_demo

    for name in ("clients", "rounds", "local_steps", "examples_per_client", "pretrain_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.clients < 2:
        raise UsageError("--clients must be at least 2: a federation needs more than one device")
    settings = DemoSettings(work_dir=args.work_dir, clients=args.clients, rounds=args.rounds, strategy=args.strategy,
                            broker=args.broker, local_steps=args.local_steps,
                            examples_per_client=args.examples_per_client, quantization=args.quantization,
                            seed=args.seed, model_size=args.model_size, pretrain_steps=args.pretrain_steps,
                            arch=args.arch, model=args.model)
    return run_demo(settings)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from fedvlm.edge.torch_stack import check_torch_stack

    check_torch_stack()  # demo and simulate load transformers: a broken install is one line, before it
    return args.handler(args)


def user_errors() -> tuple[type[BaseException], ...]:
    """What ``fedvlm`` reports in one line.

    Not ValueError or KeyError in general: one from deep inside (numpy, safetensors, torch)
    is a bug, and its traceback is what a bug report needs. Bad flags raise UsageError; the
    edge code the demo and simulate run in-process raises EdgeError (a model folder that is
    no model, unreadable data, a quantisation this machine cannot do); a process the demo
    started that failed raises DemoStepFailed with its last line and log (the demo's own
    traceback would say nothing more).
    """
    from fedvlm.edge.errors import EdgeError
    from fedvlm.errors import DemoStepFailed
    from fedvlm.shared.mqtt_link import BrokerUnavailable

    return (UsageError, EdgeError, BrokerUnavailable, DemoStepFailed, FileNotFoundError, FileExistsError,
            NotADirectoryError, PermissionError, IsADirectoryError)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv, user_errors(), PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
