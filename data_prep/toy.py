"""Tiny local LLaVA-1.5 assets (tokenizer, processor, model, shapes-on-a-grid data) built from configs, so
tests and `make toy` go through the real `from_pretrained` paths without downloads. This is only enough
data to exercise the pipeline; the see-task (`seetask.py`) is the experiment's data."""

from __future__ import annotations

import argparse
import json
import logging
import random
import string
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# The PIL backend of CLIPImageProcessor: same preprocessing, no torchvision dependency (visprune does not
# require torchvision); it saves as "CLIPImageProcessor", so AutoProcessor loads it with either backend.
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4 in this order
TEMPLATE_WORDS = ("USER", "ASSISTANT")

# LLaVA-1.5 ("v1" conversation, sep2 = "</s>"): `<s>[system ]USER: q ASSISTANT: a</s>USER: ...`.
# Message content is a string; `<image>` placeholders stay inside the user text. The answer and its
# end-of-turn token sit in a {% generation %} block so `return_assistant_tokens_mask` works as well.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 210, 30), "purple": (140, 50, 170), "orange": (240, 130, 20)}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cells of a 2 x 2 grid, row-major
TEXT_ONLY_QA = (
    ("what colour is grass?", "green"),
    ("what colour is the sky?", "blue"),
    ("how many corners does a square have?", "four"),
    ("how many corners does a triangle have?", "three"),
    ("what is the opposite of top?", "bottom"),
    ("what is the opposite of left?", "right"),
    ("what colour do red and yellow make?", "orange"),
    ("what colour do red and blue make?", "purple"),
)


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` plus the template words, ASCII punctuation and the special
    tokens `<pad> <s> </s> <unk> <image>` (ids 0-4), with the LLaVA-1.5 chat template.

    Text is split on whitespace and every punctuation character is its own token; unknown words map to
    `<unk>`. Like Llama's tokenizer it prepends `<s>` when `add_special_tokens=True`.
    """
    entries = list(dict.fromkeys([*TEMPLATE_WORDS, *string.punctuation, *words]))
    for word in entries:
        if not word or any(ch.isspace() for ch in word) or word in SPECIAL_TOKENS:
            raise ValueError(f"build_tokenizer: {word!r} is not a plain word (empty, whitespace or special)")
    vocab = {token: idx for idx, token in enumerate([*SPECIAL_TOKENS, *entries])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ?"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, chat_template=LLAVA_CHAT_TEMPLATE,
        padding_side="right")


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 24, patch_size: int = 6) -> LlavaProcessor:
    """A LlavaProcessor whose CLIP image processor resizes and centre-crops to `image_size`; one `<image>`
    in the text becomes (image_size // patch_size) ** 2 image tokens (CLS added, then dropped by "default")."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE, chat_template=LLAVA_CHAT_TEMPLATE)


def build_tiny_llava(tokenizer: PreTrainedTokenizerFast, image_size: int = 24, patch_size: int = 6, hidden: int = 32,
                     layers: int = 3, heads: int = 4, kv_heads: int = 4, seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA (CLIP tower: hidden 32, 2 layers; Llama LM) sized to `tokenizer`.

    Initialisation is seeded in a forked RNG, so the caller's global torch RNG is left untouched.
    """
    grid = image_size // patch_size
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=grid * grid,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.eval()


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]):
    """Draw a filled `shape` inside `box` = (left, top, right, bottom), inclusive pixel coordinates."""
    left, top, right, bottom = box
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, list[tuple[str, str, str]]]:
    """One or two shapes of distinct colours in distinct cells of a 2 x 2 grid on a light background.

    Returns the image and its objects as (shape, colour, position) triples.
    """
    num_objects = rng.choice((1, 2))
    shapes = rng.sample(SHAPES, num_objects)
    colours = rng.sample(sorted(COLOURS), num_objects)
    cells = rng.sample(range(len(POSITIONS)), num_objects)
    image = Image.new("RGB", (image_size, image_size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    cell = image_size // 2
    margin = max(1, cell // 6)
    objects = []
    for shape, colour, cell_idx in zip(shapes, colours, cells):
        row, col = divmod(cell_idx, 2)
        box = (col * cell + margin, row * cell + margin, (col + 1) * cell - 1 - margin, (row + 1) * cell - 1 - margin)
        draw_shape(draw, shape, box, COLOURS[colour])
        objects.append((shape, colour, POSITIONS[cell_idx]))
    return image, objects


def ask_about(obj: tuple[str, str, str], kind: str) -> tuple[str, str]:
    """A (question, answer) pair about one object: its colour, its shape or its position."""
    shape, colour, position = obj
    if kind == "colour":
        return f"what colour is the {shape}?", colour
    if kind == "shape":
        return f"what shape is at the {position}?", shape
    return f"where is the {shape}?", position


def make_records(num_samples: int, seed: int, image_size: int) -> tuple[list[dict], dict[str, Image.Image]]:
    """LLaVA-format records and their images (by file name); about 10% text-only, ~30% two-turn."""
    rng = random.Random(seed)
    text_only = set(rng.sample(range(num_samples), round(num_samples * 0.1)))
    records, images = [], {}
    for idx in range(num_samples):
        sample_id = f"toy-{idx}"
        if idx in text_only:
            question, answer = rng.choice(TEXT_ONLY_QA)
            records.append({"id": sample_id, "conversations": [{"from": "human", "value": question},
                                                               {"from": "gpt", "value": answer}]})
            continue
        image, objects = make_scene(rng, image_size)
        kinds = rng.sample(("colour", "shape", "where"), 2 if rng.random() < 0.3 else 1)
        conversations = []
        for turn, kind in enumerate(kinds):
            question, answer = ask_about(rng.choice(objects), kind)
            if turn == 0:  # LLaVA puts the image first; some datasets put it after the question
                question = f"{question}\n{IMAGE}" if rng.random() < 0.25 else f"{IMAGE}\n{question}"
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        file_name = f"{sample_id}.png"
        images[file_name] = image
        records.append({"id": sample_id, "image": file_name, "conversations": conversations})
    return records, images


def toy_words() -> list[str]:
    """Every word the toy data can use (sorted), for `build_tokenizer`."""
    texts = [*COLOURS, *SHAPES, *POSITIONS, *(q + " " + a for q, a in TEXT_ONLY_QA)]
    for shape in SHAPES:
        for position in POSITIONS:
            texts += [ask_about((shape, "red", position), kind)[0]
                      for kind in ("colour", "shape", "where")]
    return words_in(texts)


def words_in(texts: Iterable[str]) -> list[str]:
    """The distinct words of `texts` (punctuation removed), sorted: a vocabulary for `build_tokenizer`."""
    words = set()
    for text in texts:
        for char in string.punctuation:
            text = text.replace(char, " ")
        words.update(text.split())
    return sorted(words)


def write_toy_inputs(out_dir: str | Path, num_samples: int = 256, seed: int = 0, image_size: int = 24) -> dict[str, str]:
    """Write `out_dir/model/` (tiny LLaVA + processor + tokenizer), `out_dir/data/images/*.png` and
    `out_dir/data/train.json`; fully deterministic for a given seed.

    Returns:
        {"model": model folder, "data": JSON file, "image_folder": image folder} as strings.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    out_dir = Path(out_dir)
    model_dir, data_dir = out_dir / "model", out_dir / "data"
    image_dir = data_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(toy_words())
    processor = build_processor(tokenizer, image_size=image_size)
    model = build_tiny_llava(tokenizer, image_size=image_size, seed=seed)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    records, images = make_records(num_samples, seed, image_size)
    for file_name, image in images.items():
        image.save(image_dir / file_name, format="PNG")
    data_path = data_dir / "train.json"
    data_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote %d samples (%d images) to %s and a tiny LLaVA to %s",
                len(records), len(images), data_dir, model_dir)
    return {"model": str(model_dir), "data": str(data_path), "image_folder": str(image_dir)}


def main(argv: list[str] | None = None) -> dict[str, str]:
    """`python -m visprune.data_prep.toy --out DIR`: write the toy model and data set."""
    parser = argparse.ArgumentParser(prog="python -m visprune.data_prep.toy",
                                     description="Write a tiny LLaVA-1.5 model and a toy data set.")
    parser.add_argument("--out", required=True, help="output folder (model/ and data/ are created inside)")
    parser.add_argument("--num-samples", type=int, default=256, help="number of samples (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the model weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = write_toy_inputs(args.out, num_samples=args.num_samples, seed=args.seed)
    logger.info("paths: %s", json.dumps(paths))
    return paths


if __name__ == "__main__":
    main()
