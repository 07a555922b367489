"""``fedvlm demo``: a whole pLoRA federation on one machine, with the real commands.

1. builds the ``small`` VLM and pre-trains it briefly so it can see (cached);
2. generates non-IID synthetic data for the clients (concept shift + label skew; cached);
3. registers the clients and starts ``fedvlm-hub start`` (embedded broker unless
   ``--broker``) and one ``fedvlm-edge join`` process per client;
4. scores every client on its own test set (before federation, its personal model after,
   and the shared model alone), prints a table and plots accuracy per round;
5. exports client 0's personalised model to ONNX (the base graphs once, one small
   ``.onnx_adapter`` per client) and asks one question about one of client 0's test
   images with ONNX Runtime, first with client 0's adapter, then with client 1's.

Everything goes under one work directory; a second run reuses the model, the data and the
ONNX base export (each keyed by what made it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import DemoStepFailed

BIN = Path(sys.executable).parent

# torch's OpenMP threads busy-wait between parallel regions. On cores that other work keeps
# busy, that spinning costs several times the work itself (measured here, 2 shared cores:
# 60 pre-training steps took 63 s with the default policy, 12 s with passive waiting).
# OpenMP reads this once, when torch loads, which in `fedvlm demo` is after this module is
# imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
    model_size: str = "small"  # "tiny": a quick smoke run (tests); "small": the demo
    arch: str = "llava"  # the family of the tiny model built and pre-trained
    model: str | None = None  # a user's model (folder or cached hub id), used as it is instead
    pretrain_steps: int = 800
    pretrain_examples: int = 2048


def _say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_model(settings: DemoSettings) -> Path:
    from fedvlm.edge.pretraining import PretrainingConfig, is_built, make_pretrained_tiny_model

    if settings.model is not None:
        from fedvlm.edge.model_loading import check_model_dir

        model_dir = check_model_dir(settings.model)
        _say(f"      {model_dir} as it is (no pre-training)")
        return model_dir
    started = time.perf_counter()
    out = settings.work_dir / ("model" if settings.arch == "llava" else f"model-{settings.arch}")
    config = PretrainingConfig(steps=settings.pretrain_steps, seed=settings.seed)
    recipe = dict(seed=settings.seed, examples=settings.pretrain_examples, config=config, arch=settings.arch)
    reused = is_built(out, settings.model_size, **recipe)
    model_dir = make_pretrained_tiny_model(out, settings.model_size, **recipe)
    report = json.loads((model_dir / "fedvlm_pretraining.json").read_text())
    how = "reused" if reused else f"built and pre-trained in {time.perf_counter() - started:.0f} s"
    _say(f"      {settings.model_size} {settings.arch} VLM {how} (pre-training loss "
         f"{report['result']['first_loss']:.2f} -> {report['result']['last_loss']:.2f}): {model_dir}")
    return model_dir


def prepare_data(settings: DemoSettings, model_dir: Path):
    from fedvlm.edge.data import ScenarioConfig, generate_federation
    from fedvlm.simulate.clients import image_size_of

    config = ScenarioConfig.preset(
        "concept-shift", n_clients=settings.clients, examples_per_client=settings.examples_per_client,
        test_examples_per_client=settings.test_examples_per_client, label_skew_alpha=1.0,
        image_size=image_size_of(model_dir), seed=settings.seed,
    )
    federation = generate_federation(config)
    data_dir = settings.work_dir / "data"
    marker = data_dir / "federation.json"
    if not marker.exists() or json.loads(marker.read_text()).get("scenario") != config.to_dict():
        federation.write(data_dir)
    for client in federation.clients:
        convention = client.convention
        _say(f"      {client.client_id}: {len(client.train)} train / {len(client.test)} test examples, "
             f"answers in {convention.description}")
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


def _failed(name: str, status: int, log_text: str, log_path: Path | None = None) -> DemoStepFailed:
    lines = [line for line in log_text.strip().splitlines() if line.strip()]
    where = f"; full log: {log_path}" if log_path is not None else ""
    return DemoStepFailed(f"{name} exited with status {status}: {lines[-1].strip() if lines else '(no output)'}{where}")


def _wait_for(hub: subprocess.Popen, devices: list, logs: Path) -> None:
    """Until every device is done. The first failure ends the wait: a hub that died (a busy
    port, an unreachable --broker) would otherwise leave the devices trying for half an hour."""
    while True:
        if hub.poll() not in (None, 0):
            raise _failed("the hub", hub.returncode, (logs / "hub.log").read_text(), logs / "hub.log")
        for client_id, device, _ in devices:
            if device.poll() not in (None, 0):
                log_path = logs / f"{client_id}.log"
                raise _failed(f"device {client_id}", device.returncode, log_path.read_text(), log_path)
        if all(device.poll() is not None for _, device, _ in devices):
            return
        time.sleep(0.2)


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
                               capture_output=True, text=True, env=env)  # fmt: skip
        if added.returncode != 0:
            raise _failed(f"fedvlm-hub clients add {client_id}", added.returncode, added.stderr + added.stdout)
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
        _wait_for(hub, devices, run_dir / "logs")
        for _, _, pump in devices:
            pump.join()
        hub.wait(timeout=120)
        hub_pump.join()
        if hub.returncode != 0:
            raise _failed("the hub", hub.returncode, (run_dir / "logs" / "hub.log").read_text(),
                          run_dir / "logs" / "hub.log")  # fmt: skip
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
    result = {"settings": {k: str(v) for k, v in dataclasses.asdict(settings).items()},
              "clients": [dataclasses.asdict(r) for r in rows], "table": table}
    (settings.work_dir / "results.md").write_text(table + "\n")
    _say("")
    _say(table)
    _say("")
    if plot:
        _say(f"      plot: {plot}")
    return result


def pick_question(client):
    """The first of the client's test examples that asks which side the shape is on.

    That kind shows both halves of a convention: the language, and for a mirrored camera
    the opposite side. Any example will do when there is none.
    """
    from fedvlm.edge.data import question_kind

    return next((r for r in client.test if question_kind(r) == "position"), client.test[0])


def expected_answer(record, asked, answering) -> str:
    """What client ``answering``'s convention says about ``record``, an example of client ``asked``."""
    from fedvlm.edge.data import CLASSES, question_kind

    kind = question_kind(record)
    classes = range(len(CLASSES[kind]))
    # The class shown is the one ``asked``'s convention names with the record's answer.
    shown = next(c for c in classes if asked.convention.answer(kind, c) == record.chosen)
    return answering.convention.answer(kind, shown)


