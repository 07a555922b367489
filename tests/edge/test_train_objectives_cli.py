"""`fedvlm-edge train --objective dpo --eval-data` on RLAIF-V shards: the report scores long answers."""

from __future__ import annotations

import json

from fedvlm.edge.cli import main
from tests.rlaifv_shards import write_rlaifv_shard


def test_edge_train_dpo_reports_preference_and_text_scores(tiny_model_dir, tmp_path, capsys):
    write_rlaifv_shard(tmp_path / "train.parquet", rows_per_source=6)
    write_rlaifv_shard(tmp_path / "test.parquet", rows_per_source=2)
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.parquet"),
                 "--eval-data", str(tmp_path / "test.parquet"), "--state-dir", str(tmp_path / "state"),
                 "--objective", "dpo", "--dpo-beta", "0.5", "--steps", "4", "--batch-size", "4", "--lr", "1e-2",
                 "--rank", "4", "--quantization", "none", "--max-new-tokens", "10"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert report["objective"] == {"name": "dpo", "dpo_beta": 0.5}
    before, after = report["before"], report["after"]
    assert before["accuracy"] is None and after["accuracy"] is None  # paragraphs: no exact match
    assert before["reward_margin"] is None  # no reference before training; after it, the model before
    assert after["reward_margin"] > 0  # DPO raised chosen against rejected
    assert after["preference_accuracy"] >= before["preference_accuracy"]
    for key in ("loss", "perplexity", "rouge_l", "bleu"):
        assert after[key] is not None
    assert after["max_new_tokens"] == 10
    assert report["train"]["first_loss"] > report["train"]["loss"]


def test_dpo_without_rejected_answers_is_one_line(tiny_model_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_rlaifv_shard(tmp_path / "train.parquet", rows_per_source=2)
    table = pq.read_table(tmp_path / "train.parquet")
    table = table.set_column(table.schema.get_field_index("rejected"), "rejected", pa.array([""] * table.num_rows))
    pq.write_table(table, tmp_path / "train.parquet")
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.parquet"),
                 "--state-dir", str(tmp_path / "state"), "--objective", "dpo", "--steps", "1", "--quantization",
                 "none"])
    error = capsys.readouterr().err
    # The data reader counts it as a bad row (missing_rejected) before anything slow happens.
    assert code == 2 and "missing_rejected" in error and "train.parquet:row 0" in error and "Traceback" not in error
    assert error.count("\n") == 1
