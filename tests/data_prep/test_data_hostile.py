"""Hostile and careless data inputs through the real CLI (`data check`, `data prepare`, `eval`, `train`): each is
one `error:` line naming the input (or a named rejection), no traceback, bounded time and memory, and no file
outside the command's output folder changes. Tests run as root, where chmod 000 does not stop reading: an
unreadable data file is tried as a folder and as a broken symlink instead."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image
from visprune.data_prep import records
from visprune.data_prep.check import REJECTED_FILE, Judge, check_records
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.prepare import prepare_dataset
from visprune.data_prep.prepared import MANIFEST_FILE
from visprune.data_prep.records import DataError, build_dataset
from visprune.data_prep.templates import resolve_template
from visprune.data_prep.toy import write_toy_inputs
from visprune.trainer.cli import main

TOY_RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "toy" / "flops25.yaml")


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def sample(sample_id, image=None, answer="red") -> dict:
    record = {"id": sample_id, "conversations": [turn("human", "<image>\nwhat colour?" if image else "what colour?"),
                                                 turn("gpt", answer)]}
    if image is not None:
        record["image"] = image
    return record


def png_bomb(path: Path, width: int = 12_000, height: int = 12_000) -> None:
    """A 1-bit PNG of width x height pixels (144 megapixels: about 430 MB as RGB) in a few hundred KB,
    written without ever holding its pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, packer = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def tree_digest(*paths: Path) -> dict[str, str]:
    """Every file, link and folder at or below `paths` -> its content hash (or link target)."""
    digest = {}
    for root in map(Path, paths):
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
            if path.is_symlink():
                digest[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest[str(path)] = "dir" if path.is_dir() else ("other" if os.path.lexists(path) else "absent")
    return digest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy model (its processor decides lengths), 8 good samples with images, a prepared folder of them, and
    an `inputs` folder every test's input files go in (hashed around each command)."""
    root = tmp_path_factory.mktemp("hostile")
    paths = write_toy_inputs(root / "toy", num_samples=8, seed=5)
    prepared = root / "prepared"
    prepare_dataset(paths["data"], paths["image_folder"], prepared, paths["model"], max_length=256, num_proc=1,
                    progress=False)
    return {**paths, "root": root, "prepared": prepared}


class Cli:
    """`main([...])` in this process, checking that no watched file changed; returns (code, stdout, stderr)."""

    def __init__(self, world, capsys, inputs: Path):
        self.world, self.capsys, self.inputs = world, capsys, inputs

    def __call__(self, *args, watch: tuple = ()) -> tuple[int, str, str]:
        watched = (self.inputs, self.world["root"] / "toy", self.world["prepared"], *watch)
        before = tree_digest(*watched)
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exc:  # argparse refuses a value
            code = exc.code
        out, err = self.capsys.readouterr()
        assert tree_digest(*watched) == before, "an input changed"
        return code, out, err

    def check(self, data, *extra, images=None, watch: tuple = ()):
        return self("data", "check", "--json", data, "--images", images or self.world["image_folder"], "--processor",
                    self.world["model"], "--max-length", 256, *extra, watch=watch)

    def prepare(self, data, out, *extra, images=None, watch: tuple = ()):
        return self("data", "prepare", "--json", data, "--images", images or self.world["image_folder"],
                    "--processor", self.world["model"], "--out", out, "--max-length", 256, "--num-proc", 1, *extra,
                    watch=watch)

    def eval(self, data, images=None, watch: tuple = ()):
        return self("eval", self.world["model"], "--data", data, "--images", images or self.world["image_folder"],
                    "--batch-size", 4, watch=watch)

    def train(self, data, run: Path, images=None, watch: tuple = ()):
        return self("train", TOY_RECIPE, f"model.path={self.world['model']}", f"data.path={data}",
                    f"data.image_folder={images or self.world['image_folder']}", f"output.dir={run}",
                    "train.max_steps=1", "train.micro_batch_size=2", "output.heatmap_steps=0", watch=watch)


@pytest.fixture
def cli(world, capsys, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return Cli(world, capsys, inputs)


def one_error(result: tuple[int, str, str], *fragments: str) -> str:
    """Exit code 2 and exactly one `error:` line on stderr, holding every fragment; no traceback."""
    code, _, err = result
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert code == 2 and len(errors) == 1, (code, err[-3000:])
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert len(errors[0]) < 1000
    return errors[0]


def rejections(path: Path) -> dict[str, str]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(lines[-1]) == {"counts", "num_samples", "num_ok"}
    return {line["id"]: line["reason"] for line in lines[:-1]}


# ---- data files that cannot be read -------------------------------------------------------------------------

def write_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a data file no verb may read, a fragment its one-line error must hold besides its path)."""
    deep = "[" * 100_000 + "]" * 100_000
    cases = {
        "folder": ("folder.json", None, "is a folder"),
        "broken-symlink": ("broken.json", None, "broken symlink"),
        "latin-1": ("latin1.json", b'[{"id": "caf\xe9"}]', "not UTF-8"),
        "latin-1-lines": ("latin1.jsonl", b'{"id": "caf\xe9"}\n', "line 1 is not UTF-8"),
        "empty": ("empty.json", b"", "the file is empty"),
        "empty-lines": ("empty.jsonl", b"", "the file is empty"),
        "json-lines-named-json": ("lines.json", b'{"id": "a"}\n{"id": "b"}\n', "JSON lines must be in a .jsonl"),
        "duplicate-key": ("dup.json", b'[{"id": "a", "id": "b", "conversations": []}]', "record #0: duplicate key 'id'"),
        "duplicate-key-lines": ("dup.jsonl", b'{"id": "a", "conversations": [{"from": "human", "from": "gpt"}]}\n',
                                "line 1 is not valid JSON: duplicate key 'from'"),
        "nan": ("nan.json", b'[{"id": "a", "score": NaN}]', "NaN is not a JSON value"),
        "infinity-lines": ("inf.jsonl", b'{"id": "a", "score": -Infinity}\n', "-Infinity is not a JSON value"),
        "overflow": ("overflow.json", b'[{"id": "a", "score": 1e999}]', "out of range"),
        "deep": ("deep.json", deep.encode(), "record #0 is nested too deeply"),
        "deep-lines": ("deep.jsonl", deep.encode() + b"\n", "line 1: nested too deeply"),
        "nested-101": ("nested.json", ("[" + "[" * 101 + "]" * 101 + "]").encode(), "nested deeper than 100"),
        "huge-integer": ("int.json", b'[{"id": ' + b"9" * 5000 + b"}]", "record #0"),
    }
    out = {}
    for name, (filename, content, fragment) in cases.items():
        path = folder / filename
        if name == "folder":
            path.mkdir()
        elif name == "broken-symlink":
            path.symlink_to(folder / "nowhere.json")
        else:
            path.write_bytes(content)
        out[name] = (path, fragment)
    return out


def test_unreadable_data_files_are_one_line_in_check_and_prepare(cli, tmp_path):
    for name, (path, fragment) in write_bad_files(cli.inputs).items():
        one_error(cli.check(path), str(path), fragment)
        one_error(cli.prepare(path, tmp_path / "out"), str(path), fragment)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*")), name


def test_unreadable_data_files_are_one_line_in_eval_and_train(cli, tmp_path):
    files = write_bad_files(cli.inputs)
    for name in ("broken-symlink", "latin-1", "duplicate-key", "deep", "overflow"):
        path, fragment = files[name]
        one_error(cli.eval(path), str(path), fragment)
        one_error(cli.train(path, tmp_path / f"run-{name}"), str(path), fragment)


def test_a_fifo_is_refused_not_waited_on(world, tmp_path):
    fifo = tmp_path / "data.json"
    os.mkfifo(fifo)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "visprune.trainer.cli", "data", "check", "--json", str(fifo),
                             "--processor", str(world["model"])], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1 and str(fifo) in errors[0] and "not a regular file" in errors[0]
    assert time.perf_counter() - started < 60
    for reader in (build_dataset, records.read_records):  # train / eval read it in-process; stat, then open
        with pytest.raises(DataError, match="not a regular file"):
            reader(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        prepare_dataset(fifo, world["image_folder"], tmp_path / "out", world["model"], num_proc=1, progress=False)


def test_a_record_over_the_size_bound_is_refused_without_reading_on(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_RECORD_CHARS", 1 << 20)  # 1 MB instead of 256 MB: the same code path
    big = json.dumps(sample("big", answer="x" * (2 << 20)))
    lines, listed = cli.inputs / "huge.jsonl", cli.inputs / "huge.json"
    lines.write_text(json.dumps(sample("ok")) + "\n" + big + "\n")
    listed.write_text("[" + json.dumps(sample("ok")) + ", " + big + "]")
    one_error(cli.check(lines), str(lines), "line 2 is longer than 1 MB")
    one_error(cli.check(listed), str(listed), "record #1 is longer than 1 MB")
    one_error(cli.prepare(listed, tmp_path / "out"), str(listed), "record #1 is longer than 1 MB")
    with pytest.raises(DataError, match="record #1 is longer than 1 MB"):  # read on in 64 KB chunks, then stop
        list(records.iter_records(listed, chunk_bytes=1 << 16))


def test_duplicate_keys_in_the_other_json_files_are_refused(cli, world):
    model = cli.inputs / "model"
    shutil.copytree(world["model"], model)
    config = model / "config.json"
    config.write_text(config.read_text().replace('"model_type"', '"model_type": "llava", "model_type"', 1))
    one_error(cli("data", "check", "--json", world["data"], "--images", world["image_folder"], "--processor", model),
              str(config), "duplicate key 'model_type'")
    shutil.copy(Path(world["model"]) / "config.json", config)
    template = model / "visprune_template.json"  # what `visprune harden` leaves beside an exported model
    template.write_text('{"format": 1, "format": 2}')
    one_error(cli("eval", model, "--data", world["data"], "--images", world["image_folder"]), str(template),
              "duplicate key 'format'")


def test_an_image_folder_that_is_a_file(cli, world, tmp_path):
    data = Path(world["data"])
    for result in (cli.check(data, images=data), cli.prepare(data, tmp_path / "out", images=data),
                   cli.eval(data, images=data)):
        one_error(result, str(data), "is not a folder")


# ---- hostile records: named rejections, bounded time, bounded messages -------------------------------------

def hostile_records(image: str) -> tuple[list[dict], dict[str, str]]:
    """(records, their `repr` id -> the rejection reason); each would hang, blow memory or flood the
    terminal if it were encoded or quoted as it is."""
    big_id = "i" * 10_000_000
    many_turns = [turn("human" if idx % 2 == 0 else "gpt", "hi") for idx in range(100_000)]
    bad = [
        ({**sample("x"), "id": ["a", "list"]}, "#1", "malformed_record"),
        ({**sample("image-dict", image), "image": {"path": image}}, "'image-dict'", "malformed_record"),
        ({"id": "many-images", "image": [image] * 10_000,
          "conversations": [turn("human", "<image>" * 10_000 + "what?"), turn("gpt", "red")]},
         "'many-images'", "over_length"),
        ({"id": "many-turns", "conversations": many_turns}, "'many-turns'", "over_length"),
        ({"id": "many-placeholders", "image": image, "conversations": [turn("human", "<image>" * 10_000),
                                                                       turn("gpt", "red")]},
         "'many-placeholders'", "placeholder_count"),
        (sample(big_id, "nowhere.png"), records.quote(big_id), "image_missing"),
        (sample("big-answer", answer="word " * 2_000_000), "'big-answer'", "over_length"),
        ({"id": "bad-role", "conversations": [turn("x" * 10_000_000, "hi"), turn("gpt", "ok")]}, "'bad-role'",
         "conversation"),
    ]
    return [sample("ok-first", image)] + [record for record, _, _ in bad] + [sample("ok-last")], \
        {name: reason for _, name, reason in bad}


def test_hostile_records_are_named_rejections_in_bounded_time(cli, world, tmp_path):
    image = min(os.listdir(world["image_folder"]))
    data_records, expected = hostile_records(image)
    data = cli.inputs / "hostile.json"
    data.write_text(json.dumps(data_records))
    started = time.perf_counter()
    code, out, err = cli.check(data, "--skip-bad", "--out", tmp_path / "scan")
    assert code == 0 and "Traceback" not in err and "internal error" not in err
    assert time.perf_counter() - started < 60
    assert rejections(tmp_path / "scan" / REJECTED_FILE) == expected
    assert max(map(len, (tmp_path / "scan" / REJECTED_FILE).read_text().splitlines())) < 1500
    assert max(map(len, (out + err).splitlines())) < 1500
    code, out, err = cli.prepare(data, tmp_path / "prepared", "--skip-bad")
    assert code == 0 and "2 samples" in out
    assert rejections(tmp_path / "prepared" / REJECTED_FILE) == expected
    code, _, err = cli.check(data)  # without --skip-bad: every rejection listed, each line bounded
    assert code == 1 and max(map(len, err.splitlines())) < 1500 and "'many-turns': over_length" in err


def test_hostile_records_in_eval_and_train_are_one_line(cli, world, tmp_path):
    image = min(os.listdir(world["image_folder"]))
    data_records, _ = hostile_records(image)
    data = cli.inputs / "hostile.json"
    data.write_text(json.dumps(data_records))
    fragments = ("4 of 10 samples are invalid", "#1: 'id' must be a string, got list",
                 "'image-dict': 'image' must be a string or a list of strings, got dict")
    one_error(cli.eval(data), str(data), *fragments)
    one_error(cli.train(data, tmp_path / "run"), str(data), *fragments)
    one = cli.inputs / "one.json"  # records that load, then are refused by the collator: bounded, one line each
    for record in data_records[3:5] + data_records[7:8]:
        one.write_text(json.dumps([record]))
        one_error(cli.eval(one), repr(record["id"]), "at least", "(its text alone) > data.max_length 4096")
    one.write_text(json.dumps([data_records[6]]))
    line = one_error(cli.eval(one), "'iiiiiiiiii", "... (10000000 characters)", "'nowhere.png' not found")
    assert len(line) < 700


# ---- images over the pixel limit ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    images = tmp_path_factory.mktemp("bomb")
    png_bomb(images / "bomb.png")
    assert (images / "bomb.png").stat().st_size < 1 << 20
    return images


def test_a_decompression_bomb_is_rejected_from_its_header(cli, world, bomb, tmp_path, monkeypatch):
    from PIL import ImageFile

    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))
    data = cli.inputs / "bomb.json"
    data.write_text(json.dumps([sample("bomb", "bomb.png"), sample("text")]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cli.check(data, "--skip-bad", "--out", tmp_path / "scan", images=bomb, watch=(bomb,))
        one_error(cli.eval(data, images=bomb, watch=(bomb,)), "'bomb'", "'bomb.png' is too large: 12000 x 12000")
        one_error(cli.train(data, tmp_path / "run", images=bomb, watch=(bomb,)), "'bomb'", "too large")
    assert not [item for item in caught if "DecompressionBomb" in item.category.__name__]
    assert code == 0 and "DecompressionBomb" not in err
    line = json.loads((tmp_path / "scan" / REJECTED_FILE).read_text().splitlines()[0])
    assert line["reason"] == "image_too_large" and "12000 x 12000" in line["detail"] and "64,000,000" in line["detail"]
    assert (12_000, 12_000) not in decoded  # judged from the header: not one pixel decoded


def test_the_pixel_limit_is_a_parameter_recorded_in_the_manifest(world, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(world["model"])
    template = resolve_template(processor, "auto", "llava")
    image = min(os.listdir(world["image_folder"]))
    with Image.open(Path(world["image_folder"]) / image) as opened:
        width, height = opened.size
    for limit, reasons in ((width * height, []), (width * height - 1, ["image_too_large"])):
        report = check_records([sample("a", image)], world["image_folder"], processor, template, max_length=256,
                               progress=False, max_image_pixels=limit)
        assert [item["reason"] for item in report.rejected] == reasons
    assert f"{width} x {height} = {width * height:,} pixels, over the limit of {limit:,}" in report.rejected[0]["detail"]
    collator = ChatCollator(processor, template, image_folder=world["image_folder"], max_image_pixels=10)
    with pytest.raises(DataError, match=r"sample 'a': image .* is too large: \d+ x \d+ = .* over the limit of 10 "):
        collator([{"id": "a", "images": [image], "conversations": sample("a", image)["conversations"]}])
    report = prepare_dataset(world["data"], world["image_folder"], tmp_path / "out", processor, max_length=256,
                             num_proc=1, progress=False, max_image_pixels=123_456_789)
    assert report.manifest["max_image_pixels"] == 123_456_789
    assert json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["max_image_pixels"] == 123_456_789


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_limits_are_value_errors_naming_the_parameter(world, tmp_path, value):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(world["model"])
    template = resolve_template(processor, "auto", "llava")
    for name in ("max_length", "max_image_pixels"):
        with pytest.raises(ValueError, match=name):
            ChatCollator(processor, template, **{name: value})
        with pytest.raises(ValueError, match=name):
            Judge(world["image_folder"], processor, template, **{name: value})
        with pytest.raises(ValueError, match=name):
            check_records([], world["image_folder"], processor, template, progress=False, **{name: value})
        with pytest.raises(ValueError, match=name):
            prepare_dataset(world["data"], world["image_folder"], tmp_path / "out", processor, num_proc=1,
                            progress=False, **{name: value})
    assert not (tmp_path / "out").exists()


# ---- prepared folders that were changed ---------------------------------------------------------------------

def tamper(manifest: dict, name: str) -> None:
    if name == "counts":
        manifest["counts"]["ok"] += 1
    elif name == "counts-not-an-object":
        manifest["counts"] = [1, 2]
    elif name == "format":
        manifest["format"] = "visprune-data/9"
    elif name == "columns":
        manifest["columns"] = manifest["columns"][:-1]
    elif name == "lengths":
        manifest["lengths"]["max"] -= 1
    elif name == "num-shards":
        manifest["num_shards"] += 1


TAMPERED = {"counts": "counts do not add up", "counts-not-an-object": "counts must hold whole numbers",
            "format": "format 'visprune-data/9'", "columns": "but the manifest says ['id'",
            "lengths": "but the manifest says", "num-shards": "1 shards but the manifest says 2",
            "duplicate-key": "duplicate key 'format'", "nan": "NaN is not a JSON value", "not-an-object": "format 'list'",
            "shard-deleted": "cannot load the prepared dataset", "state-deleted": "cannot load the prepared dataset"}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_tampered_prepared_folder_is_refused(cli, world, tmp_path, name):
    folder = cli.inputs / "prepared"
    shutil.copytree(world["prepared"], folder)
    manifest_path = folder / MANIFEST_FILE
    text = manifest_path.read_text()
    if name == "duplicate-key":
        text = text.replace('"format"', '"format": "visprune-data/2", "format"', 1)
    elif name == "nan":
        text = text.replace('"seconds": ', '"seconds": NaN, "was": ', 1)
    elif name == "not-an-object":
        text = "[1, 2]"
    elif name == "shard-deleted":
        next(folder.glob("data-*.arrow")).unlink()
    elif name == "state-deleted":
        (folder / "state.json").unlink()
    else:
        manifest = json.loads(text)
        tamper(manifest, name)
        text = json.dumps(manifest)
    manifest_path.write_text(text)
    with pytest.raises(DataError, match=re.escape(TAMPERED[name])):
        build_dataset(folder)
    one_error(cli.train(folder, tmp_path / "run"), str(folder), TAMPERED[name])


# ---- --overwrite and --out never destroy a user's file -----------------------------------------------------

def test_overwrite_replaces_only_a_folder_of_prepared_files(cli, world, tmp_path):
    looks_prepared = cli.inputs / "looks-prepared"
    looks_prepared.mkdir()
    (looks_prepared / MANIFEST_FILE).write_text('{"format": "visprune-data/2"}')
    (looks_prepared / "thesis.tex").write_text("years of work")
    one_error(cli.prepare(world["data"], looks_prepared, "--overwrite"), str(looks_prepared), "thesis.tex")
    mixed = cli.inputs / "prepared-plus-notes"
    shutil.copytree(world["prepared"], mixed)
    (mixed / "notes").mkdir()
    one_error(cli.prepare(world["data"], mixed, "--overwrite"), str(mixed), "'notes'")
    mine = tmp_path / "mine"
    shutil.copytree(world["prepared"], mine)
    (mine / REJECTED_FILE).write_text("{}\n")
    code, _, _ = cli.prepare(world["data"], mine, "--overwrite")
    assert code == 0 and not (mine / REJECTED_FILE).exists()  # only prepared files: replaced


def test_the_output_folder_is_never_an_input_folder(cli, world, tmp_path):
    images = cli.inputs / "images"
    shutil.copytree(world["image_folder"], images)
    data = cli.inputs / "train.json"
    shutil.copy(world["data"], data)
    for out in (images, images / "prepared", cli.inputs, cli.inputs.parent):
        one_error(cli.prepare(data, out, "--overwrite", images=images), str(out), "choose an output folder outside")
    a_file = cli.inputs / "a-file"
    a_file.write_text("mine")
    one_error(cli.prepare(data, a_file / "out", images=images), str(a_file))


def test_check_never_overwrites_a_rejected_jsonl_it_did_not_write(cli, world, tmp_path):
    data = cli.inputs / "one-bad.json"
    data.write_text(json.dumps([sample("ok"), sample("missing", "nowhere.png")]))
    mine = cli.inputs / "scan"
    mine.mkdir()
    (mine / REJECTED_FILE).write_text("my own notes\n")
    one_error(cli.check(data, "--skip-bad", "--out", mine), str(mine / REJECTED_FILE), "not written by")
    one_error(cli.check(data, "--skip-bad", "--out", data), str(data), "not a folder")
    ours = tmp_path / "scan"
    for _ in range(2):  # the second run replaces what the first one wrote
        code, _, _ = cli.check(data, "--skip-bad", "--out", ours)
        assert code == 0 and rejections(ours / REJECTED_FILE) == {"'missing'": "image_missing"}
    assert sorted(os.listdir(ours)) == [REJECTED_FILE]


def test_max_length_below_one_is_refused(cli, world, tmp_path):
    for value in ("0", "-1"):
        one_error(cli.check(world["data"], "--max-length", value), "max")
        one_error(cli.prepare(world["data"], tmp_path / "out", "--max-length", value), "max")
    assert not (tmp_path / "out").exists()


# ---- video entries -----------------------------------------------------------------------------------------

def video_record(sample_id, video, question="<video>\nwhat happens?") -> dict:
    return {"id": sample_id, "video": video, "conversations": [turn("human", question), turn("gpt", "it moves")]}


def test_hostile_video_entries_are_named_rejections_and_one_line_errors(cli, world, tmp_path):
    """Broken, hostile and huge `video` entries through `data check`, `eval` and `train`: each a named rejection
    (or the one error line that names the sample), in bounded time, no input file changed. The toy processor is
    LLaVA's, which takes no videos: a well-formed video sample is `video_unsupported`."""
    image = min(os.listdir(world["image_folder"]))
    data_records = [
        video_record("good-shape", [[image, image]]),
        video_record("escape", "../outside.mp4"),
        video_record("absolute", [[image, "/etc/passwd"]]),
        video_record("no-frames", [[]]),
        video_record("huge", [[image] * 100_000]),
        video_record("dict", {"file": image}),
        video_record("count", [image, [image]]),
        video_record("answer", image, "what?"),
    ]
    expected = {"'good-shape'": "video_unsupported", "'escape'": "image_path", "'absolute'": "image_path",
                "'no-frames'": "malformed_record", "'huge'": "malformed_record", "'dict'": "malformed_record",
                "'count'": "placeholder_count", "'answer'": "placeholder_count"}
    data = cli.inputs / "videos.json"
    data.write_text(json.dumps(data_records))
    started = time.perf_counter()
    code, _out, err = cli.check(data, "--skip-bad", "--out", tmp_path / "scan")
    assert code == 0 and "Traceback" not in err and time.perf_counter() - started < 60
    assert rejections(tmp_path / "scan" / REJECTED_FILE) == expected
    assert max(map(len, (tmp_path / "scan" / REJECTED_FILE).read_text().splitlines())) < 1500
    fragments = ("7 of 8 samples are invalid", "'escape': video '../outside.mp4': '..' is not allowed",
                 "'absolute': video '/etc/passwd': absolute paths are not allowed")
    one_error(cli.eval(data), str(data), *fragments)
    one_error(cli.train(data, tmp_path / "run"), str(data), *fragments)
    one = cli.inputs / "one.json"
    one.write_text(json.dumps([data_records[0]]))
    one_error(cli.eval(one), "'good-shape' has 1 video(s) but the processor (LlavaProcessor) takes no videos")
