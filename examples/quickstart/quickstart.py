"""Quickstart: a whole pLoRA federation in one short script, over FedVLM's Python API.

One hub (``fedvlm.hub.HubService``, with its embedded MQTT broker) and a few devices
(``fedvlm.edge.edge_client.EdgeClient``, one thread each) fine-tune a small
vision-language model together. Every device trains LoRA factors on its own pictures;
only the B factors travel to the hub, which averages them; the A factors never leave a
device, so each ends with a model personalised to its own answer convention.

    python examples/quickstart/quickstart.py                    # 4 devices, 5 rounds (a few minutes)
    python examples/quickstart/quickstart.py --size tiny --rounds 2 --clients 2    # seconds

Nothing is downloaded: the base model is a tiny LLaVA built and pre-trained locally
(cached in the work dir), and the data is synthetic (coloured shapes; each device answers
in its own language, some through a mirrored camera).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import threading
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only: a missing one is an error, never a download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The SDK silences this transformers deprecation (raised inside PEFT) around each call, but
# warning filters are process-wide and not thread-safe: devices starting at once in threads
# can let it through. Nothing in it is for a user to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import numpy as np  # noqa: E402

from fedvlm.edge.data import ScenarioConfig, generate_federation  # noqa: E402
from fedvlm.edge.device_state import load_state  # noqa: E402
from fedvlm.edge.edge_client import ConnectionOptions, EdgeClient  # noqa: E402
from fedvlm.edge.pretraining import PretrainingConfig, make_pretrained_tiny_model  # noqa: E402
from fedvlm.edge.tiny_model import SIZES  # noqa: E402
from fedvlm.edge.training import TrainingConfig  # noqa: E402
from fedvlm.hub import HubConfig, HubService, read_status  # noqa: E402
from fedvlm.hub.clients import register_client  # noqa: E402

FEDERATION = "quickstart"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # tiny models load in milliseconds: no bars
    work = args.work_dir

    # 1. The base model all devices share: a tiny VLM, pre-trained briefly so it can see.
    #    Cached: a second run with the same settings reuses it.
    print(f"[1/4] base model ({args.size}, {args.pretrain_steps} pre-training steps)", flush=True)
    model_dir = make_pretrained_tiny_model(
        work / "model", args.size, config=PretrainingConfig(steps=args.pretrain_steps, progress=False))

    # 2. Non-IID data: the same kind of pictures everywhere, but every device answers in its
    #    own language (and odd ones through a mirrored camera, so "left" means right).
    federation = generate_federation(ScenarioConfig.preset(
        "concept-shift", n_clients=args.clients, examples_per_client=args.examples_per_client,
        test_examples_per_client=16, image_size=SIZES[args.size].image_size, seed=0))

    # 3. The hub, with an embedded MQTT broker on a free local port. Each device is
    #    registered and gets a secret: its updates are signed with it.
    print(f"[2/4] hub: {args.rounds} rounds of pLoRA with {args.clients} devices", flush=True)
    for stale in ("hub", "devices"):  # a fresh federation each run; the model stays cached
        shutil.rmtree(work / stale, ignore_errors=True)
    hub = HubService(HubConfig(
        federation=FEDERATION, strategy="plora", rounds=args.rounds, min_clients=args.clients,
        state_dir=work / "hub", embedded_port=free_port(), local_steps=args.local_steps, learning_rate=3e-3))
    secrets = {client.client_id: register_client(hub.config.state_dir, client.client_id)
               for client in federation.clients}
    hub.start()

    # 4. The devices: each one trains on its own data when the hub selects it and sends only
    #    its B factors; its A factors and its pictures stay in its state directory.
    print("[3/4] devices join over MQTT and train", flush=True)
    devices = [
        EdgeClient(model_dir, client.train, hub.broker_url, FEDERATION, client.client_id,
                   secrets[client.client_id], work / "devices" / client.client_id,
                   eval_examples=client.test, training=TrainingConfig(progress=False),
                   # The embedded broker speaks MQTT 3.1.1: saying so skips a first MQTT 5 attempt.
                   connection=ConnectionOptions(mqtt_protocol="3.1.1"))
        for client in federation.clients
    ]
    failures: list[BaseException] = []

    def take_part(device: EdgeClient) -> None:
        try:
            device.run(timeout=args.timeout)
        except BaseException as error:  # reported below: a thread's exception would vanish
            failures.append(error)

    threads = [threading.Thread(target=take_part, args=(device,)) for device in devices]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        hub.stop()
    if failures:
        print(f"quickstart: error: a device failed: {failures[0]}", file=sys.stderr)
        return 1

    # What came out: one global version that every device holds, and personal factors
    # that differ from device to device.
    print("[4/4] results", flush=True)
    status = read_status(work / "hub")
    print(f"hub: {status.completed_rounds} rounds completed, global version "
          f"{status.last_global.version if status.last_global else 0}, {status.accepted_updates} updates accepted")
    states = [load_state(device.state_dir) for device in devices]
    print(f"{'device':<10} {'answers in':<18} {'rounds':>6}  accuracy on its own test set after each round")
    for client, state in zip(federation.clients, states):
        accuracy = [m["evaluation"]["accuracy"] for m in state.metrics if m.get("evaluation")]
        print(f"{client.client_id:<10} {client.convention.name:<18} {state.round:>6}  "
              + " ".join(f"{a:.2f}" for a in accuracy))
    same_b = all(_equal(state.global_state, states[0].global_state) for state in states)
    distinct_a = all(not _equal(a.personal, b.personal) for i, a in enumerate(states) for b in states[i + 1:])
    print(f"every device holds the same global B factors: {same_b}; their personal A factors all differ: "
          f"{distinct_a}")

    example = federation.clients[0].test[0]
    print(f"the same picture, {example.question!r}, each device's own model:")
    for client, device in zip(federation.clients, devices):
        print(f"  {client.client_id} ({client.convention.name}): {device.model.answer(example.image, example.question)!r}")
    print(f"everything is under {work.resolve()}")
    return 0


def _equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(np.array_equal(left[k], right[k]) for k in left)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("work/quickstart"), help="default: work/quickstart")
    parser.add_argument("--clients", type=int, default=4, help="devices (default: 4)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default: 5)")
    parser.add_argument("--local-steps", type=int, default=30, help="training steps per device per round (default: 30)")
    parser.add_argument("--examples-per-client", type=int, default=64, help="default: 64")
    parser.add_argument("--size", default="small", choices=sorted(SIZES), help="tiny VLM size (default: small)")
    parser.add_argument("--pretrain-steps", type=int, default=800, help="base pre-training steps (default: 800)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds (default: 1800)")
    args = parser.parse_args(argv)
    if args.clients < 2:
        parser.error("--clients must be at least 2: a federation needs more than one device")
    for name in ("rounds", "local_steps", "examples_per_client", "pretrain_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
