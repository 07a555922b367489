"""RLAIF-V shards in the exact published schema, written by pyarrow here (not by our writer):
read, streamed, split into non-IID clients, and their bad rows reported or skipped per reason."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fedvlm.edge.data import (
    DataError,
    PartitionSpec,
    PartitionTable,
    load_client_share,
    load_records,
    partition_rows,
    scan_data,
)
from fedvlm.shared.usage_error import UsageError

# The published schema, as `datasets` wrote RLAIF-V's shards.
SCHEMA = pa.schema([
    ("ds_name", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("question", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("origin_dataset", pa.string()),
    ("origin_split", pa.string()),
    ("idx", pa.string()),
    ("image_path", pa.string()),
])
SOURCES = [("VQAv2", "llava-1.5-7b", "RLAIF-V-7B", "vqa"), ("COCO", "OmniLMM-12B", "RLAIF-V-12B", "caption"),
           ("OKVQA", "MiniCPM-V", "RLAIF-V-12B", "vqa")]


def png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def row(i: int, **changes) -> dict:
    origin, model, feedback, kind = SOURCES[i % len(SOURCES)]
    values = {"ds_name": "RLAIF-V", "image": {"bytes": png(i), "path": f"{i}.jpg"}, "question": f"What is in {i}?",
              "chosen": f"A long and correct answer about picture {i}. It has two sentences.",
              "rejected": f"A hallucinated answer about picture {i}.", "origin_dataset": origin,
              "origin_split": json.dumps({"model": model, "feedback_model": feedback, "type": kind}),
              "idx": str(1000 + i), "image_path": f"images/{i}.jpg"}
    return {**values, **changes}


def write_shard(path, rows: list[dict], row_group_size: int = 4) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=row_group_size)


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "rlaifv"
    folder.mkdir()
    write_shard(folder / "train-00000-of-00002.parquet", [row(i) for i in range(12)])
    write_shard(folder / "train-00001-of-00002.parquet", [row(i) for i in range(12, 30)])
    return folder


# --- reading -------------------------------------------------------------------------------


def test_exact_schema_shards_are_read_with_every_field(shards):
    loaded = load_records(shards)
    assert len(loaded) == 30 and loaded.skipped == 0
    record = loaded[13]
    assert record.question == "What is in 13?" and record.chosen.startswith("A long and correct answer")
    assert record.rejected == "A hallucinated answer about picture 13."
    assert (record.origin_dataset, record.model, record.feedback_model, record.type) == SOURCES[13 % 3]
    np.testing.assert_array_equal(np.asarray(record.image), np.asarray(Image.open(io.BytesIO(png(13)))))
    assert record.source == f"{shards}/train-00001-of-00002.parquet:row 1"


def test_a_glob_selects_shards_and_max_examples_is_seeded(shards):
    assert len(load_records(shards / "train-00001-*.parquet")) == 18
    first = [r.question for r in load_records(shards, max_examples=7, seed=3)]
    assert len(first) == 7 and first == [r.question for r in load_records(shards, max_examples=7, seed=3)]
    assert first != [r.question for r in load_records(shards, max_examples=7, seed=4)]


def test_the_scan_leaves_images_unread_and_only_sampled_rows_are_decoded(tmp_path):
    """A broken image in a row never sampled costs nothing; loaded, it is named."""
    path = tmp_path / "shard.parquet"
    write_shard(path, [row(0), row(1, image={"bytes": b"\x89PNG broken", "path": "x"}), row(2)])
    index = scan_data(path)
    assert len(index.rows) == 3 and index.skipped.total == 0  # the scan never looked at the image
    good = index.load([index.rows[0], index.rows[2]])
    assert [r.question for r in good] == ["What is in 0?", "What is in 2?"]
    with pytest.raises(DataError, match=r"shard.parquet:row 1 \(idx 1001\): the image is not a readable picture"):
        index.load(index.rows)


# --- bad rows ------------------------------------------------------------------------------

BAD_ROWS = {  # reason -> (the row's changes, words of the message)
    "bad_image": ({"image": {"bytes": b"not an image", "path": "x.jpg"}}, "not a readable picture"),
    "empty_chosen": ({"chosen": "  "}, "'chosen' is empty"),
    "missing_rejected": ({"rejected": None}, "'rejected' is missing or empty"),
    "bad_origin_split": ({"origin_split": '{"model": "x", '}, "'origin_split' is not valid JSON"),
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_each_bad_row_is_one_line_naming_shard_row_idx_and_the_fix(tmp_path, reason):
    changes, words = BAD_ROWS[reason]
    path = tmp_path / "shard.parquet"
    write_shard(path, [row(0), row(1), row(2, **changes), row(3)])
    with pytest.raises(DataError) as caught:
        load_records(path, require_rejected=True)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{path}:row 2 (idx 1002)" in message and words in message and f"[{reason}]" in message
    assert "--skip-bad" in message


def test_skip_bad_counts_every_reason_and_keeps_the_good_rows(tmp_path):
    path = tmp_path / "shard.parquet"
    rows = [row(i) for i in range(10)]
    for position, (changes, _) in zip((1, 3, 5, 7), BAD_ROWS.values()):
        rows[position] = row(position, **changes)
    rows[8] = row(8, chosen=None)
    write_shard(path, rows)
    loaded = load_records(path, skip_bad=True, require_rejected=True)
    assert len(loaded) == 5 and loaded.skipped == 5
    assert loaded.skipped_by_reason == {"bad_image": 1, "empty_chosen": 2, "missing_rejected": 1,
                                        "bad_origin_split": 1}
    assert [p.split(": ", 1)[0] for p in loaded.problems] == [f"{path}:row {n} (idx {1000 + n})" for n in (1, 3, 5, 7, 8)]


def test_a_missing_rejected_is_bad_only_when_the_objective_needs_it(tmp_path):
    path = tmp_path / "shard.parquet"
    write_shard(path, [row(0, rejected=None), row(1, rejected="")])
    assert [r.rejected for r in load_records(path)] == [None, None]
    with pytest.raises(DataError, match="all 2 were malformed"):
        load_records(path, require_rejected=True, skip_bad=True)


@pytest.mark.parametrize("text", ["[1, 2]", '"just text"', '{"model": ["a"]}'])
def test_origin_split_that_is_not_an_object_of_text_is_bad(tmp_path, text):
    path = tmp_path / "shard.parquet"
    write_shard(path, [row(0), row(1, origin_split=text)])
    loaded = load_records(path, skip_bad=True)
    assert loaded.skipped_by_reason == {"bad_origin_split": 1} and len(loaded) == 1


def test_empty_origin_split_means_unknown_not_bad(tmp_path):
    path = tmp_path / "shard.parquet"
    write_shard(path, [row(0, origin_split=""), row(1, origin_split=None)])
    assert [(r.model, r.feedback_model, r.type) for r in load_records(path)] == [("", "", "")] * 2


# --- partitions ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind", "key", "alpha"), [
    ("origin_dataset", "by_key", "origin_dataset", None), ("model", "by_key", "model", None),
    ("feedback_model", "by_key", "feedback_model", None), ("type", "by_key", "type", None),
    ("iid", "iid", "origin_dataset", None), ("dirichlet:0.5", "dirichlet", "origin_dataset", 0.5),
    ("dirichlet:2:model", "dirichlet", "model", 2.0),
])
def test_partition_specs_parse_and_print_back(text, kind, key, alpha):
    spec = PartitionSpec.parse(text)
    assert (spec.kind, spec.key, spec.alpha) == (kind, key, alpha)
    assert PartitionSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(("text", "words"), [("dirichlet:0", "ALPHA must be positive"),
                                             ("dirichlet:x", "'x' is not a number"),
                                             ("dirichlet:1:colour", "'colour' is not a key"), ("shards", "use one of")])
def test_bad_partition_specs_say_what_to_write(text, words):
    with pytest.raises(UsageError, match=words):
        PartitionSpec.parse(text)


def _rows(n: int = 600, sources: int = 4):
    """Row references of ``n`` rows from ``sources`` sources of different sizes (no images needed)."""
    from fedvlm.edge.data import RowRef

    weights = np.arange(1, sources + 1) / np.arange(1, sources + 1).sum()
    origin = np.random.default_rng(0).choice(sources, n, p=weights)
    return [RowRef(0, i, str(i), f"set{o}", f"model{o % 2}", "judge", "t") for i, o in enumerate(origin)]


def test_a_key_partition_gives_each_value_whole_to_one_client_and_counts_add_up():
    rows = _rows()
    shares = partition_rows(rows, PartitionSpec.parse("origin_dataset"), 2, np.random.default_rng(0))
    assert sum(map(len, shares)) == len(rows) and sorted(r.number for s in shares for r in s) == list(range(600))
    values = [{r.origin_dataset for r in share} for share in shares]
    assert values[0].isdisjoint(values[1]) and values[0] | values[1] == {"set0", "set1", "set2", "set3"}
    assert abs(len(shares[0]) - len(shares[1])) < 0.25 * len(rows)  # largest first to the smallest: near even
    by_model = partition_rows(rows, PartitionSpec.parse("model"), 2, np.random.default_rng(0))
    assert [{r.model for r in share} for share in by_model] in ([{"model0"}, {"model1"}], [{"model1"}, {"model0"}])
    with pytest.raises(UsageError, match="needs at least one source per client: the data has 2 model value"):
        partition_rows(rows, PartitionSpec.parse("model"), 3, np.random.default_rng(0))


def test_dirichlet_is_seeded_and_skewed_more_by_a_smaller_alpha():
    rows = _rows(2000)

    def split(alpha: float, seed: int):
        return partition_rows(rows, PartitionSpec("dirichlet", "origin_dataset", alpha), 4, np.random.default_rng(seed))

    assert split(0.1, 5) == split(0.1, 5) and split(0.1, 5) != split(0.1, 6)

    def dominance(shares) -> float:  # mean share of a client's largest source: 1 is one source per client
        tables = PartitionTable.of(shares, "origin_dataset", [str(k) for k in range(4)])
        return float(np.mean([max(c) / max(1, sum(c)) for c in tables.counts if sum(c)]))

    skewed = np.mean([dominance(split(0.1, seed)) for seed in range(5)])
    mixed = np.mean([dominance(split(100.0, seed)) for seed in range(5)])
    assert skewed > 0.7 and mixed < 0.45, (skewed, mixed)  # 4 sources: 0.25-0.4 when mixed
    assert all(sum(map(len, split(0.1, seed))) == 2000 for seed in range(3))


def test_iid_is_balanced_in_size_and_in_sources():
    rows = _rows(1000)
    shares = partition_rows(rows, PartitionSpec.parse("iid"), 4, np.random.default_rng(1))
    assert sorted(map(len, shares)) == [250] * 4
    table = PartitionTable.of(shares, "origin_dataset", ["a", "b", "c", "d"])
    overall = np.sum(table.counts, axis=0) / 1000
    for counts in table.counts:
        np.testing.assert_allclose(np.asarray(counts) / 250, overall, atol=0.1)


def test_the_partition_table_shows_client_by_source_counts():
    rows = _rows(100)
    shares = partition_rows(rows, PartitionSpec.parse("origin_dataset"), 2, np.random.default_rng(0))
    table = PartitionTable.of(shares, "origin_dataset", ["client_00", "client_01"])
    text = table.markdown()
    assert "| client | set0 | set1 | set2 | set3 | total |" in text
    assert f"| client_00 | {' | '.join(map(str, table.counts[0]))} | {len(shares[0])} |" in text
    assert text.rstrip().endswith("| 100 |")  # the "all" row's total
    assert table.to_dict()["clients"]["client_00"] == {v: c for v, c in zip(table.values, table.counts[0]) if c}


def test_a_device_share_is_its_own_part_and_reads_only_its_rows(shards):
    spec = PartitionSpec.parse("origin_dataset")
    parts = [load_client_share(shards, k, 3, spec, max_per_client=6) for k in range(3)]
    assert [len(p) for p in parts] == [6, 6, 6]
    assert sorted({r.origin_dataset for r in p}.pop() for p in parts) == ["COCO", "OKVQA", "VQAv2"]
    with pytest.raises(DataError, match="shares are numbered 0 to 2"):
        load_client_share(shards, 3, 3, spec)


def test_a_device_takes_its_share_from_the_command_line(shards, tmp_path, capsys):
    from fedvlm.edge.cli import build_parser
    from fedvlm.edge.cli_data import load_device_records

    write_shard(shards / "zz-bad.parquet", [row(40, chosen=""), row(41)])

    def records(*flags: str):
        args = build_parser().parse_args(["train", "--model", "m", "--state-dir", str(tmp_path), "--data", str(shards),
                                          *flags])
        return load_device_records(args)

    mine = records("--share", "1/3", "--partition", "origin_dataset", "--max-examples", "5", "--skip-bad")
    assert len(mine) == 5 and len({r.origin_dataset for r in mine}) == 1
    assert "skipped 1 bad record(s) of --data (--skip-bad): 1 empty_chosen" in capsys.readouterr().err
    assert len(records("--max-examples", "4", "--skip-bad")) == 4
    for share, words in (("3/3", "K from 0 to N-1"), ("x", "write K/N")):
        with pytest.raises(UsageError, match=words):
            records("--share", share)
