"""`visprune data prepare`: the prepared folder holds what the collator computes (token ids, label masks,
lengths with image tokens counted) in input order, identical for 1 and 2 worker processes; bad samples
fail the conversion (or go to rejected.jsonl with --skip-bad); incomplete or foreign folders are refused;
a batch collated from prepared rows equals the batch from raw rows (LLaVA and LLaVA-NeXT)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from PIL import Image
from test_check import FAULTS, sample
from visprune.data_prep.check import REJECTED_FILE, check_records
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.prepare import prepare_dataset
from visprune.data_prep.prepared import MANIFEST_FILE, check_prepared_matches, prepared_lengths
from visprune.data_prep.records import (
    IGNORE_INDEX,
    DataError,
    build_dataset,
    iter_records,
    normalize_record,
    read_records,
)
from visprune.data_prep.templates import resolve_template
from visprune.data_prep.toy import write_toy_inputs
from visprune.trainer.cli import main

COLUMNS = ["id", "images", "conversations", "videos", "input_ids", "labels", "length"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy model + 40 samples, prepared once with 1 worker (processor object) and once with 2
    (processor folder, as the CLI does; 4-row shards)."""
    root = tmp_path_factory.mktemp("prepare")
    paths = write_toy_inputs(root / "toy", num_samples=40, seed=3)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(paths["model"])
    one = prepare_dataset(paths["data"], paths["image_folder"], root / "one", processor, max_length=128,
                          num_proc=1, progress=False)
    two = prepare_dataset(paths["data"], paths["image_folder"], root / "two", paths["model"], max_length=128,
                          num_proc=2, progress=False, shard_size=4, chunk_size=3)
    return {**paths, "root": root, "processor": processor, "one": one, "two": two}


def raw_rows(data_path):
    return [normalize_record(record, index)[1] for index, record in enumerate(read_records(Path(data_path)))]


def collator_for(toy, **kwargs):
    return ChatCollator(toy["processor"], resolve_template(toy["processor"], "auto", "llava"),
                        image_folder=toy["image_folder"], max_length=128, **kwargs)


def test_prepared_rows_are_the_collators_encodings_in_order(toy):
    dataset = load_from_disk(str(toy["root"] / "one"))
    assert dataset.column_names == COLUMNS
    rows = raw_rows(toy["data"])
    assert dataset["id"] == [row["id"] for row in rows]  # input order
    collator = collator_for(toy)
    for prepared, row in zip(dataset, rows):
        encoded = collator.encode(row)
        assert prepared["images"] == row["images"] and prepared["conversations"] == row["conversations"]
        assert prepared["length"] == len(prepared["input_ids"]) == encoded["input_ids"].numel()
        assert prepared["input_ids"] == encoded["input_ids"].tolist()
        assert prepared["labels"] == encoded["labels"].tolist()
        assert any(label != IGNORE_INDEX for label in prepared["labels"])
    image_tokens = sum(prepared["input_ids"].count(toy["processor"].image_token_id) for prepared in dataset)
    assert image_tokens == 16 * sum(len(row["images"]) for row in rows)  # lengths count the image tokens


