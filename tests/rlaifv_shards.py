"""Shards in RLAIF-V's published schema, written by pyarrow itself (not by FedVLM's writer),
with paragraph-long chosen answers and rejected ones that get a colour wrong and add a detail."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SOURCES = {"VQAv2": "The image shows a {c} square that fills the frame, with nothing else in view.",
           "OKVQA": "In this picture everything is painted {c}; the whole scene is one {c} surface."}


def _png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def write_rlaifv_shard(path: Path, rows_per_source: int = 8) -> None:
    """Rows exactly as openbmb/RLAIF-V-Dataset publishes them, written by pyarrow itself."""
    rows = []
    names = list(COLOURS)
    for source, style in SOURCES.items():
        for index in range(rows_per_source):
            colour, wrong = names[index % 4], names[(index + 1) % 4]
            rows.append({
                "ds_name": "RLAIF-V", "image": {"bytes": _png(COLOURS[colour]), "path": f"{source}_{index}.png"},
                "question": "Describe the image in detail.", "chosen": style.format(c=colour),
                "rejected": style.format(c=wrong) + " A small dog sits in the corner.",
                "origin_dataset": source,
                "origin_split": json.dumps({"model": "OmniLMM-12B", "feedback_model": "RLAIF-V 12B",
                                            "type": "detailed_description"}),
                "idx": f"{source}-{index}", "image_path": f"{source}_{index}.png"})
    schema = pa.schema([("ds_name", pa.string()),
                        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("question", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                        ("origin_dataset", pa.string()), ("origin_split", pa.string()), ("idx", pa.string()),
                        ("image_path", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