EXPORT_KEY_FILE = "fedvlm_demo_export.json"


def export_base(settings: DemoSettings, model) -> tuple[Path, bool]:
    """Export the base (no adapter) to ``work_dir/onnx`` once; reuse it while the model is the same.

    The key is the export format, the base fingerprint, the LoRA layout (its defaults are graph inputs) and the
    strategy (which tensors an adapter holds). It is written last, so an export cut short is
    never taken for a finished one.
    """
    from fedvlm.edge.onnx_export import EXPORT_FORMAT, export_onnx

    out = settings.work_dir / "onnx"
    key = {"format": EXPORT_FORMAT, "base_fingerprint": model.fingerprint, "lora_config_hash": model.lora.config_hash(),
           "strategy": model.strategy.name}
    key_file = out / EXPORT_KEY_FILE
    if key_file.exists() and json.loads(key_file.read_text()) == key:
        return out, True
    key_file.unlink(missing_ok=True)
    model.reset_adapters()  # the base graphs' LoRA defaults: the shared initialisation, no client's factors
    export_onnx(model, out)
    key_file.write_text(json.dumps(key, indent=2))
    return out, False


def onnx_step(settings: DemoSettings, model_dir: Path, federation, run_dir: Path) -> dict | None:
    """Client 0's personalised model on ONNX Runtime, and client 1's adapter on the same question."""
    from fedvlm.edge.device_state import load_state
    from fedvlm.edge.evaluation import normalize_answer
    from fedvlm.edge.onnx_adapter import ADAPTER_SUFFIX, OnnxAdapterError, write_adapter
    from fedvlm.edge.onnx_export import OnnxExportError, read_manifest
    from fedvlm.edge.onnx_runner import OnnxVLM
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.lora_config import LoraSettings

    clients = federation.clients[:2]
    states = {c.client_id: load_state(run_dir / "devices" / c.client_id) for c in clients}
    started = time.perf_counter()
    # ONNX export traces the fp32 model: the devices' NF4 base is a training-time saving.
    model = PersonalVLM.from_pretrained(model_dir, lora=LoraSettings.from_dict(states[clients[0].client_id].lora),
                                        strategy=settings.strategy, quantization="none", device="cpu")
    try:
        onnx_dir, reused = export_base(settings, model)
        manifest = read_manifest(onnx_dir)
        adapters = {}
        for client in clients:
            model.reset_adapters()
            model.restore(states[client.client_id])  # global B + this client's personal A
            adapters[client.client_id] = write_adapter(onnx_dir / f"{client.client_id}{ADAPTER_SUFFIX}",
                                                       model.adapter_state(), manifest)
    except (OnnxExportError, OnnxAdapterError) as error:  # e.g. fedex: its state changes base weights
        _say(f"      skipped: {error}")
        return None
    _say(f"      base exported once (prefill + decode graphs, LoRA factors as inputs) to {onnx_dir}: "
         + ("reused (same base model and LoRA layout)" if reused else f"{time.perf_counter() - started:.0f} s"))
    sizes = ", ".join(f"{path.name} ({path.stat().st_size / 1000:.0f} KB)" for path in adapters.values())
    _say(f"      adapters (personal A + global B of round {states[clients[0].client_id].round}): {sizes}")

    record = pick_question(clients[0])
    image_file = onnx_dir / f"question_{clients[0].client_id}.png"
    record.image.save(image_file)
    vlm = OnnxVLM.load(onnx_dir)
    _say(f"      one image of {clients[0].client_id}'s test set ({image_file.name}), {record.question!r}:")
    answers = {}
    for client in clients:
        vlm.activate(adapters[client.client_id])
        answer = vlm.answer(record.image, record.question)
        expected = expected_answer(record, clients[0], client)
        answers[client.client_id] = {"adapter": str(adapters[client.client_id]), "answer": answer,
                                     "expected": expected, "convention": client.convention.name}
        convention = client.convention.description
        mark = "✓" if normalize_answer(answer) == normalize_answer(expected) else "✗"  # as the scores count
        _say(f"        {client.client_id}'s adapter ({convention}) answers {answer!r}; "
             f"its convention expects {expected!r} {mark}")
    _say(f"      the same on the command line: fedvlm-edge ask --onnx {onnx_dir} --adapter "
         f"{adapters[clients[1].client_id]} --image {image_file} --question {shlex.quote(record.question)}")
    return {"export_dir": str(onnx_dir), "reused": reused, "image": str(image_file), "question": record.question,
            "answers": answers}


def run_demo(settings: DemoSettings) -> int:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # small models: loading bars are noise here
    started = time.perf_counter()
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    _say(f"FedVLM demo: {settings.clients} devices, {settings.rounds} rounds of {settings.strategy}, "
         f"work dir {settings.work_dir}")
    _say("[1/5] base model")
    model_dir = prepare_model(settings)
    _say("[2/5] non-IID data (each client its own answer language; label skew)")
    federation, data_dir = prepare_data(settings, model_dir)
    _say("[3/5] federation: hub + devices over MQTT")
    run_dir = run_federation(settings, model_dir, data_dir, [c.client_id for c in federation.clients])
    _say("[4/5] each client's accuracy on its own test set")
    result = report(settings, model_dir, federation, run_dir)
    _say(f"[5/5] {federation.clients[0].client_id}'s personalised model on ONNX Runtime")
    result["onnx"] = onnx_step(settings, model_dir, federation, run_dir)
    (settings.work_dir / "results.json").write_text(json.dumps(result, indent=2))
    _say(f"\ndone in {time.perf_counter() - started:.0f} s; everything is under {settings.work_dir.resolve()}")
    return 0
