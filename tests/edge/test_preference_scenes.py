"""The offline RLAIF-V-like generator: exact schema, long right answers, hallucinated rejected ones."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedvlm.cli import main as fedvlm_main
from fedvlm.edge.data import load_records, scan_data
from fedvlm.edge.data.preference_scenes import SOURCES, hallucinate, scene_items, write_preference_shards
from fedvlm.edge.data.scenes import COLOUR_RGB, sample_scene, uniform_class_weights

COLUMNS = ["ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split", "idx", "image_path"]


def test_shards_have_the_published_schema(tmp_path):
    files = write_preference_shards(tmp_path, 30, shards=3, image_size=32, row_group_size=4)
    assert [f.name for f in files] == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    parquet = pq.ParquetFile(files[0])
    assert parquet.schema_arrow.names == COLUMNS and parquet.metadata.num_row_groups == 3  # 10 rows by 4
    assert parquet.schema_arrow.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert all(parquet.schema_arrow.field(c).type == pa.string() for c in COLUMNS if c != "image")
    first = parquet.read().slice(0, 1).to_pylist()[0]
    assert first["image"]["bytes"].startswith(b"\x89PNG") and first["idx"] == "0"
    assert set(json.loads(first["origin_split"])) == {"model", "feedback_model", "type"}


def test_output_round_trips_through_the_reader_with_every_source(tmp_path):
    write_preference_shards(tmp_path, 40, shards=2, image_size=32)
    loaded = load_records(tmp_path, require_rejected=True)
    assert len(loaded) == 40 and loaded.skipped == 0
    by_source = {name: [r for r in loaded if r.origin_dataset == name] for name in SOURCES}
    assert all(len(records) == 10 for records in by_source.values())
    for name, records in by_source.items():
        source = SOURCES[name]
        assert {(r.model, r.feedback_model, r.type) for r in records} == {(source.model, source.feedback_model,
                                                                          source.type)}
        assert {r.question for r in records} <= set(source.questions)
        for record in records:
            assert record.rejected != record.chosen
            assert len(re.findall(r"[.!?](\s|$)", record.chosen)) >= 3  # long-form: several sentences
            assert record.image.size == (32, 32)
    questions = [set(s.questions) for s in SOURCES.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(questions) for b in questions[i + 1:])


def test_chosen_gets_the_drawn_scene_right_and_rejected_changes_a_detail():
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = sample_scene(rng, "count", uniform_class_weights(), 64, (0.10, 0.18))
        image = np.asarray(scene.draw(), dtype=int)
        items = scene_items(scene)
        assert len(items) == len(scene.shapes)
        for shape in scene.shapes:  # each item names the colour drawn at its shape's centre, and its quadrant
            x, y = shape.centre
            place = f"{'top' if y < 32 else 'bottom'} {'left' if x < 32 else 'right'}"
            (item,) = [i for i in items if i.place == place]
            assert np.abs(image[int(y), int(x)] - COLOUR_RGB[item.colour]).max() <= 25
        chosen = SOURCES["VisualGenome"].describe(items, "black")
        for item in items:
            assert f"In the {item.place} corner there is a {item.colour} {item.shape}" in chosen
        wrong = hallucinate(items, rng)
        assert wrong != items
        changed = (len(wrong) != len(items) or {i.place for i in wrong} != {i.place for i in items}
                   or sorted(i.colour for i in wrong) != sorted(i.colour for i in items))
        assert changed  # a colour, the count or a place: what RLAIF-V's rejected answers get wrong


def test_sources_describe_the_same_scene_in_different_words():
    scene = sample_scene(np.random.default_rng(3), "count", uniform_class_weights(), 64, (0.10, 0.18))
    texts = {name: source.describe(scene_items(scene), "black") for name, source in SOURCES.items()}
    assert len(set(texts.values())) == len(SOURCES)
    first_words = {text.split()[0] for text in texts.values()}
    assert len(first_words) == len(SOURCES)  # each style opens its own way


def test_the_command_writes_shards_and_says_what(tmp_path, capsys):
    code = fedvlm_main(["make-rlaifv-data", str(tmp_path / "d"), "--rows", "12", "--sources", "COCO,OKVQA",
                        "--shards", "2", "--image-size", "32", "--grain", "30"])
    out = capsys.readouterr().out
    assert code == 0 and "wrote 12 preference pairs in 2 shard(s)" in out and "COCO 6, OKVQA 6" in out
    assert len(scan_data(tmp_path / "d").rows) == 12
    code = fedvlm_main(["make-rlaifv-data", str(tmp_path / "e"), "--sources", "COCO,Flickr"])
    error = capsys.readouterr().err
    assert code == 2 and "unknown source(s) Flickr" in error and error.count("\n") == 1
