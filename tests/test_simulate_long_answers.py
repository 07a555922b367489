"""`fedvlm simulate --objective dpo` on shards in RLAIF-V's published schema, scored as long answers."""

from __future__ import annotations

import json

import pytest

from fedvlm.cli import main as fedvlm_main
from tests.rlaifv_shards import write_rlaifv_shard

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


def test_every_strategy_trains_under_dpo(tiny_model_dir, tmp_path, capsys):
    """DPO is only the loss: every strategy (personalised ones with their own training loops
    included) runs under it, and each still sends what it sends under SFT."""
    from fedvlm.shared.strategies import STRATEGY_NAMES

    data = tmp_path / "shards"
    data.mkdir()
    write_rlaifv_shard(data / "part.parquet", rows_per_source=4)
    out = tmp_path / "out"
    code = fedvlm_main(["simulate", "--data", str(data), "--objective", "dpo", "--clients", "2",
                        "--model", str(tiny_model_dir), "--strategies", ",".join(STRATEGY_NAMES),
                        "--lora-parts", "language,vision,projector", "--client-ranks", "2,4", "--lora-rank", "4",
                        "--rounds", "1", "--local-steps", "2", "--batch-size", "2", "--max-new-tokens", "4",
                        "--quantization", "none", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    strategies = json.loads((out / "results.json").read_text())["strategies"]
    assert set(strategies) == set(STRATEGY_NAMES)
    for name, entry in strategies.items():
        assert entry["personal_preference_accuracy"] is not None and entry["personal_reward_margin"] is not None
    assert strategies["plora"]["shared_tensors"]["factors"] == ["B"]
    assert strategies["fedit"]["shared_tensors"]["factors"] == ["A", "B"]
    assert strategies["local"]["bytes_up_per_client_round"] == 0
