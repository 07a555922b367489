"""Write records as RLAIF-V data: parquet (the HF schema) or JSON Lines.

The parquet columns are RLAIF-V's own (ds_name, image, question, chosen, rejected,
origin_dataset, origin_split, idx, image_path), with ``image`` as the struct
``{bytes, path}`` and the Hugging Face feature metadata attached, so the files load with
``datasets.load_dataset("parquet", ...)`` as images, as well as with
:func:`~fedvlm.edge.data.load_records`. JSON Lines holds the same fields with the image
bytes base64-encoded. Files are written to a temporary name and renamed, so a crash never
leaves half a data set behind.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from fedvlm.edge.data.file_rows import JSONL_SUFFIX, PARQUET_SUFFIX
from fedvlm.edge.data.records import DataError, Record

_COLUMN_ORDER = ("ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split",
                 "idx", "image_path")
_ROWS_PER_PARQUET_BATCH = 512


def write_records(records: Iterable[Record], path: str | os.PathLike[str], *, ds_name: str = "fedvlm") -> Path:
    """Write ``records`` to ``path`` (``.parquet`` or ``.jsonl``) and return the path.

    Images keep their original encoding when the record was read from a file; images
    made in memory are stored as PNG. ``ds_name`` fills RLAIF-V's data set name column.
    """
    target = Path(path)
    if target.suffix not in (PARQUET_SUFFIX, JSONL_SUFFIX):
        raise DataError(f"cannot write records to {target}: use a .parquet or .jsonl file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    rows = _rows(records, ds_name)
    try:
        if target.suffix == PARQUET_SUFFIX:
            _write_parquet(rows, partial)
        else:
            _write_jsonl(rows, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _rows(records: Iterable[Record], ds_name: str) -> Iterator[dict[str, Any]]:
    for index, record in enumerate(records):
        encoded = record.encoded_image()
        image_name = f"{index:06d}.{encoded.extension}"
        yield {
            "ds_name": ds_name,
            "image": {"bytes": encoded.data, "path": image_name},
            "question": record.question,
            "chosen": record.chosen,
            "rejected": record.rejected,
            "origin_dataset": record.origin_dataset,
            "origin_split": "",
            "idx": str(index),  # RLAIF-V stores the index as text
            "image_path": image_name,
        }


def rlaifv_schema():
    """The published RLAIF-V parquet schema, with the Hugging Face feature metadata."""
    import pyarrow as pa

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field(name, image_type if name == "image" else pa.string()) for name in _COLUMN_ORDER]
    # The HF feature description: without it `datasets` shows the image column as a dict.
    features = {name: ({"_type": "Image"} if name == "image" else {"dtype": "string", "_type": "Value"})
                for name in _COLUMN_ORDER}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(fields, metadata=metadata)


def _write_parquet(rows: Iterator[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = rlaifv_schema()
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == _ROWS_PER_PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def _write_jsonl(rows: Iterator[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            image = row["image"]
            row["image"] = {"bytes": base64.b64encode(image["bytes"]).decode("ascii"), "path": image["path"]}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
