"""The see-task generator: determinism per seed, answers recomputed from the scene, splits, rendering."""

import json
from pathlib import Path

import pytest
from visprune.data_prep.seetask import (
    ASK_TYPES,
    SeeTaskConfig,
    answer_from_scene,
    describe_answer,
    make_split,
    render,
    write_seetask,
)
from visprune.trainer.cli import main


def read(path):
    return Path(path).read_text()

SMALL = {"num_train": 40, "num_val": 8, "num_test": 12}


def test_deterministic_per_seed_and_different_across_seeds(tmp_path):
    a = write_seetask(tmp_path / "a", SeeTaskConfig(seed=3, **SMALL), progress=False)
    b = write_seetask(tmp_path / "b", SeeTaskConfig(seed=3, **SMALL), progress=False)
    c = write_seetask(tmp_path / "c", SeeTaskConfig(seed=4, **SMALL), progress=False)
    for split in ("train", "val", "test"):
        assert read(a[split]) == read(b[split])
    assert read(a["train"]) != read(c["train"])
    first = json.loads(read(a["train"]))[0]["image"]
    assert (tmp_path / "a" / "images" / first).read_bytes() == (tmp_path / "b" / "images" / first).read_bytes()


def test_answers_are_recomputed_from_the_scene(tmp_path):
    cfg = SeeTaskConfig(seed=1, **SMALL)
    paths = write_seetask(tmp_path, cfg, progress=False)
    scenes = json.loads(read(paths["scenes"]))["scenes"]
    seen = set()
    for split in ("train", "val", "test"):
        for record in json.loads(read(paths[split])):
            question = record["conversations"][0]["value"].split("\n", 1)[1]
            answer = record["conversations"][1]["value"]
            assert answer == answer_from_scene(scenes[record["id"]], question, cfg), record["id"]
            seen.add(record["qtype"])
            assert (record["kind"] == "describe") == (record["qtype"] == "describe")
    assert seen == {"describe", *ASK_TYPES}


def test_describe_lists_every_cell_in_raster_order():
    scene = [None, ["red", "circle"], ["blue", "square"], None]
    assert describe_answer(scene) == "none, red circle, blue square, none"


def test_render_puts_shapes_in_their_cells():
    cfg = SeeTaskConfig(image_size=48, grid=4)
    scene = [None] * 16
    scene[5] = ["red", "square"]  # row 1, col 1
    image = render(scene, cfg)
    assert image.size == (48, 48)
    assert image.getpixel((18, 18)) == (220, 30, 30)  # inside cell (1, 1)
    assert image.getpixel((6, 6)) == (245, 245, 240)  # cell (0, 0) is empty


def test_split_sizes_mix_and_ids():
    cfg = SeeTaskConfig(seed=0, describe_fraction=0.25, **SMALL)
    records, images, scenes = make_split("train", 40, cfg)
    assert len(records) == len(images) == len(scenes) == 40
    assert sum(r["kind"] == "describe" for r in records) == 10
    assert len({r["id"] for r in records}) == 40


@pytest.mark.parametrize("kwargs, match", [({"num_colours": 9}, "num_colours"), ({"image_size": 50}, "multiple"),
                                           ({"empty_fraction": 1.0}, "empty_fraction")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeeTaskConfig(**kwargs)


def test_cli(tmp_path):
    assert main(["data", "seetask", "--out", str(tmp_path), "--num-train", "6", "--num-val", "2", "--num-test", "2",
                 "--grid", "3", "--image-size", "36", "--patch-size", "6"]) == 0
    records = json.loads(read(tmp_path / "train.json"))
    assert len(records) == 6 and json.loads(read(tmp_path / "scenes.json"))["config"]["grid"] == 3
    assert main(["data", "seetask", "--out", str(tmp_path / "bad"), "--num-colours", "9"]) == 2