def test_two_workers_write_the_same_rows_and_manifest(toy):
    one, two = load_from_disk(str(toy["root"] / "one")), load_from_disk(str(toy["root"] / "two"))
    assert one.to_dict() == two.to_dict()
    assert len(list((toy["root"] / "two").glob("data-*.arrow"))) == 10  # 40 rows in 4-row shards
    m1, m2 = toy["one"].manifest, toy["two"].manifest
    assert m1["format"] == "visprune-data/2" and m1["processor"]["fingerprint"] == m2["processor"]["fingerprint"]
    for key in ("source", "image_folder", "max_length", "counts", "lengths", "columns"):
        assert m1[key] == m2[key], key
    data = Path(toy["data"]).read_bytes()
    assert m1["source"] == {"path": os.path.realpath(toy["data"]), "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}
    assert m1["counts"] == {"samples": 40, "ok": 40, "rejected": 0, "with_images": 36, "text_only": 4,
                            "image_refs": 36, "rejected_by_reason": {}}
    assert m1["lengths"]["max"] == max(one["length"]) and m1["lengths"]["tokens"] == sum(one["length"])
    assert m1["family"] is None and m2["family"] == "llava"  # a folder names its model_type
    assert m1["image_folder"] == os.path.realpath(toy["image_folder"])
    assert not list(toy["root"].glob("*.tmp-*"))  # nothing left behind


def test_collated_prepared_rows_equal_raw_rows(toy):
    dataset = build_dataset(toy["root"] / "two")
    assert dataset.column_names == COLUMNS
    rows = raw_rows(toy["data"])
    collator = collator_for(toy)
    picks = [0, 1, 2, 3, 5, 8]
    assert {bool(rows[i]["images"]) for i in picks} == {True, False}
    prepared_batch = collator([dataset[i] for i in picks])
    raw_batch = collator([rows[i] for i in picks])
    assert set(prepared_batch) == set(raw_batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    for key in raw_batch:
        assert torch.equal(prepared_batch[key], raw_batch[key]), key


def test_prepared_llava_next_rows_collate_like_raw_rows(tmp_path):
    """LLaVA-NeXT: anyres tile stacks and image_sizes from the images-only processor call equal encode()'s."""
    from toy_families import build_llava_next, write_toy_llava_next

    paths = write_toy_llava_next(tmp_path / "next", num_samples=10)
    processor, _ = build_llava_next()
    report = prepare_dataset(paths["data"], paths["image_folder"], tmp_path / "prepared", processor, max_length=512,
                             num_proc=1, progress=False)
    assert report.manifest["counts"]["ok"] == 10 and report.manifest["family"] is None
    dataset = build_dataset(tmp_path / "prepared")
    collator = ChatCollator(processor, resolve_template(processor), image_folder=paths["image_folder"], max_length=512)
    rows = raw_rows(paths["data"])
    prepared_batch, raw_batch = collator(list(dataset)), collator(rows)
    assert set(prepared_batch) == set(raw_batch) and "image_sizes" in raw_batch
    for key in raw_batch:
        assert torch.equal(prepared_batch[key], raw_batch[key]), key


def test_changed_images_are_an_error_not_a_silent_reencode(tmp_path):
    from toy_families import build_llava_next, write_toy_llava_next

    paths = write_toy_llava_next(tmp_path / "next", num_samples=4)
    processor, _ = build_llava_next()
    prepare_dataset(paths["data"], paths["image_folder"], tmp_path / "prepared", processor, max_length=512,
                    num_proc=1, progress=False)
    row = next(r for r in build_dataset(tmp_path / "prepared") if r["images"])
    Image.new("RGB", (48, 8), "red").save(os.path.join(paths["image_folder"], row["images"][0]))  # other tiles
    collator = ChatCollator(processor, resolve_template(processor), image_folder=paths["image_folder"], max_length=512)
    with pytest.raises(DataError, match=rf"sample '{row['id']}': its images now take \d+ image tokens but the "
                                        r"prepared dataset has \d+"):
        collator([row])


@pytest.fixture
def faulty(folder, tmp_path):
    """test_check's fault cases plus two good samples, as a JSON file."""
    records = [sample("ok-image", "red.png")] + [record for record, _ in FAULTS] + [sample("ok-text")]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_samples_fail_listing_every_id(processor, folder, faulty, tmp_path):
    report = prepare_dataset(faulty, folder, tmp_path / "out", processor, max_length=128, num_proc=1, progress=False)
    assert report.out_dir is None and not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert {item["id"]: item["reason"] for item in report.check.rejected} == {
        repr(record["id"]): reason for record, reason in FAULTS}
    assert [item["index"] for item in report.check.rejected] == list(range(1, len(FAULTS) + 1))


def test_skip_bad_writes_rejected_jsonl_and_converts_the_rest(processor, folder, faulty, tmp_path):
    report = prepare_dataset(faulty, folder, tmp_path / "out", processor, max_length=128, num_proc=1, progress=False,
                             skip_bad=True)
    dataset = build_dataset(tmp_path / "out")
    assert dataset["id"] == ["ok-image", "ok-text"]
    lines = [json.loads(line) for line in (tmp_path / "out" / REJECTED_FILE).read_text().splitlines()]
    assert [line["reason"] for line in lines[:-1]] == [reason for _, reason in FAULTS]
    assert lines[-1]["num_samples"] == len(FAULTS) + 2 and lines[-1]["num_ok"] == 2
    counts = report.manifest["counts"]
    assert counts["rejected"] == len(FAULTS) and counts["rejected_by_reason"]["image_path"] == 2
    assert counts["with_images"] == 1 and counts["text_only"] == 1


def test_incomplete_or_foreign_folders_are_refused(toy, tmp_path):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(toy["root"] / "one", copy_dir)
    (copy_dir / MANIFEST_FILE).unlink()  # what an interrupted conversion looks like
    with pytest.raises(DataError, match=r"no visprune_data.json: .*incomplete"):
        build_dataset(copy_dir)
    (copy_dir / MANIFEST_FILE).write_text(json.dumps({"format": "visprune-data/0"}))
    with pytest.raises(DataError, match=r"format 'visprune-data/0', this visprune reads 'visprune-data/2'"):
        build_dataset(copy_dir)

    processor = toy["processor"]
    with pytest.raises(DataError, match=r"exists and is not empty"):
        prepare_dataset(toy["data"], toy["image_folder"], toy["root"] / "one", processor, num_proc=1, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"not a prepared dataset .*refusing to replace it"):
        prepare_dataset(toy["data"], toy["image_folder"], foreign, processor, num_proc=1, progress=False,
                        overwrite=True)
    with pytest.raises(DataError, match=r"image folder .*nowhere is not a folder"):
        prepare_dataset(toy["data"], tmp_path / "nowhere", tmp_path / "out", processor, num_proc=1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    again = prepare_dataset(toy["data"], toy["image_folder"], empty, processor, max_length=128, num_proc=1,
                            progress=False)
    assert again.out_dir == empty and (empty / MANIFEST_FILE).is_file()
    before = (empty / MANIFEST_FILE).read_text()
    prepare_dataset(toy["data"], toy["image_folder"], empty, processor, max_length=64, num_proc=1,
                    progress=False, overwrite=True)  # a prepared folder is replaced with --overwrite
    assert json.loads((empty / MANIFEST_FILE).read_text())["max_length"] == 64 != json.loads(before)["max_length"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "empty", "foreign"]


def test_check_prepared_matches_names_the_mismatch(toy):
    prepared = toy["root"] / "one"
    processor = toy["processor"]
    template = resolve_template(processor, "auto", "llava")
    manifest = check_prepared_matches(prepared, processor, template, 128, toy["image_folder"])
    assert manifest["counts"]["ok"] == 40
    assert manifest["template"]["name"] == "processor" and manifest["processor"]["template"] == "processor"
    other = copy.deepcopy(processor)
    other.chat_template = other.chat_template.replace("ASSISTANT", "BOT")
    with pytest.raises(DataError, match=r"another processor or chat template \(chat template differ"):
        check_prepared_matches(prepared, other, resolve_template(other, "auto", "llava"), 128, toy["image_folder"])
    with pytest.raises(DataError, match=r"chat template name, chat template differ.*'processor', this run has "
                                        r"LlavaProcessor and 'llava_v1'"):  # same processor, another data.template
        check_prepared_matches(prepared, processor, resolve_template(processor, "llava_v1", "llava"), 128,
                               toy["image_folder"])
    longest = manifest["lengths"]["max"]
    with pytest.raises(DataError, match=rf"longest sample has {longest} tokens .* > data.max_length {longest - 1}"):
        check_prepared_matches(prepared, processor, template, longest - 1, toy["image_folder"])
    check_prepared_matches(prepared, processor, template, longest - 1, toy["image_folder"], drop_overlong=True)
    with pytest.raises(DataError, match=r"images were checked in .* but data.image_folder is"):
        check_prepared_matches(prepared, processor, template, 128, toy["root"])


def test_cli_exit_codes(processor, folder, faulty, tmp_path, capsys):
    processor.save_pretrained(tmp_path / "processor")
    base = ["data", "prepare", "--images", str(folder), "--processor", str(tmp_path / "processor"),
            "--max-length", "128", "--num-proc", "1"]
    assert main(base + ["--json", str(faulty), "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "'missing': image_missing" in err and "'fifo': image_not_a_file" in err and "nothing written" in err
    assert main(base + ["--json", str(faulty), "--out", str(tmp_path / "good"), "--skip-bad"]) == 0
    assert "2 samples (1 with images, 1 text-only)" in capsys.readouterr().out
    assert (tmp_path / "good" / REJECTED_FILE).is_file()
    assert main(base + ["--json", str(faulty), "--out", str(tmp_path / "good"), "--skip-bad"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": []}, {"id": ')
    assert main(base + ["--json", str(broken), "--out", str(tmp_path / "x")]) == 2
    assert "broken.json is not valid JSON: record #1" in capsys.readouterr().err
    assert main(base + ["--json", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    assert main(["data", "prepare", "--json", str(faulty), "--images", str(tmp_path / "nowhere"), "--processor",
                 str(tmp_path / "processor"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("indent", [None, 2])
def test_streamed_records_equal_json_load(tmp_path, indent):
    records = [{"id": i, "text": "é" * i + '"]},[', "n": [i, 1.5, None, True]} for i in range(50)] + [7, "x", []]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    for chunk in (1, 5, 64, 1 << 20):
        digest = hashlib.sha256()
        assert [record for record, _ in iter_records(path, digest, chunk_bytes=chunk)] == records
        assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    lines = tmp_path / "records.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert [record for record, _ in iter_records(lines)] == records
    for text, message in (("", "the file is empty"), ("{}", "expected a JSON list of samples, got an object"),
                          ("[1 2]", "expected ',' or ']' after record #0"), ("[1]]", "extra data"),
                          ("[1, {", "record #1")):
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            list(iter_records(path, chunk_bytes=2))


def test_a_template_error_rejects_only_its_sample(processor, folder):
    strict = copy.deepcopy(processor)  # like templates that refuse a system turn
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
                            + processor.chat_template)
    template = resolve_template(strict, "processor", "llava")
    system = {"id": "system", "conversations": [{"from": "system", "value": "be brief"},
                                                {"from": "human", "value": "what colour?"}, {"from": "gpt", "value": "red"}]}
    report = check_records([sample("a", "red.png"), system, sample("b")], folder, strict, template, progress=False)
    assert report.num_ok == 2
    assert [(item["id"], item["reason"]) for item in report.rejected] == [("'system'", "encoding")]
    assert "the chat template rejected it: no system turns" in report.rejected[0]["detail"]


def test_lengths_for_the_length_grouped_sampler(toy):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    dataset = build_dataset(toy["root"] / "one")
    lengths = prepared_lengths(dataset)
    assert isinstance(lengths, list) and lengths == [len(ids) for ids in dataset["input_ids"]]
    assert sorted(LengthGroupedSampler(4, lengths=lengths)) == list(range(len(dataset)))
    assert prepared_lengths(build_dataset(toy["data"])) is None  # raw rows have none
