"""RLAIF-V records: round trips through parquet and JSON Lines, and clear errors for bad rows."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fedvlm.edge.data import DataError, Record, load_records, write_records
from fedvlm.edge.errors import EdgeError


def _image(seed: int, size: int = 8, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    _image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def _records(n: int = 3) -> list[Record]:
    return [Record(_image(i), f"question {i}?", f"answer {i}", None if i == 1 else f"wrong {i}", f"set{i}")
            for i in range(n)]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _assert_same(loaded: list[Record], expected: list[Record]) -> None:
    assert len(loaded) == len(expected)
    for got, want in zip(loaded, expected):
        assert (got.question, got.chosen, got.rejected, got.origin_dataset) == \
               (want.question, want.chosen, want.rejected, want.origin_dataset)
        assert got.image.mode == "RGB"
        np.testing.assert_array_equal(_pixels(got.image), _pixels(want.image))


def _write_jsonl(path, rows: list) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def _good_row(seed: int = 0) -> dict:
    return {"image": {"bytes": base64.b64encode(_png(seed)).decode()}, "question": "q?", "chosen": "a"}


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_round_trip_keeps_every_field_and_pixel(tmp_path, suffix):
    records = _records()
    path = write_records(records, tmp_path / f"data{suffix}")
    loaded = load_records(path)
    _assert_same(loaded.records, records)
    assert loaded.skipped == 0 and loaded.problems == []
    row_word = "row 2" if suffix == ".parquet" else "line 3"
    assert loaded[2].source == f"{path}:{row_word}"
    assert list(loaded) == loaded.records and len(loaded) == 3


def test_jsonl_image_paths_are_relative_to_the_data_file(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    _image(0).save(folder / "images" / "a.png")
    _image(1).save(folder / "images" / "b.png")
    _write_jsonl(folder / "train.jsonl", [
        {"image": "images/a.png", "question": "q0?", "chosen": "a0"},
        {"image": {"path": "images/b.png", "bytes": None}, "question": "q1?", "chosen": "a1", "rejected": ""},
    ])
    monkeypatch.chdir(tmp_path)  # elsewhere: paths must not depend on the working directory
    loaded = load_records(folder / "train.jsonl")
    np.testing.assert_array_equal(_pixels(loaded[0].image), _pixels(_image(0)))
    np.testing.assert_array_equal(_pixels(loaded[1].image), _pixels(_image(1)))
    assert loaded[1].rejected is None  # an empty rejected answer means none


def test_parquet_accepts_struct_raw_bytes_and_path_columns(tmp_path):
    _image(2).save(tmp_path / "two.png")
    tables = {
        "struct.parquet": pa.table({"image": [{"bytes": _png(0), "path": "x.png"}], "question": ["q"], "chosen": ["a"]}),
        "binary.parquet": pa.table({"image": pa.array([_png(1)], pa.binary()), "question": ["q"], "chosen": ["a"]}),
        "path.parquet": pa.table({"image": ["two.png"], "question": ["q"], "chosen": ["a"]}),
        "struct_path.parquet": pa.table({"image": [{"bytes": None, "path": "two.png"}], "question": ["q"],
                                         "chosen": ["a"]}),
    }
    for name, table in tables.items():
        pq.write_table(table, tmp_path / name)
    expected = {"struct.parquet": 0, "binary.parquet": 1, "path.parquet": 2, "struct_path.parquet": 2}
    for name, seed in expected.items():
        (record,) = load_records(tmp_path / name).records
        np.testing.assert_array_equal(_pixels(record.image), _pixels(_image(seed)), err_msg=name)
        assert record.rejected is None and record.origin_dataset == ""


def test_a_folder_loads_its_data_files_in_name_order(tmp_path):
    write_records(_records(2), tmp_path / "b.parquet")
    _write_jsonl(tmp_path / "a.jsonl", [_good_row(5)])
    (tmp_path / "federation.json").write_text("{}")  # not a data file: ignored
    loaded = load_records(tmp_path)
    assert [r.question for r in loaded] == ["q?", "question 0?", "question 1?"]
    assert loaded.files == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]


def test_images_become_rgb_and_stored_bytes_are_written_unchanged(tmp_path):
    buffer = io.BytesIO()
    _image(3).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    records = [Record(jpeg, "q?", "a"), Record(_image(4, mode="RGBA"), "q?", "a"), Record(_image(5, mode="L"), "q?", "a")]
    assert [r.image.mode for r in records] == ["RGB"] * 3
    assert records[0].encoded_image().extension == "jpeg"
    reloaded = load_records(write_records(records, tmp_path / "mixed.parquet"))
    # No re-encoding: a JPEG read from a data set is written back byte for byte.
    assert reloaded[0].encoded_image().data == jpeg
    np.testing.assert_array_equal(_pixels(reloaded[2].image), _pixels(_image(5, mode="L").convert("RGB")))


def test_written_parquet_uses_the_rlaif_v_schema(tmp_path):
    path = write_records(_records(2), tmp_path / "out.parquet", ds_name="mine")
    table = pq.read_table(path)
    assert table.column_names == ["ds_name", "image", "question", "chosen", "rejected", "origin_dataset",
                                  "origin_split", "idx", "image_path"]
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    first = table.slice(0, 1).to_pylist()[0]
    assert first["ds_name"] == "mine" and first["idx"] == "0"
    assert first["image"]["bytes"].startswith(b"\x89PNG") and first["image"]["path"] == "000000.png"
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert not list(tmp_path.glob(".*partial"))  # the temporary file was renamed away


# --- bad records -------------------------------------------------------------------------

_BROKEN_PNG = _png(0)[:60]  # a valid header, then the file stops

BAD_JSONL_ROWS = {
    "no question": ({"image": _good_row()["image"], "chosen": "a"}, "no 'question'"),
    "blank answer": ({**_good_row(), "chosen": "   "}, "'chosen' is empty"),
    "question not text": ({**_good_row(), "question": 7}, "'question' must be text, not int"),
    "no image field": ({"question": "q?", "chosen": "a"}, "no 'image' field"),
    "not an image": ({**_good_row(), "image": {"bytes": base64.b64encode(b"hello").decode()}}, "not a readable picture"),
    "truncated image": ({**_good_row(), "image": {"bytes": base64.b64encode(_BROKEN_PNG).decode()}},
                        "not a readable picture"),
    "bytes not base64": ({**_good_row(), "image": {"bytes": "not base64!"}}, "not base64"),
    "missing image file": ({**_good_row(), "image": "missing.png"}, "missing.png not found"),
    "invalid json": ('{"image": ', "not valid JSON"),
    "not an object": ("[1, 2]", "not an object"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL_ROWS))
def test_each_bad_jsonl_record_is_named_with_file_line_and_fix(tmp_path, case):
    row, reason = BAD_JSONL_ROWS[case]
    path = tmp_path / "train.jsonl"
    _write_jsonl(path, [_good_row(), row, _good_row()])
    with pytest.raises(DataError) as caught:
        load_records(path)
    message = str(caught.value)
    assert f"{path}:line 2" in message
    assert reason in message
    assert "skip_bad=True" in message and "--skip-bad" in message


@pytest.mark.parametrize(("row", "reason"), [
    ({"image": {"bytes": _png(0), "path": None}, "question": "q?", "chosen": None}, "no 'chosen'"),
    ({"image": {"bytes": b"\x00\x01garbage", "path": None}, "question": "q?", "chosen": "a"}, "not a readable picture"),
    ({"image": None, "question": "q?", "chosen": "a"}, "'image' is empty"),
    ({"image": {"bytes": None, "path": None}, "question": "q?", "chosen": "a"}, "neither bytes nor a path"),
    ({"image": {"bytes": _png(0), "path": None}, "question": "", "chosen": "a"}, "'question' is empty"),
])
def test_each_bad_parquet_record_is_named_with_file_and_row(tmp_path, row, reason):
    good = {"image": {"bytes": _png(1), "path": None}, "question": "q?", "chosen": "a"}
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([good, good, row]), path)
    with pytest.raises(DataError, match="skip_bad=True") as caught:
        load_records(path)
    assert f"{path}:row 2" in str(caught.value) and reason in str(caught.value)


def test_skip_bad_skips_counts_and_reports_each_bad_record(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [_good_row(0), BAD_JSONL_ROWS["no question"][0], "", _good_row(1),
            BAD_JSONL_ROWS["not an image"][0], BAD_JSONL_ROWS["invalid json"][0]]
    _write_jsonl(path, rows)
    loaded = load_records(path, skip_bad=True)
    assert len(loaded) == 2 and loaded.skipped == 3
    assert [p.split(": ", 1)[0] for p in loaded.problems] == [f"{path}:line {n}" for n in (2, 5, 6)]
    assert [r.source for r in loaded] == [f"{path}:line 1", f"{path}:line 4"]  # blank line 3 is no record


def test_a_missing_column_is_a_file_error_even_with_skip_bad(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"image": [_png(0)], "question": ["q?"], "answer": ["a"]}), path)
    with pytest.raises(DataError, match="no 'chosen' column") as caught:
        load_records(path, skip_bad=True)
    assert str(path) in str(caught.value) and "answer" in str(caught.value)  # lists what the file has


def test_empty_or_all_bad_data_sets_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_records(tmp_path / "empty.jsonl")
    write_records([], tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="holds no records"):
        load_records(tmp_path / "empty.parquet")
    _write_jsonl(tmp_path / "bad.jsonl", ["{", "[]"])
    with pytest.raises(DataError, match="all 2 were malformed"):
        load_records(tmp_path / "bad.jsonl", skip_bad=True)


def test_unusable_paths_say_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nowhere.parquet")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"\.parquet or \.jsonl"):
        load_records(tmp_path / "notes.csv")
    with pytest.raises(DataError, match="holds no .parquet or .jsonl files"):
        load_records(tmp_path)
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read .*fake.parquet as parquet"):
        load_records(tmp_path / "fake.parquet")
    with pytest.raises(DataError, match=r"\.parquet or \.jsonl file name"):
        write_records(_records(1), tmp_path / "out.csv")


def test_data_errors_are_edge_errors_the_cli_reports():
    assert issubclass(DataError, EdgeError)


def test_records_pickle_and_replace_keep_the_image():
    import pickle

    record = Record(_png(6), "q?", "a", "b", "set", "f.parquet:row 0")
    for copy in (pickle.loads(pickle.dumps(record)), record.replace(chosen="c")):
        np.testing.assert_array_equal(_pixels(copy.image), _pixels(_image(6)))
        assert copy.encoded_image() == record.encoded_image() and copy.source == "f.parquet:row 0"
    assert record.replace(chosen="c").chosen == "c" and record.chosen == "a"
    with pytest.raises(TypeError, match="no field"):
        record.replace(answer="c")


def test_a_record_rejects_unreadable_bytes_when_made():
    with pytest.raises(ValueError, match="not a readable picture"):
        Record(b"definitely not an image", "q?", "a")
