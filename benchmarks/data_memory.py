"""Memory of reading RLAIF-V shards: does a client's working set grow with the data set? (``make bench-data-memory``)

For each data set size (default 500 and 5,000 rows of photo-sized PNGs in the exact RLAIF-V
schema, written by ``fedvlm make-rlaifv-data``'s generator), a fresh Python process scans the
shards, splits them into clients by origin_dataset, keeps at most ``--per-client`` rows per
client, reads client 0's rows and decodes one batch of its images: everything a device or a
simulated client does before training. It reports its peak RSS. The streamed path should
give the same peak at both sizes (ratio near 1). For contrast, the same process with
``load_records`` (every row loaded, as FedVLM read data before streaming) is measured too.

    python benchmarks/data_memory.py [--rows 500,5000] [--out work/bench/data-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure(data: Path, mode: str, clients: int, per_client: int, batch: int) -> dict:
    """In this (fresh) process: read the data the way ``mode`` says; peak RSS before and after."""
    import numpy as np
    import pyarrow.parquet  # noqa: F401 - imported lazily by the reader; its own size is not the data's

    from fedvlm.edge.data import PartitionSpec, client_shares, load_records, scan_data

    baseline = _peak_rss_mb()  # the interpreter, numpy, PIL, pyarrow: not the data
    started = time.perf_counter()
    if mode == "streamed":
        index = scan_data(data)
        shares = client_shares(index.rows, PartitionSpec.parse("origin_dataset"), clients,
                               np.random.default_rng([0, 17]), max_per_client=per_client)
        records = index.load(shares[0])
        rows = len(index.rows)
    else:  # every row's record in memory, then the client's part of it
        records = load_records(data).records
        rows = len(records)
        records = [r for r in records if r.origin_dataset == records[0].origin_dataset][:per_client]
    pixels = [np.asarray(record.image) for record in records[:batch]]  # one batch decoded, as training does
    return {"mode": mode, "rows": rows, "client_rows": len(records), "batch_pixels": int(sum(p.size for p in pixels)),
            "image_bytes_held": sum(len(r.encoded_image().data) for r in records),
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "seconds": round(time.perf_counter() - started, 2)}


def _data_set(out: Path, rows: int, image_size: int, grain: int) -> Path:
    from fedvlm.edge.data.preference_scenes import write_preference_shards

    folder = out / f"rows{rows}-size{image_size}-grain{grain}"
    marker = folder / ".complete"
    if not marker.exists():
        print(f"writing {rows} rows to {folder} ...", flush=True)
        write_preference_shards(folder, rows, shards=max(1, rows // 500), image_size=image_size, grain=grain, seed=0)
        marker.touch()
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="500,5000", help="data set sizes, comma-separated")
    parser.add_argument("--image-size", type=int, default=160, help="pixels per side")
    parser.add_argument("--grain", type=int, default=40, help="pixel noise, so PNGs are photo-sized")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=64, help="rows a client keeps")
    parser.add_argument("--batch", type=int, default=8, help="images decoded at once")
    parser.add_argument("--out", type=Path, default=Path("work/bench/data-memory"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--mode", default="streamed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.mode, args.clients, args.per_client, args.batch)))
        return 0

    results = []
    for rows in (int(n) for n in args.rows.split(",")):
        folder = _data_set(args.out, rows, args.image_size, args.grain)
        size_mb = sum(f.stat().st_size for f in folder.glob("*.parquet")) / 1e6
        for mode in ("streamed", "all-loaded"):
            child = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--mode", mode,
                                    "--clients", str(args.clients), "--per-client", str(args.per_client),
                                    "--batch", str(args.batch)], capture_output=True, text=True, check=True)
            results.append({**json.loads(child.stdout.strip().splitlines()[-1]), "shards_mb": round(size_mb, 1)})
    print(f"\n{'mode':<11} {'rows':>6} {'shards MB':>10} {'client rows':>11} {'peak RSS MB':>12} "
          f"{'above baseline MB':>18} {'s':>6}")
    for r in results:
        print(f"{r['mode']:<11} {r['rows']:>6} {r['shards_mb']:>10} {r['client_rows']:>11} {r['peak_rss_mb']:>12} "
              f"{r['peak_rss_mb'] - r['baseline_rss_mb']:>18.1f} {r['seconds']:>6}")
    summary = {}
    for mode in ("streamed", "all-loaded"):
        peaks = [r["peak_rss_mb"] for r in results if r["mode"] == mode]
        summary[mode] = round(peaks[-1] / peaks[0], 2)
        print(f"{mode}: peak RSS at {results[-1]['rows']} rows / at {results[0]['rows']} rows = {summary[mode]:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"runs": results, "ratio": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
