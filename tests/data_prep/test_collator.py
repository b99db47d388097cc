"""data_prep/records.py and collator.py: LLaVA JSON validation, the collator's label mask, padding,
image-path safety and over-long handling, on the toy tokenizer/processor and a toy model saved and
loaded with from_pretrained."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.records import IGNORE_INDEX, DataError, build_dataset
from visprune.data_prep.templates import resolve_template
from visprune.data_prep.toy import main, write_toy_inputs

TOKENS_PER_IMAGE = 16  # toy processor: 24 px images, 6 px patches


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("red.png", "red"), ("green.png", "green"), ("blue.png", "blue")):
        Image.new("RGB", (24, 24), colour).save(folder / name)
    return folder


def human(value: str) -> dict:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


def row(sample_id: str, images: list[str], *turns: dict) -> dict:
    return {"id": sample_id, "images": images, "conversations": list(turns)}


def write_records(tmp_path, records: list[dict]) -> str:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def collator_for(processor, folder, max_length: int = 256, drop_overlong: bool = False) -> ChatCollator:
    return ChatCollator(processor, resolve_template(processor, "auto", "llava"), image_folder=folder,
                        max_length=max_length, drop_overlong=drop_overlong)


def test_golden_label_mask_two_turns(tmp_path, processor, image_folder):
    records = [{"id": "golden", "image": "red.png", "conversations": [
        human("<image>\nwhat colour is the square?"), gpt("red"), human("where is the square?"), gpt("top left")]}]
    dataset = build_dataset(write_records(tmp_path, records))
    assert dataset[0]["images"] == ["red.png"]
    collator = collator_for(processor, image_folder)
    assert collator.template.name == "processor"  # the toy template closes answers with </s>

    messages = [{"role": r, "content": c} for r, c in
                (("user", "<image>\nwhat colour is the square?"), ("assistant", "red"),
                 ("user", "where is the square?"), ("assistant", "top left"))]
    text, _ = collator.render("golden", messages)
    assert text == ("<s>USER: <image>\nwhat colour is the square? ASSISTANT: red</s>"
                    "USER: where is the square? ASSISTANT: top left</s>")
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>USER: <image>\nwhat colour is the square? ASSISTANT:"

    batch = collator([dataset[0]])
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    supervised = processor.tokenizer.convert_ids_to_tokens(input_ids[labels != IGNORE_INDEX].tolist())
    assert supervised == ["red", "</s>", "top", "left", "</s>"]
    assert torch.equal(labels[labels != IGNORE_INDEX], input_ids[labels != IGNORE_INDEX])
    image_mask = input_ids == processor.image_token_id
    assert int(image_mask.sum()) == TOKENS_PER_IMAGE
    assert (labels[image_mask] == IGNORE_INDEX).all()
    assert input_ids[0].item() == processor.tokenizer.bos_token_id  # exactly one <s>, from the template
    assert int((input_ids == processor.tokenizer.bos_token_id).sum()) == 1
    assert batch["pixel_values"].shape == (1, 3, 24, 24)


def test_mixed_batch_pixel_values_and_right_padding(processor, image_folder):
    rows = [
        row("one-image", ["green.png"], human("<image>\nwhat colour is the circle?"), gpt("green")),
        row("text-only", [], human("what colour is grass?"), gpt("green")),
        row("two-images", ["blue.png", "red.png"], human("<image>\n<image>\nwhat colour is the square?"),
            gpt("blue")),
    ]
    collator = collator_for(processor, image_folder)
    batch = collator(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long

    # one pixel_values entry per image, in sample order
    expected = processor.image_processor([Image.open(image_folder / name) for name in
                                          ("green.png", "blue.png", "red.png")], return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"].float(), atol=0, rtol=0)

    image_counts = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert image_counts == [TOKENS_PER_IMAGE, 0, 2 * TOKENS_PER_IMAGE]
    for b, sample in enumerate(rows):
        alone = collator([sample])
        length = alone["input_ids"].shape[1]
        assert int(batch["attention_mask"][b].sum()) == length
        assert torch.equal(batch["input_ids"][b, :length], alone["input_ids"][0])
        assert torch.equal(batch["labels"][b, :length], alone["labels"][0])
        assert (batch["input_ids"][b, length:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][b, length:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][b, length:] == 0).all()
    assert batch["input_ids"].shape[1] == max(int(m.sum()) for m in batch["attention_mask"])

    text_only = collator([rows[1]])
    assert "pixel_values" not in text_only


def test_build_dataset_lists_every_bad_id(tmp_path):
    records = [
        {"id": "good", "image": "red.png", "conversations": [human("<image>\nwhat?"), gpt("red")]},
        {"id": "mismatch", "image": "red.png", "conversations": [human("what?"), gpt("red")]},
        {"id": "two-placeholders", "image": ["red.png"], "conversations": [human("<image><image>"), gpt("red")]},
        {"id": "bad-role", "conversations": [human("what?"), {"from": "robot", "value": "red"}]},
        {"id": "empty", "conversations": []},
        {"id": "no-answer", "conversations": [human("what?")]},
        {"conversations": [human("what?"), gpt("red")]},
        {"id": "no-conversations"},
        {"id": "escape", "image": "../red.png", "conversations": [human("<image>"), gpt("red")]},
        {"id": "absolute", "image": "/etc/passwd", "conversations": [human("<image>"), gpt("red")]},
    ]
    with pytest.raises(DataError) as excinfo:
        build_dataset(write_records(tmp_path, records))
    message = str(excinfo.value)
    assert "9 of 10 samples are invalid" in message
    assert "'good'" not in message
    for fragment in ("'mismatch': 0 <image> placeholders but 1 images",
                     "'two-placeholders': 2 <image> placeholders but 1 images",
                     "'bad-role': conversations[1]: unknown role 'robot'",
                     "'empty': empty conversation",
                     "'no-answer': no 'gpt' turn",
                     "#6: missing 'id'",
                     "'no-conversations': missing 'conversations'",
                     "'escape': image '../red.png': '..' is not allowed",
                     "'absolute': image '/etc/passwd': absolute paths are not allowed"):
        assert fragment in message


def test_build_dataset_columns(tmp_path):
    records = [{"id": 7, "image": "a.png", "conversations": [{"from": "system", "value": "be brief"},
                                                             human("<image>\nwhat?"), gpt("red")]},
               {"id": "t", "conversations": [human("hi"), gpt("hello")]}]
    dataset = build_dataset(write_records(tmp_path, records))
    assert dataset.column_names == ["id", "images", "conversations", "videos"] and dataset[0]["videos"] == []
    assert dataset[0]["id"] == "7" and dataset[0]["images"] == ["a.png"]
    assert dataset[1]["images"] == []
    assert dataset[0]["conversations"][0] == {"from": "system", "value": "be brief"}


def test_collator_rejects_invalid_rows(processor, image_folder):
    collator = collator_for(processor, image_folder)
    with pytest.raises(DataError, match=r"sample 'mismatch': 1 <image> placeholders but 0 images"):
        collator([row("mismatch", [], human("<image>\nwhat?"), gpt("red"))])
    with pytest.raises(DataError, match=r"sample 'bad-role': .*unknown role 'bot'"):
        collator([row("bad-role", [], human("what?"), {"from": "bot", "value": "red"})])


def test_overlong_is_an_error_naming_the_sample(processor, image_folder):
    long_row = row("long", ["red.png"], human("<image>\nwhat colour is the square?"), gpt("red"))
    collator = collator_for(processor, image_folder, max_length=20)
    with pytest.raises(DataError, match=r"sample 'long': 29 tokens .* > data.max_length 20"):
        collator([long_row])


def test_overlong_dropped_and_counted(processor, image_folder, caplog):
    long_row = row("long", ["red.png"], human("<image>\nwhat colour is the square?"), gpt("red"))
    short_row = row("short", [], human("what colour is grass?"), gpt("green"))
    collator = collator_for(processor, image_folder, max_length=20, drop_overlong=True)
    with caplog.at_level(logging.WARNING, logger="visprune.data_prep.collator"):
        batch = collator([long_row, short_row])
    assert collator.num_dropped == 1
    assert "dropping over-long sample 'long'" in caplog.text
    assert batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch
    assert torch.equal(batch["input_ids"], collator([short_row])["input_ids"])
    with pytest.raises(DataError, match=r"every sample of the batch is over-long.*'long'"):
        collator([long_row, long_row])
    assert collator.num_dropped == 3


def test_image_paths_must_stay_inside_the_folder(tmp_path, processor, image_folder):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (24, 24), "red").save(outside)
    (image_folder / "escape-link.png").symlink_to(outside)
    (image_folder / "inside-link.png").symlink_to(image_folder / "red.png")
    collator = collator_for(processor, image_folder)

    def sample(sample_id: str, image: str) -> dict:
        return row(sample_id, [image], human("<image>\nwhat colour is the square?"), gpt("red"))

    ok = collator([sample("inside", "inside-link.png")])  # a symlink that stays inside is fine
    assert ok["pixel_values"].shape == (1, 3, 24, 24)
    with pytest.raises(DataError, match=r"sample 'dotdot': image '\.\./outside\.png': '\.\.' is not allowed"):
        collator([sample("dotdot", "../outside.png")])
    with pytest.raises(DataError, match=r"sample 'absolute': .*absolute paths are not allowed"):
        collator([sample("absolute", str(outside))])
    with pytest.raises(DataError, match=r"sample 'symlink': image 'escape-link\.png' resolves outside"):
        collator([sample("symlink", "escape-link.png")])


def test_missing_and_corrupt_images(processor, image_folder):
    (image_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    collator = collator_for(processor, image_folder)
    with pytest.raises(DataError, match=r"sample 'missing': image 'nope\.png' not found"):
        collator([row("missing", ["nope.png"], human("<image>\nwhat?"), gpt("red"))])
    with pytest.raises(DataError, match=r"sample 'corrupt': cannot decode image 'corrupt\.png'"):
        collator([row("corrupt", ["corrupt.png"], human("<image>\nwhat?"), gpt("red"))])


def test_toy_inputs_load_and_train(tmp_path):
    paths = main(["--out", str(tmp_path / "toy"), "--num-samples", "20", "--seed", "1"])
    model = LlavaForConditionalGeneration.from_pretrained(paths["model"])
    processor = AutoProcessor.from_pretrained(paths["model"])
    assert model.config.image_token_id == processor.image_token_id
    assert model.config.image_seq_length == TOKENS_PER_IMAGE

    dataset = build_dataset(paths["data"])
    assert len(dataset) == 20
    text_only = [r for r in dataset if not r["images"]]
    with_image = [r for r in dataset if r["images"]]
    assert len(text_only) == 2 and any(len(r["conversations"]) == 4 for r in with_image)
    rows = with_image[:3] + text_only[:1]
    batch = collator_for(processor, paths["image_folder"], max_length=128)(rows)
    assert batch["pixel_values"].shape == (3, 3, 24, 24)
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) >= 2).all()  # every sample has a supervised answer
    with torch.no_grad():
        loss = model(**batch).loss
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_toy_inputs_are_deterministic(tmp_path):
    first = write_toy_inputs(tmp_path / "a", num_samples=12, seed=5)
    again = write_toy_inputs(tmp_path / "b", num_samples=12, seed=5)
    other = write_toy_inputs(tmp_path / "c", num_samples=12, seed=6)
    read = Path.read_text
    assert read(Path(first["data"])) == read(Path(again["data"])) != read(Path(other["data"]))
    records = json.loads(Path(first["data"]).read_text())
    images = [record["image"] for record in records if "image" in record]
    assert images
    for image in images:
        assert (Path(first["image_folder"]) / image).read_bytes() == (Path(again["image_folder"]) / image).read_bytes()
