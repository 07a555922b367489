"""Local inference benchmark on the ``small`` tiny VLM: ONNX Runtime with an adapter vs PyTorch.

In one run, side by side on the same images, questions and ``max_new_tokens``:

(a) greedy answer latency (p50, p95) and throughput at batch 1 and batch 8, ONNX Runtime
    with a client's adapter active (``fedvlm.edge.onnx_runner.OnnxVLM``) against PyTorch
    eager ``generate()`` on the PEFT model (``fedvlm.edge.evaluation.generate_answers``),
    alternating repeats; the answers must be identical (checked, the run fails otherwise).
(b) adapter swap time (``OnnxVLM.activate``), adapter file size vs the base (prefill +
    decode ``.onnx``) size, and the export time.

Two clients' adapters are trained a few steps on synthetic concept-shift data (English and
French answers), so the adapters are not trivial. Latency is measured in two regimes: the
trained French client's adapter (one-word answers, as in real use) and the federation's
initial adapter, whose answers never stop early (every answer decodes all
``--max-new-tokens`` steps). PyTorch and ONNX Runtime use the same number of CPU threads
(``--threads``). Target: ORT at least 2x faster than PyTorch eager at batch 1.

Prints a table and writes JSON. ``python benchmarks/inference.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _clients(n_examples: int, image_size: int):
    from fedvlm.edge.data import ScenarioConfig, generate_federation

    config = ScenarioConfig.preset("concept-shift", n_clients=2, examples_per_client=n_examples,
                                   test_examples_per_client=8, common_test_examples=0,
                                   image_size=image_size, seed=0)
    return generate_federation(config).clients


def _measure(vlm, personal, imgs, qs, args) -> dict:
    """Alternating timed answers, ORT then torch, same inputs and max_new_tokens."""
    from fedvlm.edge.evaluation import generate_answers

    batch = len(imgs)
    torch_answers = generate_answers(personal.model, personal.processor, imgs, qs, max_new_tokens=args.max_new_tokens)
    ort_answers = vlm.answers(imgs, qs, max_new_tokens=args.max_new_tokens)
    same = torch_answers == ort_answers
    if not same:
        print(f"batch {batch}: answers differ\n  torch: {torch_answers}\n  ort:   {ort_answers}", file=sys.stderr)
    new_tokens = vlm.generate(imgs, qs, max_new_tokens=args.max_new_tokens)
    eos = personal.processor.tokenizer.eos_token_id
    # generated tokens per answer, the end token included
    lengths = [int(next((i + 1 for i, t in enumerate(row) if t == eos), len(row))) for row in new_tokens]
    times = {"ort": [], "torch": []}
    for _ in range(args.repeats):  # alternating, so drift on a shared machine hits both
        t0 = time.perf_counter()
        vlm.answers(imgs, qs, max_new_tokens=args.max_new_tokens)
        times["ort"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate_answers(personal.model, personal.processor, imgs, qs, max_new_tokens=args.max_new_tokens)
        times["torch"].append(time.perf_counter() - t0)
    row = {"batch": batch, "answers_identical": same, "answers": ort_answers,
           "mean_generated_tokens": sum(lengths) / len(lengths)}
    for engine, ts in times.items():
        row[engine] = {"p50_ms": _percentile(ts, 50) * 1e3, "p95_ms": _percentile(ts, 95) * 1e3,
                       "answers_per_s": batch / statistics.median(ts)}
    row["speedup_p50"] = row["torch"]["p50_ms"] / row["ort"]["p50_ms"]
    return row


def run(args) -> dict:
    import onnxruntime as ort
    import torch

    from fedvlm.edge.adapters import LoraSettings
    from fedvlm.edge.data import all_words
    from fedvlm.edge.onnx_adapter import write_adapter
    from fedvlm.edge.onnx_export import DECODE_FILE, PREFILL_FILE, export_onnx, read_manifest
    from fedvlm.edge.onnx_runner import OnnxVLM
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.edge.tiny_model import make_tiny_model
    from fedvlm.edge.training import TrainingConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fedvlm-bench-inference-"))
    # Answer words are tokens. --arch: another family's small model (its own processor and template).
    model_dir = make_tiny_model(tmp / "model", "small", arch=args.arch, extra_words=all_words())
    personal = PersonalVLM.from_pretrained(model_dir, lora=LoraSettings(), quantization="none", device="cpu")

    start = time.perf_counter()
    export_dir = export_onnx(personal, tmp / "export")
    export_s = time.perf_counter() - start
    manifest = read_manifest(export_dir)

    clients = _clients(32, 64)
    initial_state = personal.adapter_state()
    states, adapters = {}, {}
    for client in clients:
        personal.reset_adapters()
        personal.train(client.train, TrainingConfig(steps=args.train_steps, batch_size=8, learning_rate=1e-2,
                                                    progress=False))
        states[client.client_id] = personal.adapter_state()
        adapters[client.client_id] = write_adapter(tmp / f"{client.client_id}.onnx_adapter",
                                                   states[client.client_id], manifest)
    chosen = clients[1].client_id  # the non-English client: its adapter really changes the answers
    personal.model.eval()

    # ORT sessions with the same intra-op thread count as torch.
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    vlm = OnnxVLM.load(export_dir, providers=["CPUExecutionProvider"])
    vlm.prefill = ort.InferenceSession(str(export_dir / PREFILL_FILE), options, providers=["CPUExecutionProvider"])
    vlm.decode = ort.InferenceSession(str(export_dir / DECODE_FILE), options, providers=["CPUExecutionProvider"])

    # Adapter swap time: alternate the two clients' files.
    swaps = []
    for i in range(20):
        path = adapters[clients[i % 2].client_id]
        t0 = time.perf_counter()
        vlm.activate(path)
        swaps.append(time.perf_counter() - t0)
    vlm.activate(adapters[chosen])

    test = clients[1].test
    images = [r.image for r in test]
    questions = [r.question for r in test]
    # Two regimes: the trained client's adapter (one-word answers, as in real use: prefill
    # plus a step or two), and the federation's initial adapter, whose answers never hit
    # the end token, so every answer decodes all max_new_tokens steps (the decode loop).
    initial = write_adapter(tmp / "initial.onnx_adapter", initial_state, manifest)
    regimes = {"trained": (states[chosen], adapters[chosen]), "full_length": (initial_state, initial)}
    results = {}
    answers_equal = True
    for regime, (state, adapter_path) in regimes.items():
        personal.load_adapter_state(state)
        vlm.activate(adapter_path)
        for batch in (1, 8):
            row = _measure(vlm, personal, images[:batch], questions[:batch], args)
            answers_equal &= row["answers_identical"]
            results[f"{regime}_batch_{batch}"] = {"regime": regime, **row}

    base_bytes = sum((export_dir / name).stat().st_size for name in (PREFILL_FILE, DECODE_FILE))
    base_bytes += sum(p.stat().st_size for p in export_dir.glob("*.data"))
    adapter_bytes = adapters[chosen].stat().st_size
    speedup_b1 = min(results["trained_batch_1"]["speedup_p50"], results["full_length_batch_1"]["speedup_p50"])
    return {
        "model": "small",
        "arch": args.arch,
        "threads": args.threads,
        "threads_note": "torch.set_num_threads and ORT intra_op_num_threads set to the same count",
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "export_s": export_s,
        "adapter_swap_ms": {"p50": _percentile(swaps, 50) * 1e3, "p95": _percentile(swaps, 95) * 1e3},
        "adapter_bytes": adapter_bytes,
        "base_onnx_bytes": base_bytes,
        "adapter_vs_base": adapter_bytes / base_bytes,
        "latency": results,
        "answers_identical": answers_equal,
        "target": "ORT >= 2x faster than PyTorch eager at batch 1 (p50, the worse of the two regimes)",
        "target_met": speedup_b1 >= 2.0,
        "speedup_batch_1": speedup_b1,
    }


def print_table(r: dict) -> None:
    print(f"\nInference, small tiny {r['arch']} VLM, CPU, {r['threads']} thread(s) for both torch and ORT, "
          f"max_new_tokens={r['max_new_tokens']}, {r['repeats']} alternating repeats")
    print(f"{'regime':<12} {'batch':>5} {'tokens':>6} {'engine':<14} {'p50 ms':>9} {'p95 ms':>9} {'answers/s':>10} "
          f"{'same answers':>13}")
    for row in r["latency"].values():
        for engine, label in (("ort", "ORT + adapter"), ("torch", "torch eager")):
            e = row[engine]
            print(f"{row['regime']:<12} {row['batch']:>5} {row['mean_generated_tokens']:>6.1f} {label:<14} "
                  f"{e['p50_ms']:>9.1f} {e['p95_ms']:>9.1f} {e['answers_per_s']:>10.1f} {str(row['answers_identical']):>13}")
        print(f"{'':<12} {'':>5} {'':>6} {'speed-up p50':<14} {row['speedup_p50']:>8.2f}x")
    print("tokens: mean generated tokens per answer, end token included; trained: client_01's adapter "
          "(one-word answers); full_length: the initial adapter, every answer decodes all max_new_tokens")
    print(f"adapter swap (activate): p50 {r['adapter_swap_ms']['p50']:.2f} ms, p95 {r['adapter_swap_ms']['p95']:.2f} ms")
    print(f"adapter file {r['adapter_bytes'] / 1e3:.1f} KB vs base (prefill+decode .onnx) "
          f"{r['base_onnx_bytes'] / 1e6:.1f} MB ({100 * r['adapter_vs_base']:.2f} %)")
    print(f"export time {r['export_s']:.1f} s")
    print(f"target (ORT >= 2x torch eager at batch 1): {r['speedup_batch_1']:.2f}x, "
          f"{'met' if r['target_met'] else 'NOT met'}; answers identical: {r['answers_identical']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="work/bench", help="directory for inference.json (default: work/bench)")
    parser.add_argument("--repeats", type=int, default=20, help="timed answers per engine and batch size (default: 20)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="CPU threads for both torch and ORT (default: min(2, cores))")
    parser.add_argument("--arch", default="llava", metavar="NAME",
                        help="model family of the small tiny model (default: llava; any that exports, e.g. smolvlm)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="default: 8")
    parser.add_argument("--train-steps", type=int, default=20, help="training steps per client adapter (default: 8)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    result = run(args)
    print_table(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "inference.json" if args.arch == "llava" else f"inference-{args.arch}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / name}")
    return 0 if result["answers_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
