"""Write a device's data folder in RLAIF-V format: JSON Lines that point at image files.

    data/
      train.jsonl      one record per line: image, question, chosen (the answer to learn), ...
      test.jsonl       held-out records, scored after each round
      images/          the pictures, referred to by path relative to the .jsonl file

This is the layout to use for your own photos: one line per (picture, question, answer),
e.g. ``{"image": "images/0001.jpg", "question": "what colour is the shape?", "chosen":
"rouge"}`` (``rejected``, ``origin_dataset``, ``ds_name``, ``idx`` are optional and kept).
Parquet with RLAIF-V's own columns works too (``fedvlm.edge.data.write_records``).

Here the pictures are synthetic (coloured shapes), and the answers follow one client's
convention of FedVLM's non-IID benchmark: ``--client-index 1`` answers in French through a
mirrored camera, so "left" in a picture is answered "droite".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedvlm.edge.data import ScenarioConfig, generate_federation, load_records
from fedvlm.edge.tiny_model import SIZES


def write_split(records, data_dir: Path, split: str) -> Path:
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, record in enumerate(records):
        image = Path("images") / f"{split}_{index:04d}.png"
        record.image.save(data_dir / image)
        lines.append(json.dumps({"ds_name": "edge-example", "image": image.as_posix(), "question": record.question,
                                 "chosen": record.chosen, "rejected": record.rejected,
                                 "origin_dataset": record.origin_dataset, "idx": str(index)}))
    out = data_dir / f"{split}.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the data folder to write")
    parser.add_argument("--client-index", type=int, default=1,
                        help="whose answer convention: 0 English, 1 French + mirrored camera, 2 German, ... (default: 1)")
    parser.add_argument("--train", type=int, default=64, help="training records (default: 64)")
    parser.add_argument("--test", type=int, default=16, help="held-out records (default: 16)")
    parser.add_argument("--size", default="small", choices=sorted(SIZES), help="picture size of this tiny model")
    args = parser.parse_args(argv)
    if args.client_index < 0 or args.train < 1 or args.test < 1:
        parser.error("--client-index must be >= 0, --train and --test >= 1")

    config = ScenarioConfig.preset("concept-shift", n_clients=args.client_index + 1, examples_per_client=args.train,
                                   test_examples_per_client=args.test, image_size=SIZES[args.size].image_size, seed=0)
    client = generate_federation(config).clients[args.client_index]
    for split, records in (("train", client.train), ("test", client.test)):
        path = write_split(records, args.out, split)
        # Read back with the SDK's loader: exactly what `fedvlm-edge join --data` will see.
        print(f"{path}: {len(load_records(path).records)} records")
    first = client.test[0]
    print(f"answers in {client.convention.description}; "
          f"images/test_0000.png is asked {first.question!r}, answer {first.chosen!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
