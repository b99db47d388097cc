"""Tiny models of every non-LLaVA family built from their config classes (no downloads), and batches
with several images of mixed sizes per sample, text-only samples and padding on either side.

Each builder returns a `Tiny`: the model (eval, SDPA) and `batch(images, padding, seed)`, which
gives the model inputs and the per-image grids (rows, cols[, newline]) in batch order, the
independent description the reference and the tests compare against."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

VOCAB = 64
IMAGE_TOKEN_ID = 3
IMAGE_START, IMAGE_END = 5, 6  # vision start / end (Qwen2-VL), <img> / </img> (InternVL)


@dataclass
class Tiny:
    family: str
    model: Any
    batch: Callable[..., tuple[dict[str, torch.Tensor], list[tuple[int, ...]]]]
    num_layers: int = 3
    num_heads: int = 4
    image_sizes: tuple = ((2, 2),)  # image specs `batch` accepts, for training samples

    def samples(self, num: int, seed: int = 0, answer_len: int = 3) -> list[dict[str, torch.Tensor]]:
        """Training samples as a processor + collator would give them one by one: (T,) input_ids and
        labels (only the last `answer_len` tokens supervised) plus the family's image tensors; every
        third sample is text-only."""
        out = []
        for i in range(num):
            images = () if i % 3 == 2 else (self.image_sizes[i % len(self.image_sizes)],)
            batch, _ = self.batch(images=(images,), padding="right", seed=seed * 1000 + i)
            sample = {key: value[0] if key in ("input_ids", "mm_token_type_ids") else value
                      for key, value in batch.items() if key != "attention_mask"}
            labels = torch.full_like(sample["input_ids"], -100)
            labels[-answer_len:] = sample["input_ids"][-answer_len:]
            out.append({**sample, "labels": labels})
        return out


def pad_rows(rows: list[list[int]], padding: str, extra: dict[str, list[list[int]]] | None = None):
    """input_ids, attention_mask (and any per-token `extra` rows, padded with 0) as (B, T) tensors."""
    length = max(len(r) for r in rows)
    out = {"input_ids": torch.zeros(len(rows), length, dtype=torch.long),
           "attention_mask": torch.zeros(len(rows), length, dtype=torch.long)}
    for key in extra or {}:
        out[key] = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        span = slice(length - len(ids), length) if padding == "left" else slice(0, len(ids))
        out["input_ids"][b, span] = torch.tensor(ids)
        out["attention_mask"][b, span] = 1
        for key, values in (extra or {}).items():
            out[key][b, span] = torch.tensor(values[b])
    return out


def text_tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(8, VOCAB, (n,), generator=gen).tolist()


# ---- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------------------
def tiny_qwen2_vl(num_kv_heads: int = 2, seed: int = 0, variant: str = "qwen2_vl") -> Tiny:
    """Text: hidden 32, 4 heads (head_dim 8, M-RoPE sections [2, 1, 1]), 3 layers; vision: patch 2,
    2x2 merge, 1 block. An image of (rows, cols) visual tokens has (2 rows) x (2 cols) patches."""
    if variant == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig as TextConfig
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig as VisionConfig

        vision = VisionConfig(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                              spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig as TextConfig
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
            Qwen2_5_VLVisionConfig as VisionConfig,
        )

        vision = VisionConfig(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2,
                              patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                              window_size=8, fullatt_block_indexes=[0])
    text = TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = Config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, video_token_id=4,
                    vision_start_token_id=IMAGE_START, vision_end_token_id=IMAGE_END)
    torch.manual_seed(seed)
    model = Model._from_config(config, attn_implementation="sdpa").eval()

    def batch(images: Sequence[Sequence[tuple[int, int]]] = (((3, 4),), ((2, 2), (4, 4)), ()),
              padding: str = "left", seed: int = 1, text_len: int = 4):
        gen = torch.Generator().manual_seed(seed)
        rows, types, grids, thw = [], [], [], []
        for i, sample in enumerate(images):
            ids = [1] + text_tokens(gen, 2 + i)
            for r, c in sample:
                ids += [IMAGE_START] + [IMAGE_TOKEN_ID] * (r * c) + [IMAGE_END] + text_tokens(gen, 1)
                grids.append((r, c))
                thw.append([1, 2 * r, 2 * c])
            ids += text_tokens(gen, text_len)
            rows.append(ids)
            types.append([int(t == IMAGE_TOKEN_ID) for t in ids])
        out = pad_rows(rows, padding, {"mm_token_type_ids": types})
        if thw:
            grid_thw = torch.tensor(thw)
            out["image_grid_thw"] = grid_thw
            out["pixel_values"] = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 2 * 2, generator=gen)
        return out, grids

    return Tiny(variant, model, batch, image_sizes=((2, 2), (3, 4)))


# ---- InternVL --------------------------------------------------------------------------------------
def tiny_internvl(num_kv_heads: int = 2, seed: int = 0, vision_layers: int = 1) -> Tiny:
    """Text: Qwen2 (hidden 32, 4 heads, 3 layers); vision: 16 px tiles, patch 2 -> 8 x 8 patches ->
    pixel shuffle 0.5 -> a 4 x 4 grid (16 tokens) per tile. An image spec is its number of tiles."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(hidden_size=16, num_hidden_layers=vision_layers, num_attention_heads=2,
                                  intermediate_size=32, image_size=16, patch_size=2)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                            image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    def batch(images: Sequence[Sequence[int]] = ((2,), (1, 3), ()), padding: str = "left", seed: int = 1,
              text_len: int = 4):
        gen = torch.Generator().manual_seed(seed)
        rows, grids, tiles = [], [], 0
        for i, sample in enumerate(images):
            ids = [1] + text_tokens(gen, 2 + i)
            for num_tiles in sample:
                ids += [IMAGE_START] + [IMAGE_TOKEN_ID] * (16 * num_tiles) + [IMAGE_END] + text_tokens(gen, 1)
                grids += [(4, 4)] * num_tiles
                tiles += num_tiles
            ids += text_tokens(gen, text_len)
            rows.append(ids)
        out = pad_rows(rows, padding)
        if tiles:
            out["pixel_values"] = torch.randn(tiles, 3, 16, 16, generator=gen)
        return out, grids

    return Tiny("internvl", model, batch, image_sizes=(1, 2))


