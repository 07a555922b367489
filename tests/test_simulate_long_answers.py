"""`fedvlm simulate --objective dpo` on shards in RLAIF-V's published schema, scored as long answers."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fedvlm.cli import main as fedvlm_main

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SOURCES = {"VQAv2": "The image shows a {c} square that fills the frame, with nothing else in view.",
           "OKVQA": "In this picture everything is painted {c}; the whole scene is one {c} surface."}


def _png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def write_rlaifv_shard(path, rows_per_source: int = 8) -> None:
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


def test_dpo_on_rlaifv_shards_reports_preference_and_text_scores(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "shards"
    data.mkdir()
    write_rlaifv_shard(data / "RLAIF-V-Dataset_000.parquet")
    out = tmp_path / "out"
    code = fedvlm_main(["simulate", "--data", str(data), "--partition", "origin_dataset", "--objective", "dpo",
                        "--dpo-beta", "0.5", "--clients", "2", "--model", str(tiny_model_dir),
                        "--strategies", "plora,fedit,base", "--rounds", "1", "--local-steps", "2",
                        "--batch-size", "4", "--max-new-tokens", "12", "--quantization", "none",
                        "--out", str(out), "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["objective"] == "dpo" and results["args"]["dpo_beta"] == 0.5
    for name, entry in results["strategies"].items():
        for metric in ("preference_accuracy", "reward_margin", "loss", "perplexity", "rouge_l", "bleu"):
            assert entry[f"personal_{metric}"] is not None, (name, metric)
            assert all(c[f"personal_{metric}"] is not None for c in entry["per_client"])
        assert entry["personal_accuracy"] is None  # paragraphs: no exact match
        assert 0 <= entry["personal_preference_accuracy"] <= 1 and 0 <= entry["personal_rouge_l"] <= 1
        assert entry["headline"] == "preference_accuracy"
    # The untrained base is the margin's reference: its margin is 0 exactly.
    assert results["strategies"]["base"]["personal_reward_margin"] == pytest.approx(0.0, abs=1e-9)
    # DPO moved the trained strategies' margins away from the reference.
    assert results["strategies"]["plora"]["personal_reward_margin"] != pytest.approx(0.0, abs=1e-6)
    assert [c["description"] for c in results["strategies"]["plora"]["per_client"]] == ["OKVQA", "VQAv2"]
    table = (out / "results.md").read_text()
    for label in ("preference accuracy", "reward margin", "loss (chosen)", "ROUGE-L", "BLEU", "(DPO, beta 0.5)"):
        assert label in table
    assert "exact match" not in table.split("\n\n")[3]  # the table's header: no exact-match column
    assert (out / "scores.png").stat().st_size > 0


def test_bad_objective_flags_are_one_line(tiny_model_dir, tmp_path, capsys):
    for flags, message in ((["--dpo-beta", "0"], "--dpo-beta must be a positive number"),
                           (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1")):
        code = fedvlm_main(["simulate", "--scenario", "iid", *flags, "--out", str(tmp_path / "o"), "--quiet"])
        error = capsys.readouterr().err
        assert code == 2 and message in error and "Traceback" not in error, error
