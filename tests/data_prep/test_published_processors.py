"""The published processor fixtures and the tiny assets built from them: byte-identical published files, the
published special tokens and image settings, and tiny models whose forward accepts the processors' output."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image
from published import (
    FAMILIES,
    INTERNVL_EXTRA_TOKENS,
    PUBLISHED,
    VERBATIM_FILES,
    build_processor_folder,
    build_tiny_model,
    fixture_dir,
    id_to_content,
    published_added_tokens,
    published_json,
    published_tokenizer_config,
    write_published_assets,
)

NAMES = sorted(FAMILIES)
USER_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the square?"}]}]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Every fixture's processor folder, built once per session."""
    root = tmp_path_factory.mktemp("published")
    return {name: build_processor_folder(name, root / name) for name in NAMES}


@pytest.fixture(scope="session")
def tokenizers(built):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(str(folder)) for name, folder in built.items()}


def image(width: int, height: int) -> Image.Image:
    picture = Image.new("RGB", (width, height), (240, 240, 235))
    picture.paste((200, 30, 30), (width // 4, height // 4, width // 2, height // 2))
    return picture


# ---- fixtures and built folders --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_source_md_names_every_file(name):
    folder = fixture_dir(name)
    source = (folder / "SOURCE.md").read_text(encoding="utf-8")
    files = sorted(path.name for path in folder.iterdir() if path.name != "SOURCE.md")
    assert files, name
    for file_name in files:
        assert f"`{file_name}`" in source, f"{name}/SOURCE.md does not name {file_name}"
    json_files = [path for path in folder.iterdir() if path.suffix == ".json"]
    for path in json_files:
        json.loads(path.read_text(encoding="utf-8"))  # every fixture file is valid JSON


def test_published_mapping_covers_the_families():
    assert PUBLISHED == {"llava": "llava-1.5", "llava_next": "llava-next", "qwen2_vl": "qwen2-vl",
                         "internvl": "internvl3"}
    assert {FAMILIES[name].family for name in PUBLISHED.values()} == set(PUBLISHED)


@pytest.mark.parametrize("name", NAMES)
def test_built_folder_copies_published_files_byte_for_byte(name, built):
    copied = [file_name for file_name in VERBATIM_FILES if (fixture_dir(name) / file_name).is_file()]
    assert any(file_name.startswith("chat_template") for file_name in copied), name
    for file_name in copied:
        assert (built[name] / file_name).read_bytes() == (fixture_dir(name) / file_name).read_bytes(), file_name


@pytest.mark.parametrize("name", NAMES)
def test_generation_config_keeps_published_values_with_local_ids(name, built, tokenizers):
    published = published_json(name, "generation_config.json")
    local = json.loads((built[name] / "generation_config.json").read_text())
    contents = id_to_content(name)
    assert local.keys() == published.keys()
    for key, value in published.items():
        if key.endswith("token_id"):
            values, local_values = (value, local[key]) if isinstance(value, list) else ([value], [local[key]])
            assert tokenizers[name].convert_ids_to_tokens(local_values) == [contents[idx] for idx in values], key
        else:
            assert local[key] == value, key


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_carries_published_special_tokens(name, tokenizers):
    tokenizer = tokenizers[name]
    config = published_tokenizer_config(name)
    assert type(tokenizer).__name__ == config["tokenizer_class"]
    by_content = {str(token): token for token in tokenizer.added_tokens_decoder.values()}
    for _, entry in published_added_tokens(name):
        token = by_content[entry["content"]]
        for flag in ("lstrip", "normalized", "rstrip", "single_word", "special"):
            assert getattr(token, flag) == entry[flag], (entry["content"], flag)
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if role in config:
            assert getattr(tokenizer, role) == config[role], role
    assert len(tokenizer) < 2000  # a small local vocabulary: ids are local, contents are published


def test_llama_tokenizers_follow_published_flags(tokenizers):
    for name in ("llava-1.5", "llava-next"):
        tokenizer = tokenizers[name]
        ids = tokenizer("USER: what colour is the square?")["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # add_bos_token (post-processor)
        assert tokenizer.convert_ids_to_tokens(ids[1]) == "▁USER:"
        assert tokenizer.decode(ids, skip_special_tokens=True) == "USER: what colour is the square?"
        assert tokenizer.decode(tokenizer("Ü ok")["input_ids"], skip_special_tokens=True) == "Ü ok"  # byte fallback
    published = published_tokenizer_config("llava-1.5")
    tokenizer = tokenizers["llava-1.5"]
    assert tokenizer.padding_side == published["padding_side"] == "left"
    assert tokenizer.model_max_length == published["model_max_length"]
    assert tokenizer.image_token == "<image>"


@pytest.mark.parametrize("name", ["qwen2-vl", "internvl3"])
def test_qwen_tokenizers_are_byte_level_without_bos(name, tokenizers):
    tokenizer = tokenizers[name]
    assert tokenizer.bos_token is None and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("You are a helpful assistant.")["input_ids"]
    assert tokenizer.decode(ids) == "You are a helpful assistant."
    assert "<|im_start|>" not in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(tokenizer("naïve 猫")["input_ids"]) == "naïve 猫"  # every byte encodes
    if name == "qwen2-vl":
        assert tokenizer.padding_side == "left" and tokenizer.model_max_length == 32768


def test_local_tokenizer_is_deterministic(built, tmp_path):
    again = build_processor_folder("qwen2-vl", tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (built["qwen2-vl"] / "tokenizer.json").read_bytes()


def test_published_chat_templates_render(tokenizers):
    qwen = tokenizers["qwen2-vl"].apply_chat_template(USER_IMAGE, add_generation_prompt=True, tokenize=False)
    assert qwen == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>what colour is the square?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    plain = tokenizers["qwen2-vl"].apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    internvl = tokenizers["internvl3"].apply_chat_template(USER_IMAGE, add_generation_prompt=True, tokenize=False)
    assert internvl == "<|im_start|>user\n<IMG_CONTEXT>\nwhat colour is the square?<|im_end|>\n<|im_start|>assistant\n"


# ---- LLaVA-1.5 / LLaVA-NeXT: the real processors ----------------------------------------------------------------
def test_llava_processor_gives_576_image_tokens_and_runs(built):
    from transformers import AutoProcessor, LlavaProcessor

    processor = AutoProcessor.from_pretrained(str(built["llava-1.5"]))
    assert type(processor) is LlavaProcessor
    text = processor.apply_chat_template(USER_IMAGE, add_generation_prompt=True)
    assert text == "USER: <image>\nwhat colour is the square? ASSISTANT:"
    batch = processor(images=image(48, 40), text=text, return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 576  # (336 / 14) ** 2, CLS dropped
    model = build_tiny_model("llava-1.5", built["llava-1.5"])
    assert model.config.image_token_id == processor.image_token_id
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def anyres_token_count(height: int, width: int) -> int:
    """LLaVA-NeXT's image tokens for one image, from the published config: base grid, then the stitched tiles
    cropped back to the image's aspect ratio with one newline per row (transformers' anyres helpers)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    config = published_json("llava-next", "config.json")
    tile, patch = config["vision_config"]["image_size"], config["vision_config"]["patch_size"]
    side = tile // patch
    tiles_h, tiles_w = get_anyres_image_grid_shape([height, width], config["image_grid_pinpoints"], tile)
    rows, cols = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), [height, width]).shape[1:]
    return side * side + rows * (cols + 1)


def test_llava_next_processor_gives_anyres_count_and_runs(built):
    from transformers import AutoProcessor, LlavaNextProcessor

    config = published_json("llava-next", "config.json")
    # no processor_config.json was found for this checkpoint (SOURCE.md): these come from its config.json
    processor = AutoProcessor.from_pretrained(
        str(built["llava-next"]), patch_size=config["vision_config"]["patch_size"],
        vision_feature_select_strategy=config["vision_feature_select_strategy"], num_additional_image_tokens=1)
    assert type(processor) is LlavaNextProcessor
    assert processor.image_processor.image_grid_pinpoints == config["image_grid_pinpoints"]
    text = processor.apply_chat_template(USER_IMAGE, add_generation_prompt=True)
    batch = processor(images=image(60, 40), text=text, return_tensors="pt")
    assert batch["image_sizes"].tolist() == [[40, 60]]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == anyres_token_count(40, 60)
    model = build_tiny_model("llava-next", built["llava-next"])
    assert model.config.image_grid_pinpoints == config["image_grid_pinpoints"]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


# ---- Qwen2-VL / InternVL3: tokenizer + image processor, placeholders expanded by hand ------------------------------
def test_qwen2_vl_image_settings_and_forward(built, tokenizers):
    from transformers import AutoImageProcessor

    published = published_json("qwen2-vl", "preprocessor_config.json")
    processor = AutoImageProcessor.from_pretrained(str(built["qwen2-vl"]))
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (published["min_pixels"],
                                                                                 published["max_pixels"])
    assert (processor.merge_size, processor.patch_size, processor.temporal_patch_size) == (2, 14, 2)
    pixels = processor(images=image(84, 56), return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 6]]  # 56 x 84 px = 4 x 6 patches of 14 px
    grid_t, grid_h, grid_w = pixels["image_grid_thw"][0].tolist()
    tokenizer = tokenizers["qwen2-vl"]
    text = tokenizer.apply_chat_template(USER_IMAGE, add_generation_prompt=True, tokenize=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (grid_t * grid_h * grid_w // processor.merge_size ** 2))
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    model = build_tiny_model("qwen2-vl", built["qwen2-vl"])
    image_mask = input_ids == model.config.image_token_id
    assert int(image_mask.sum()) == 6
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       mm_token_type_ids=image_mask.long(), pixel_values=pixels["pixel_values"],
                       image_grid_thw=pixels["image_grid_thw"]).logits
    assert logits.shape[:2] == input_ids.shape and torch.isfinite(logits).all()


def test_internvl_image_settings_and_forward(built, tokenizers):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(built["internvl3"]))
    assert (processor.size.height, processor.size.width) == (448, 448)
    pixels = processor(images=image(896, 448), crop_to_patches=True, return_tensors="pt")
    num_tiles = pixels["pixel_values"].shape[0]
    assert num_tiles == 3 and tuple(pixels["pixel_values"].shape[1:]) == (3, 448, 448)  # 2 x 1 tiles + thumbnail
    image_seq_length = published_json("internvl3", "processor_config.json")["image_seq_length"]
    tokenizer = tokenizers["internvl3"]
    for attribute, content in INTERNVL_EXTRA_TOKENS.items():
        assert getattr(tokenizer, attribute) == content
    text = tokenizer.apply_chat_template(USER_IMAGE, add_generation_prompt=True, tokenize=False)
    expanded = "<img>" + "<IMG_CONTEXT>" * (image_seq_length * num_tiles) + "</img>"
    input_ids = tokenizer(re.sub(re.escape("<IMG_CONTEXT>"), expanded, text, count=1), return_tensors="pt")["input_ids"]
    model = build_tiny_model("internvl3", built["internvl3"])
    assert int((input_ids == model.config.image_token_id).sum()) == 256 * 3
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       pixel_values=pixels["pixel_values"]).logits
    assert logits.shape[:2] == input_ids.shape and torch.isfinite(logits).all()


# ---- assets --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_write_published_assets(name, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    paths = write_published_assets(name, tmp_path, num_samples=6, seed=3)
    model_dir = tmp_path / "model"
    assert paths == {"model": str(model_dir), "data": str(tmp_path / "data" / "train.json"),
                     "image_folder": str(tmp_path / "data" / "images")}
    for file_name in VERBATIM_FILES:
        if (fixture_dir(name) / file_name).is_file():
            assert (model_dir / file_name).read_bytes() == (fixture_dir(name) / file_name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    config = AutoConfig.from_pretrained(paths["model"])
    assert config.get_text_config().vocab_size == len(tokenizer)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation.keys() == published_json(name, "generation_config.json").keys()

    records = json.loads((tmp_path / "data" / "train.json").read_text())
    assert len(records) == 6
    roles = set()
    for record in records:
        images = record.get("image", [])
        images = images if isinstance(images, list) else [images]
        placeholders = sum(turn["value"].count("<image>") for turn in record["conversations"])
        assert placeholders == len(images), record["id"]
        for file_name in images:
            with Image.open(tmp_path / "data" / "images" / file_name) as picture:
                assert picture.size == FAMILIES[name].image_size
        roles.update(turn["from"] for turn in record["conversations"])
    assert roles == {"human", "gpt", "system"}
    assert any("image" not in record for record in records)  # text-only
    assert any(isinstance(record.get("image"), list) for record in records)  # several images
    assert any(len(record["conversations"]) > 2 for record in records)  # multi-turn
    assert any("<image>" not in record["conversations"][0]["value"] and "image" in record for record in records)
