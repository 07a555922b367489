"""Edge training benchmark on the ``small`` tiny VLM.

In one run, side by side:

(a) training throughput of FedVLM's trainer (``fedvlm.edge.training.train``) against a
    plain hand-written PEFT + torch loop on the same model, LoRA layout and batches;
    alternating repeats, median taken. Target: the trainer within 10 % of the plain loop.
(b) weight memory and process peak memory (RSS high-water mark) for an fp32 base and each
    quantised base, each measured in a fresh process so peaks don't mix.

Prints a table and writes JSON. ``python benchmarks/edge_train.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _examples(n: int, image_size: int):
    from fedvlm.edge.data.synthetic import ScenarioConfig, generate_federation

    config = ScenarioConfig.preset("iid", n_clients=1, examples_per_client=n, test_examples_per_client=1,
                                   image_size=image_size, seed=0)
    return generate_federation(config).clients[0].train


def _plain_loop(model, batches, lr: float) -> float:
    """The reference: the loop a user would write by hand around PEFT."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure_throughput(model_dir: Path, quantization: str, steps: int, batch_size: int, repeats: int) -> dict:
    from fedvlm.edge.adapters import LoraSettings, attach_lora
    from fedvlm.edge.batching import collate
    from fedvlm.edge.model_loading import load_vlm
    from fedvlm.edge.training import TrainingConfig, batch_order, encode_examples, train

    loaded = load_vlm(model_dir, quantization=quantization, device="cpu")
    model = attach_lora(loaded.model, LoraSettings())
    examples = encode_examples(loaded.processor, _examples(64, 64))
    config = TrainingConfig(steps=steps, batch_size=batch_size, learning_rate=1e-3, progress=False)
    order = batch_order(len(examples), steps * batch_size, config.seed)
    pad = loaded.processor.tokenizer.pad_token_id
    # The very same batches, in the same order, for both loops.
    batches = [collate([examples[i] for i in order[s * batch_size:(s + 1) * batch_size]], pad) for s in range(steps)]

    train(model, loaded.processor, examples, TrainingConfig(steps=2, batch_size=batch_size, progress=False))  # warm-up
    fedvlm_times, plain_times = [], []
    for _ in range(repeats):
        fedvlm_times.append(train(model, loaded.processor, examples, config).seconds)
        plain_times.append(_plain_loop(model, batches, config.learning_rate))
    fedvlm_s, plain_s = statistics.median(fedvlm_times), statistics.median(plain_times)
    per_run = steps * batch_size
    return {
        "quantization": quantization,
        "fedvlm_examples_per_s": per_run / fedvlm_s,
        "plain_examples_per_s": per_run / plain_s,
        "fedvlm_vs_plain": plain_s / fedvlm_s,
        "runs": repeats,
    }


def measure_memory_in_this_process(model_dir: Path, quantization: str) -> dict:
    """Load, attach LoRA, run a few training steps; report weight bytes and peak RSS."""
    from fedvlm.edge.adapters import LoraSettings, attach_lora
    from fedvlm.edge.model_loading import load_vlm
    from fedvlm.edge.quantization import weight_bytes
    from fedvlm.edge.training import TrainingConfig, train

    loaded = load_vlm(model_dir, quantization=quantization, device="cpu")
    base_bytes = weight_bytes(loaded.model)
    model = attach_lora(loaded.model, LoraSettings())
    start = time.perf_counter()
    train(model, loaded.processor, _examples(32, 64), TrainingConfig(steps=5, batch_size=8, progress=False))
    return {
        "quantization": quantization,
        "weight_mb": base_bytes / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": (time.perf_counter() - start) / 5,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="work/bench", help="directory for edge_train.json (default: work/bench)")
    parser.add_argument("--model", help="model directory (default: build the small tiny VLM in a temp dir)")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed run (default: 30)")
    parser.add_argument("--batch-size", type=int, default=8, help="default: 8")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per loop (default: 3)")
    parser.add_argument("--memory-only", metavar="MODE", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)

    if args.memory_only:
        print(json.dumps(measure_memory_in_this_process(Path(args.model), args.memory_only)))
        return 0

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            from fedvlm.edge.tiny_model import make_tiny_model

            model_dir = make_tiny_model(Path(tmp) / "small", "small", seed=0)
        throughput = [measure_throughput(model_dir, q, args.steps, args.batch_size, args.repeats) for q in ("none", "nf4")]
        memory = []
        for mode in ("none", "int8", "nf4"):
            child = subprocess.run(
                [sys.executable, __file__, "--memory-only", mode, "--model", str(model_dir)],
                capture_output=True, text=True, check=True,
            )
            memory.append(json.loads(child.stdout.strip().splitlines()[-1]))

    print("\n(a) training throughput, same model and batches (examples/s, median of runs)")
    print(f"{'base':<6} {'FedVLM trainer':>15} {'plain loop':>11} {'ratio':>7}")
    for row in throughput:
        print(f"{row['quantization']:<6} {row['fedvlm_examples_per_s']:>15.1f} {row['plain_examples_per_s']:>11.1f} "
              f"{row['fedvlm_vs_plain']:>7.2f}")
    print("target: ratio >= 0.90 (trainer within 10 % of the plain loop)")
    print("\n(b) memory, each base in its own process")
    print(f"{'base':<6} {'weights MB':>11} {'peak RSS MB':>12} {'s/step':>7}")
    for row in memory:
        print(f"{row['quantization']:<6} {row['weight_mb']:>11.2f} {row['peak_rss_mb']:>12.1f} {row['step_s']:>7.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"throughput": throughput, "memory": memory, "model": str(args.model or "small (built)"),
              "steps": args.steps, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads()}
    (out / "edge_train.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'edge_train.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
