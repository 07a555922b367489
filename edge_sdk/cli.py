"""``fedvlm-edge``: the device-side command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from fedvlm.edge.cli_data import add_data_options, load_device_records
from fedvlm.shared.cli_support import UsageError, add_lora_target_options, lora_target_fields, read_secret_file, run_command

PROGRAM = "fedvlm-edge"
# The held-out scores a round's line shows, where they apply to the data.
_REPORTED_SCORES = ("loss", "perplexity", "preference_accuracy", "reward_margin", "rouge_l", "bleu")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR|ID",
                        help="a saved transformers VLM: its directory, or a Hugging Face id already in the local "
                             "cache (nothing is downloaded)")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "nf4", "int8"],
                        help="quantisation of the frozen base (default: auto = nf4 on CUDA, none on a CPU "
                             "unless the model needs more than a quarter of the RAM)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _add_lora_options(parser: argparse.ArgumentParser) -> None:
    from fedvlm.shared.strategies import STRATEGY_NAMES

    parser.add_argument("--strategy", default="plora", choices=STRATEGY_NAMES, help="which factors are shared "
                        "(default: plora); its options at their defaults")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha; scaling is alpha/r (default: 16)")
    parser.add_argument("--lora-seed", type=int, default=0, help="seed of the LoRA initialisation, fixed per federation")
    add_lora_target_options(parser)


def _add_objective_options(parser: argparse.ArgumentParser, *, hub_decides: bool = False) -> None:
    from fedvlm.shared.objective_names import DEFAULT_DPO_BETA, OBJECTIVE_NAMES

    after = "; a hub that announces an objective overrides this (devices follow their federation)" if hub_decides \
        else ""
    parser.add_argument("--objective", default="sft", choices=OBJECTIVE_NAMES,
                        help="sft: train on the chosen answer; dpo: chosen against rejected, the reference being "
                             f"the adapter as it is when training starts (default: sft{after})")
    parser.add_argument("--dpo-beta", type=float, default=DEFAULT_DPO_BETA,
                        help=f"DPO's beta; also scales the reported reward margin (default: {DEFAULT_DPO_BETA})")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="length of the greedy answers scored on --eval-data (default: 8 for short answers; "
                             "the longest reference plus 8 for long ones, at most 512)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="FedVLM edge SDK: personalised LoRA training on a device. The personal "
                    "factors never leave it.",
    )
    from fedvlm import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    from fedvlm.edge.zoo import ARCHITECTURES

    make = commands.add_parser(
        "make-tiny-model", help="build a tiny random-weight VLM of a supported family for tests and demos",
        description="Build a tiny random-weight VLM of one family (its own config classes, image processor and "
                    "chat template, a tokenizer trained here) and save it with save_pretrained. Families: "
                    + "; ".join(f"{name}: {what}" for name, what in ARCHITECTURES.items()) + ".")
    make.add_argument("out_dir", metavar="DIR", help="where to save the model")
    make.add_argument("--arch", default="llava", choices=list(ARCHITECTURES), metavar="NAME",
                      help=f"the family: {', '.join(ARCHITECTURES)} (default: llava)")
    make.add_argument("--size", default="tiny", choices=["tiny", "small"],
                      help="tiny (<1M parameters) or small (~3M) (default: tiny)")
    make.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    make.add_argument("--vision-tower", default="clip", choices=["clip", "siglip"], help="llava only (default: clip)")
    make.set_defaults(handler=_make_tiny_model)

    train = commands.add_parser("train", help="train the device's adapter on its local data",
                                description="Local pLoRA training: load the model, restore the device state "
                                            "(if any), train on local data, evaluate, save the state.")
    _add_model_options(train)
    _add_lora_options(train)
    train.add_argument("--data", required=True, metavar="PATH",
                       help="RLAIF-V records: a .parquet or .jsonl file, or a directory of them")
    train.add_argument("--eval-data", metavar="PATH", help="held-out records to score before and after training")
    train.add_argument("--state-dir", required=True, metavar="DIR", help="the device's state directory")
    train.add_argument("--federation", default="local", help="federation name recorded in the state (default: local)")
    train.add_argument("--client-id", default="device", help="client id recorded in the state (default: device)")
    train.add_argument("--steps", type=int, default=50, help="optimiser steps (default: 50)")
    train.add_argument("--batch-size", type=int, default=8, help="default: 8")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    train.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: 2e-3)")
    train.add_argument("--seed", type=int, default=0, help="batch-order seed (default: 0)")
    add_data_options(train)
    _add_objective_options(train)
    _add_eval_options(train)
    train.set_defaults(handler=_train)

    join = commands.add_parser("join", help="join a federation's hub and take part in its rounds",
                               description="Join a hub over MQTT: fetch the global factors, train on local "
                                           "data when selected, publish the signed update. Only the factors "
                                           "the federation's strategy shares leave the device.")
    join.add_argument("--hub", required=True, metavar="URL", help="broker URL: mqtt://host:port or mqtts://host:port")
    join.add_argument("--federation", required=True, help="the federation's name")
    join.add_argument("--client-id", required=True, help="this device's id, as registered with the hub")
    join.add_argument("--secret-file", required=True, metavar="FILE",
                      help="file holding the secret `fedvlm-hub clients add` printed")
    join.add_argument("--model", required=True, metavar="DIR|ID",
                      help="the base VLM: its directory, or a Hugging Face id in the local cache")
    join.add_argument("--data", required=True, metavar="PATH", help="the device's RLAIF-V training records")
    join.add_argument("--eval-data", metavar="PATH", help="held-out records scored after each round")
    join.add_argument("--state-dir", required=True, metavar="DIR", help="the device's state directory")
    join.add_argument("--rounds", type=int, help="leave after sending this many updates (default: until the hub is done)")
    join.add_argument("--steps", type=int, default=20, help="local optimiser steps per round unless the hub says (default: 20)")
    join.add_argument("--batch-size", type=int, default=8, help="default: 8")
    join.add_argument("--lr", type=float, default=2e-3, help="learning rate unless the hub says (default: 2e-3)")
    join.add_argument("--quantization", default="auto", choices=["auto", "none", "nf4", "int8"], help="default: auto")
    _add_objective_options(join, hub_decides=True)
    join.add_argument("--lora-rank", type=int, metavar="R", help="this device's LoRA rank, for strategies whose "
                      "devices may differ in rank (flexlora): at most the federation's (default: the federation's)")
    join.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    join.add_argument("--username", help="broker username (production brokers)")
    join.add_argument("--password-file", metavar="FILE", help="file holding the broker password")
    join.add_argument("--broker-login", action="store_true",
                      help="log in to the broker as the client id with the password derived from the secret "
                           "(the accounts `fedvlm-hub broker-config` sets up); replaces --username/--password-file")
    join.add_argument("--ca-file", metavar="FILE", help="CA certificate for TLS (mqtts://)")
    join.add_argument("--cert-file", metavar="FILE", help="client certificate for TLS")
    join.add_argument("--key-file", metavar="FILE", help="client key for TLS")
    join.add_argument("--mqtt-version", default="auto", choices=["auto", "5", "3.1.1"],
                      help="MQTT protocol version (default: auto, 5 with a fallback to 3.1.1)")
    privacy = join.add_argument_group(
        "differential privacy", "Clip this round's change to the shared factors to L2 norm C and add Gaussian noise "
        "of standard deviation sigma*C before the update is signed; (epsilon, delta) is reported per round and in "
        "total (RDP accountant, kept in the state dir). Personal factors are never touched.")
    privacy.add_argument("--dp-clip", type=float, metavar="C", help="L2 norm bound of the shared update's change "
                         "(turns differential privacy on; needs --dp-noise-multiplier)")
    privacy.add_argument("--dp-noise-multiplier", type=float, metavar="SIGMA", help="noise standard deviation "
                         "as a multiple of C")
    privacy.add_argument("--dp-delta", type=float, default=1e-5, metavar="DELTA",
                         help="delta of the reported (epsilon, delta) (default: 1e-5)")
    add_data_options(join)
    join.add_argument("--timeout", type=float, help="give up after this many seconds")
    join.add_argument("--quiet", action="store_true", help="no progress bars (training, model loading)")
    join.set_defaults(handler=_join)

    export = commands.add_parser("export", help="export the personalised model to ONNX",
                                 description="Export the base VLM to ONNX once (prefill and decode-step graphs "
                                             "with the LoRA factors as swappable inputs) and write this device's "
                                             "adapter (personal + current global factors) as "
                                             "<client-id>.onnx_adapter beside it; --merged writes one "
                                             "self-contained model with the adapter folded into the weights.")
    export.add_argument("--state-dir", required=True, metavar="DIR", help="the device's state directory")
    export.add_argument("--model", required=True, metavar="DIR|ID",
                        help="the base VLM: its directory, or a Hugging Face id in the local cache")
    export.add_argument("--out", required=True, metavar="DIR", help="where to write the ONNX export")
    export.add_argument("--merged", action="store_true", help="fold the adapter into the weights (no adapter file)")
    export.set_defaults(handler=_export)

    ask = commands.add_parser("ask", help="answer a question about an image with ONNX Runtime",
                              description="Load an ONNX export, activate an adapter (if given) and answer "
                                          "greedily.")
    ask.add_argument("--onnx", required=True, metavar="DIR", help="directory written by `fedvlm-edge export`")
    ask.add_argument("--adapter", metavar="FILE", help="a .onnx_adapter file (default: the base model, no adapter)")
    ask.add_argument("--image", required=True, metavar="IMG", help="image file")
    ask.add_argument("--question", required=True, help="the question")
    ask.add_argument("--max-new-tokens", type=int, default=8, help="default: 8")
    ask.set_defaults(handler=_ask)
    return parser


def _join(args: argparse.Namespace) -> int:
    import logging

    from fedvlm.edge.data import load_records
    from fedvlm.edge.edge_client import ConnectionOptions, EdgeClient
    from fedvlm.edge.objectives import build_objective
    from fedvlm.edge.training import TrainingConfig

    # Settings are checked before anything slow (loading data, the model) happens.
    privacy = None
    if args.dp_clip is not None or args.dp_noise_multiplier is not None:
        from fedvlm.edge.privacy import DPConfig

        if args.dp_clip is None or args.dp_noise_multiplier is None:
            raise UsageError("differential privacy needs both --dp-clip and --dp-noise-multiplier")
        privacy = DPConfig(clip=args.dp_clip, noise_multiplier=args.dp_noise_multiplier, delta=args.dp_delta)
    if args.broker_login and (args.username or args.password_file):
        raise UsageError("--broker-login logs in as the client id with the password derived from the secret; "
                         "drop --username/--password-file, or drop --broker-login")
    from fedvlm.shared.mqtt_link import BrokerAddress

    hub_address = BrokerAddress.parse(args.hub, ca_file=args.ca_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    secret = read_secret_file(args.secret_file, "secret")
    records = load_device_records(args)
    eval_records = load_records(args.eval_data, skip_bad=args.skip_bad).records if args.eval_data else None
    username = args.username
    password = read_secret_file(args.password_file, "password") if args.password_file else None
    if args.broker_login:
        from fedvlm.shared.broker_credentials import broker_password

        username, password = args.client_id, broker_password(secret)
    connection = ConnectionOptions(
        username=username,
        password=password,
        ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file, mqtt_protocol=args.mqtt_version,
    )
    from fedvlm.shared.broker_credentials import plaintext_warning

    warning = plaintext_warning(hub_address.host, tls=hub_address.tls, has_password=password is not None)
    if warning:
        print(f"{PROGRAM}: warning: {warning}", file=sys.stderr)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar
    client = EdgeClient(
        args.model, records.records, args.hub, args.federation, args.client_id, secret, args.state_dir,
        eval_examples=eval_records,
        training=TrainingConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                progress=not args.quiet, objective=build_objective(args.objective, args.dpo_beta)),
        quantization=args.quantization, device=args.device, connection=connection, privacy=privacy,
        lora_rank=args.lora_rank, skip_unpaired=args.skip_bad,
    )
    reports = client.run(rounds=args.rounds, timeout=args.timeout)
    for report in reports:
        accuracy = report.evaluation["accuracy"] if report.evaluation else None
        scores = {key: value for key, value in (report.evaluation or {}).items()
                  if key in _REPORTED_SCORES and value is not None}
        print(json.dumps({"round": report.round, "accepted": report.accepted, "reason": report.reason,
                          "objective": report.train.get("objective", "sft"), "train_loss": round(report.train["loss"], 4),
                          "eval_accuracy": accuracy, **({"eval": scores} if scores else {}),
                          "bytes_sent": report.bytes_sent,
                          **({"privacy": {key: report.privacy[key] for key in ("epsilon_round", "epsilon_total",
                                                                                 "delta", "releases")}}
                             if report.privacy else {})}))  # fmt: skip
    print(f"state kept in {args.state_dir}")
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from fedvlm.edge.tiny_model import make_tiny_model, parameter_count
    from fedvlm.edge.model_loading import load_vlm

    out = make_tiny_model(args.out_dir, args.size, arch=args.arch, seed=args.seed, vision_tower=args.vision_tower)
    loaded = load_vlm(out, quantization="none", device="cpu")
    print(f"saved a {args.size} {args.arch} VLM ({type(loaded.model).__name__}, "
          f"{parameter_count(loaded.model):,} parameters, fingerprint {loaded.fingerprint}) to {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from fedvlm.edge.adapters import LoraSettings
    from fedvlm.edge.data import load_records
    from fedvlm.edge.device_state import check_compatible, load_state, save_state
    from fedvlm.edge.objectives import DpoObjective, build_objective
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.edge.training import TrainingConfig
    from fedvlm.shared.strategies import build_strategy

    objective = build_objective(args.objective, args.dpo_beta)  # a bad beta ends here, before anything slow
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    records = load_device_records(args)
    eval_records = load_records(args.eval_data, skip_bad=args.skip_bad).records if args.eval_data else None
    if isinstance(objective, DpoObjective):
        objective.check(records.records)
    lora = LoraSettings(r=args.rank, alpha=args.alpha, init_seed=args.lora_seed, **lora_target_fields(args))
    previous = load_state(args.state_dir)
    # Training resumed on a state goes on with the options its strategy had (a federation's,
    # announced by its hub), not the strategy's defaults.
    options = previous.strategy_options if previous is not None and previous.strategy == args.strategy else {}
    model = PersonalVLM.from_pretrained(args.model, lora=lora, strategy=build_strategy(args.strategy, options, lora),
                                        quantization=args.quantization, device=args.device)
    if previous is not None:
        check_compatible(previous, federation=args.federation, client_id=args.client_id,
                         base_fingerprint=model.fingerprint, lora=lora.to_dict(), strategy=model.strategy.name)
        model.restore(previous)
    print(f"model {args.model}: quantisation {model.loaded.quantization} on {model.loaded.device}; "
          f"{len(records.records)} training records")

    # Scores that apply to the data: exact match for short answers; loss and perplexity; ROUGE-L
    # and BLEU for long ones; preference accuracy and reward margin (against the model before this
    # training) when the records have rejected answers.
    report: dict = {"objective": {"name": objective.name, **objective.options()}}
    scoring = dict(max_new_tokens=args.max_new_tokens, beta=args.dpo_beta)
    if eval_records:
        before = model.evaluate(eval_records, **scoring)
        report["before"] = before.to_dict()
    config = TrainingConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            learning_rate=args.lr, seed=args.seed, objective=objective)
    report["train"] = model.train(records.records, config).to_dict()
    if eval_records:
        report["after"] = model.evaluate(eval_records, reference=before.scores, **scoring).to_dict()
    round_number = previous.round if previous else 0
    state = model.device_state(federation=args.federation, client_id=args.client_id, round=round_number,
                               global_version=previous.global_version if previous else 0,
                               global_state=previous.global_state if previous else {},
                               metrics=(previous.metrics if previous else []) + [report])
    snapshot = save_state(args.state_dir, state, write_peft_adapter=model.save_pretrained)
    print(json.dumps(report, indent=2))
    print(f"state saved to {snapshot}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedvlm.edge.adapters import LoraSettings
    from fedvlm.edge.device_state import load_state
    from fedvlm.edge.errors import DeviceStateError
    from fedvlm.edge.onnx_adapter import ADAPTER_SUFFIX, write_adapter
    from fedvlm.edge.onnx_export import export_onnx, read_manifest
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.strategies import build_strategy

    state = load_state(args.state_dir)
    if state is None:
        raise DeviceStateError(f"{args.state_dir!r} holds no device state: train or join a federation first")
    lora = LoraSettings.from_dict(state.lora)
    model = PersonalVLM.from_pretrained(args.model, lora=lora, quantization="none", device="cpu",
                                        strategy=build_strategy(state.strategy, state.strategy_options, lora))
    if model.fingerprint != state.base_fingerprint:
        raise DeviceStateError(f"the state in {args.state_dir!r} was trained on base {state.base_fingerprint}, "
                               f"{args.model!r} is base {model.fingerprint}")
    model.restore(state)
    out = export_onnx(model, args.out, merged=args.merged)
    manifest = read_manifest(out)
    if manifest["fixed_picture_size"]:  # LLaVA-NeXT/OneVision: their tiling does not trace for any size
        height, width = manifest["fixed_picture_size"]
        print(f"note: this family's export answers at one picture size, {width}x{height}: "
              "`fedvlm-edge ask` resizes every picture to it")
    if args.merged:
        print(f"merged ONNX model of client {state.client_id} (round {state.round}) written to {out}")
        return 0
    adapter = write_adapter(out / f"{state.client_id}{ADAPTER_SUFFIX}", model.adapter_state(), manifest)
    print(f"ONNX base written to {out}; adapter of client {state.client_id} (round {state.round}): {adapter} "
          f"({adapter.stat().st_size:,} bytes)")
    return 0


def _ask(args: argparse.Namespace) -> int:
    from PIL import Image

    from fedvlm.edge.onnx_runner import OnnxVLM

    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as exc:
        raise FileNotFoundError(f"cannot read the image {args.image!r}: {exc}") from exc
    vlm = OnnxVLM.load(args.onnx)
    vlm.activate(args.adapter)
    print(vlm.answer(image, args.question, max_new_tokens=args.max_new_tokens))
    return 0


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from fedvlm.edge.torch_stack import check_torch_stack

    check_torch_stack()  # every command loads transformers: a broken install is one line, before it
    return args.handler(args)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedvlm.edge.errors import user_errors

    return user_errors()


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv, _user_errors(), PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
