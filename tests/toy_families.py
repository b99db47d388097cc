"""A tiny local LLaVA-NeXT built like `visprune.data_prep.toy`'s LLaVA (the toy word-level tokenizer and
template, the real LlavaNextProcessor with a PIL image processor, a model from config classes, the toy
records), so tests run `visprune train` and `data prepare` through the real `from_pretrained` paths."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from visprune.data_prep.toy import IMAGE, LLAVA_CHAT_TEMPLATE, build_tokenizer, make_records, toy_words

logger = logging.getLogger(__name__)

NEXT_TILE, NEXT_PATCH = 8, 2  # 8 px tiles of 2 px patches: a 4 x 4 grid per tile
NEXT_PINPOINTS = [[8, 16], [16, 8], [16, 16]]


def build_llava_next(seed: int = 0):
    """(LlavaNextProcessor, tiny LlavaNextForConditionalGeneration): CLIP on 8 px tiles, anyres
    pinpoints 8x16 / 16x8 / 16x16, Llama LM (hidden 32, 3 layers), the toy tokenizer and template."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = build_tokenizer(toy_words())
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": NEXT_TILE},
                                                 crop_size={"height": NEXT_TILE, "width": NEXT_TILE},
                                                 image_grid_pinpoints=NEXT_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=NEXT_PATCH,
                                   vision_feature_select_strategy="default", image_token=IMAGE,
                                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(image_size=NEXT_TILE, patch_size=NEXT_PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                             image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-1,
                             vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return processor, model.eval()


def write_toy_llava_next(out_dir: str | Path, num_samples: int = 48, seed: int = 0) -> dict[str, str]:
    """`out_dir/model/` (tiny LLaVA-NeXT + processor) and `out_dir/data/` (the toy records; every
    second image is cropped to 24 x 12 px, so batches mix tile counts and aspect ratios).

    Returns:
        {"model": model folder, "data": JSON file, "image_folder": image folder} as strings.
    """
    out_dir = Path(out_dir)
    model_dir, image_dir = out_dir / "model", out_dir / "data" / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    processor, model = build_llava_next(seed)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    records, images = make_records(num_samples, seed, image_size=24)
    for idx, (file_name, image) in enumerate(sorted(images.items())):
        (image.crop((0, 0, 24, 12)) if idx % 2 else image).save(image_dir / file_name, format="PNG")
    data_path = out_dir / "data" / "train.json"
    data_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote a tiny LLaVA-NeXT to %s and %d samples to %s", model_dir, len(records), data_path)
    return {"model": str(model_dir), "data": str(data_path), "image_folder": str(image_dir)}