# ---- LLaVA-NeXT -----------------------------------------------------------------------------------
NEXT_TILE, NEXT_PATCH = 8, 2  # 8 px tiles of 2 px patches: a 4 x 4 grid per tile
NEXT_PINPOINTS = [[8, 16], [16, 8], [16, 16]]


def next_grids(height: int, width: int) -> tuple[int, list[tuple[int, ...]]]:
    """(tiles incl. the base image, grids) of an image, from transformers' anyres helpers: the base
    grid, then the stitched tiles' grid cropped to the image's aspect ratio with a newline per row."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    side = NEXT_TILE // NEXT_PATCH
    tiles_h, tiles_w = get_anyres_image_grid_shape([height, width], NEXT_PINPOINTS, NEXT_TILE)
    rows, cols = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), [height, width]).shape[1:]
    return image_size_to_num_patches([height, width], NEXT_PINPOINTS, NEXT_TILE), [(side, side), (rows, cols, True)]


def tiny_llava_next(num_kv_heads: int = 2, seed: int = 0, vision_layers: int = 1) -> Tiny:
    """Text: Llama (hidden 32, 4 heads, 3 layers); vision: CLIP on 8 px tiles of 2 px patches; anyres
    pinpoints 8x16, 16x8, 16x16. An image spec is its (height, width) in px."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(image_size=NEXT_TILE, patch_size=NEXT_PATCH, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=vision_layers, num_attention_heads=2, projection_dim=16)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                             image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-1,
                             vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    def batch(images: Sequence[Sequence[tuple[int, int]]] = (((8, 16),), ((6, 14), (16, 9)), ()),
              padding: str = "left", seed: int = 1, text_len: int = 4):
        gen = torch.Generator().manual_seed(seed)
        rows, grids, tiles, sizes = [], [], [], []
        for i, sample in enumerate(images):
            ids = [1] + text_tokens(gen, 2 + i)
            for height, width in sample:
                num_tiles, image_grids = next_grids(height, width)
                count = sum(g[0] * (g[1] + (len(g) > 2)) for g in image_grids)
                ids += [IMAGE_TOKEN_ID] * count + text_tokens(gen, 1)
                grids += image_grids
                tiles.append(num_tiles)
                sizes.append([height, width])
            ids += text_tokens(gen, text_len)
            rows.append(ids)
        out = pad_rows(rows, padding)
        if tiles:
            out["pixel_values"] = torch.randn(len(tiles), max(tiles), 3, NEXT_TILE, NEXT_TILE, generator=gen)
            out["image_sizes"] = torch.tensor(sizes)
        return out, grids

    return Tiny("llava_next", model, batch, image_sizes=((8, 16), (6, 14)))


TINY_FAMILIES: dict[str, Callable[..., Tiny]] = {
    "llava_next": tiny_llava_next,
    "internvl": tiny_internvl,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": lambda **kw: tiny_qwen2_vl(variant="qwen2_5_vl", **kw),
}
