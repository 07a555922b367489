"""``fedvlm demo``: a whole pLoRA federation on one machine, with the real commands.

1. builds the ``small`` VLM and pre-trains it briefly so it can see (cached);
2. generates non-IID synthetic data for the clients (concept shift + label skew; cached);
3. registers the clients and starts ``fedvlm-hub start`` (embedded broker unless
   ``--broker``) and one ``fedvlm-edge join`` process per client;
4. scores every client on its own test set (before federation, its personal model after,
   and the shared model alone), prints a table and plots accuracy per round.

Everything goes under one work directory; a second run reuses the model and the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclasses.dataclass
class DemoSettings:
    """What a user changes (``fedvlm demo --help``)."""

    work_dir: Path = Path("work/demo")
    clients: int = 4
    rounds: int = 5
    strategy: str = "plora"
    broker: str | None = None  # None: the hub's embedded broker
    local_steps: int = 30
    learning_rate: float = 3e-3
    examples_per_client: int = 64
    test_examples_per_client: int = 32
    quantization: str = "nf4"
    seed: int = 0
    pretrain_steps: int = 800


def _say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_model(settings: DemoSettings) -> Path:
    from fedvlm.edge.pretraining import PretrainingConfig, is_built, make_pretrained_tiny_model

    started = time.perf_counter()
    out = settings.work_dir / "model"
    config = PretrainingConfig(steps=settings.pretrain_steps, seed=settings.seed)
    reused = is_built(out, "small", seed=settings.seed, config=config)
    model_dir = make_pretrained_tiny_model(out, "small", seed=settings.seed, config=config)
    report = json.loads((model_dir / "fedvlm_pretraining.json").read_text())
    how = "reused" if reused else f"built and pre-trained in {time.perf_counter() - started:.0f} s"
    _say(f"      small VLM {how} (pre-training loss {report['result']['first_loss']:.2f} -> "
         f"{report['result']['last_loss']:.2f}): {model_dir}")
    return model_dir


def prepare_data(settings: DemoSettings):
    from fedvlm.edge.data import ScenarioConfig, generate_federation

    config = ScenarioConfig.preset(
        "concept-shift", n_clients=settings.clients, examples_per_client=settings.examples_per_client,
        test_examples_per_client=settings.test_examples_per_client, label_skew_alpha=1.0,
        image_size=64, seed=settings.seed,
    )
    federation = generate_federation(config)
    data_dir = settings.work_dir / "data"
    marker = data_dir / "federation.json"
    if not marker.exists() or json.loads(marker.read_text()).get("scenario") != config.to_dict():
        federation.write(data_dir)
    for client in federation.clients:
        convention = client.convention
        _say(f"      {client.client_id}: {len(client.train)} train / {len(client.test)} test examples, "
             f"answers in {convention.language}{', mirrored camera' if convention.mirrored else ''}")
    return federation, data_dir


def _stream(process: subprocess.Popen, prefix: str, log_file: Path) -> threading.Thread:
    def pump() -> None:
        with log_file.open("w") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if prefix:
                    print(f"{prefix}{line.rstrip()}", flush=True)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def run_federation(settings: DemoSettings, model_dir: Path, data_dir: Path, client_ids: list[str]) -> Path:
    run_dir = settings.work_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh federation each time; model and data are reused
    (run_dir / "logs").mkdir(parents=True)
    hub_dir = run_dir / "hub"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           # Four training processes share the cores: one thread each avoids oversubscription.
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for client_id in client_ids:
        added = subprocess.run([str(BIN / "fedvlm-hub"), "clients", "add", client_id, "--state-dir", str(hub_dir)],
                               capture_output=True, text=True, check=True, env=env)
        secret_file = run_dir / "secrets" / f"{client_id}.secret"
        secret_file.parent.mkdir(exist_ok=True)
        secret_file.write_text(added.stdout.strip().splitlines()[-1])
        secret_file.chmod(0o600)

    hub_args = [str(BIN / "fedvlm-hub"), "start", "--state-dir", str(hub_dir), "--federation", "demo",
                "--strategy", settings.strategy, "--rounds", str(settings.rounds),
                "--min-clients", str(len(client_ids)), "--round-timeout", "900",
                "--local-steps", str(settings.local_steps), "--learning-rate", str(settings.learning_rate),
                "--linger", "15"]
    if settings.broker:
        hub_args += ["--broker", settings.broker]
        broker_url, protocol = settings.broker, "auto"
    else:
        port = _free_port()
        hub_args += ["--port", str(port)]
        broker_url, protocol = f"mqtt://127.0.0.1:{port}", "3.1.1"
    _say(f"      hub: {' '.join(Path(a).name if i == 0 else a for i, a in enumerate(hub_args))}")
    hub = subprocess.Popen(hub_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    hub_pump = _stream(hub, "      hub │ ", run_dir / "logs" / "hub.log")
    devices = []
    try:
        time.sleep(1.0)
        for index, client_id in enumerate(client_ids):
            args = [str(BIN / "fedvlm-edge"), "join", "--hub", broker_url, "--federation", "demo",
                    "--client-id", client_id, "--secret-file", str(run_dir / "secrets" / f"{client_id}.secret"),
                    "--model", str(model_dir), "--data", str(data_dir / f"client_{index:02d}.parquet"),
                    "--eval-data", str(data_dir / f"client_{index:02d}_test.parquet"),
                    "--state-dir", str(run_dir / "devices" / client_id), "--quantization", settings.quantization,
                    "--mqtt-version", protocol, "--quiet", "--timeout", "1800"]
            device = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            devices.append((client_id, device, _stream(device, "", run_dir / "logs" / f"{client_id}.log")))
        _say(f"      {len(devices)} devices joined as separate processes (logs in {run_dir / 'logs'})")
        for client_id, device, pump in devices:
            device.wait()
            pump.join()
            if device.returncode != 0:
                tail = (run_dir / "logs" / f"{client_id}.log").read_text()[-1500:]
                raise RuntimeError(f"device {client_id} failed (exit {device.returncode}):\n{tail}")
        hub.wait(timeout=120)
        hub_pump.join()
        if hub.returncode != 0:
            raise RuntimeError(f"the hub failed (exit {hub.returncode}); see {run_dir / 'logs' / 'hub.log'}")
    finally:
        for _, device, _ in devices:
            if device.poll() is None:
                device.terminate()
        if hub.poll() is None:
            hub.terminate()
    return run_dir


def report(settings: DemoSettings, model_dir: Path, federation, run_dir: Path) -> dict:
    from fedvlm.edge.device_state import load_state
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.lora_config import LoraSettings

    from fedvlm.personal_report import format_table, plot_rounds, score_clients

    states = {c.client_id: load_state(run_dir / "devices" / c.client_id) for c in federation.clients}
    lora = LoraSettings.from_dict(next(iter(states.values())).lora)
    model = PersonalVLM.from_pretrained(model_dir, lora=lora, strategy=settings.strategy,
                                        quantization=settings.quantization)
    rows = score_clients(model, {c.client_id: c.test for c in federation.clients}, states)
    table = format_table(rows)
    plot = plot_rounds(rows, settings.work_dir / "accuracy_per_round.png",
                       f"{settings.strategy}: each client's accuracy on its own test set")
    example = federation.clients[0].test[0]
    answers = {}
    for client in federation.clients[:2]:
        model.restore(states[client.client_id])
        answers[client.client_id] = model.answer(example.image, example.question)
    result = {"settings": {k: str(v) for k, v in dataclasses.asdict(settings).items()},
              "clients": [dataclasses.asdict(r) for r in rows], "table": table,
              "same_question": {"question": example.question, "answers": answers}}
    (settings.work_dir / "results.json").write_text(json.dumps(result, indent=2))
    (settings.work_dir / "results.md").write_text(table + "\n")
    _say("")
    _say(table)
    _say("")
    _say(f"      one image of {federation.clients[0].client_id}'s test set, {example.question!r}:")
    for client_id, answer in answers.items():
        _say(f"        {client_id}'s personal model answers {answer!r}")
    if plot:
        _say(f"      plot: {plot}")
    return result


def run_demo(settings: DemoSettings) -> int:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # small models: loading bars are noise here
    started = time.perf_counter()
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    _say(f"FedVLM demo: {settings.clients} devices, {settings.rounds} rounds of {settings.strategy}, "
         f"work dir {settings.work_dir}")
    _say("[1/4] base model")
    model_dir = prepare_model(settings)
    _say("[2/4] non-IID data (each client its own answer language; label skew)")
    federation, data_dir = prepare_data(settings)
    _say("[3/4] federation: hub + devices over MQTT")
    run_dir = run_federation(settings, model_dir, data_dir, [c.client_id for c in federation.clients])
    _say("[4/4] each client's accuracy on its own test set")
    report(settings, model_dir, federation, run_dir)
    _say(f"\ndone in {time.perf_counter() - started:.0f} s; everything is under {settings.work_dir.resolve()}")
    return 0
