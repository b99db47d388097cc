"""InternVL (`InternVLForConditionalGeneration`, the native transformers class of the "-hf" checkpoints):
each `pixel_values` entry is one tile (dynamic tiling + thumbnail are the processor's), and each tile
is its own grid of (image_size / patch_size * downsample_ratio)^2 visual tokens after the pixel
shuffle (16 x 16 at 448 px, patch 14, ratio 0.5), so the neighbour window never crosses tiles."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layout import VisualLayout, build_layout
from .base import (
    RotaryFn,
    TextDims,
    check_llama_family,
    check_patch_features,
    llama_text_dims,
    module_rotary_fn,
)

# attribute paths this family relies on (tests/modeling/test_families.py checks them)
PATHS = ("model.language_model.layers", "model.vision_tower", "model.multi_modal_projector",
         "model.get_image_features", "config.image_token_id", "config.downsample_ratio",
         "config.vision_config.image_size", "config.vision_config.patch_size")


class InternVLFamily:
    name = "internvl"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "InternVLForConditionalGeneration"

    def text_dims(self, config: Any) -> TextDims:
        return llama_text_dims(config.text_config)

    def image_grid(self, config: Any) -> tuple[int, int]:
        """One tile's grid: the patch grid shrunk by the pixel shuffle's downsample ratio."""
        check_patch_features("internvl", config)
        vision = config.vision_config
        sides = []
        for size, patch in zip(_pair(vision.image_size), _pair(vision.patch_size)):
            patches = size // patch
            side = patches * config.downsample_ratio
            if size % patch or side != int(side):
                raise ValueError(f"internvl family: {size} px / patch {patch} x ratio {config.downsample_ratio} "
                                 "is not a whole grid")
            sides.append(int(side))
        return sides[0], sides[1]

    def image_extras(self, config: Any) -> tuple[tuple[tuple[int, int], ...], int]:
        return (), 0  # one grid per image (or tile), no other image tokens

    def multimodal_core(self, model: nn.Module) -> nn.Module:
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        self.check(model)
        return model.model.language_model.layers

    def build_layout(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualLayout:
        """Layout of this forward's tokens from `input_ids` and the number of tiles (`pixel_values`
        rows, or precomputed `mm_encoder_outputs`): one grid per tile, in order."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("visprune needs input_ids (not inputs_embeds) to find the image tokens")
        pixel_values = kwargs.get("pixel_values")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if pixel_values is not None:
            num_tiles = pixel_values.shape[0]
        elif encoded is not None:
            num_tiles = len(encoded.pooler_output)
        else:
            num_tiles = 0
        grid = self.image_grid(model.config)
        return build_layout(input_ids, model.config.image_token_id, [grid] * num_tiles, kwargs.get("attention_mask"))

    def rotary_fn(self, layer: nn.Module) -> RotaryFn:
        return module_rotary_fn(layer)  # the text model's own (Qwen2 / Llama) rotate-half

    def vision_inputs(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """One blank tile."""
        height, width = _pair(model.config.vision_config.image_size)
        dtype = next(model.model.vision_tower.parameters()).dtype
        return {"pixel_values": torch.zeros(1, 3, height, width, device=device, dtype=dtype)}

    def image_text(self, processor: Any) -> str:
        return processor.image_token  # <IMG_CONTEXT>: the processor adds <img> ... </img> and one run per tile

    def check(self, model: nn.Module) -> None:
        check_llama_family(self.name, model, PATHS)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))
