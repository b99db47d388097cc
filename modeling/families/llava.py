"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one patch grid per image, image_size / patch_size per
side (24x24 for 336 px / patch 14); the rest is the Llama-style default."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..flops import ImageGrids
from ..layout import VisualLayout, build_layout
from .base import MULTI_MODAL_PROJECTOR, LlamaStyleFamily, check_patch_features, count_encoded_images, layout_input_ids

# attribute paths this family relies on (tests/modeling/test_families.py checks them)
PATHS = ("model.language_model.layers", "model.vision_tower", MULTI_MODAL_PROJECTOR,
         "model.get_image_features", "config.image_token_id")


class LlavaFamily(LlamaStyleFamily):
    name = "llava"
    class_name = "LlavaForConditionalGeneration"
    paths = PATHS

    def image_grid(self, config: Any) -> tuple[int, int]:
        check_patch_features("llava", config)
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def image_size_grids(self, image_size: tuple[int, int], processor: dict[str, Any] | None,
                         grid: tuple[int, int]) -> ImageGrids:
        """`grid`, whatever the size: the processor resizes and centre-crops every image to the vision
        tower's input size (336 px for LLaVA-1.5), so the image size does not change the cost."""
        return ImageGrids((tuple(grid),), 0, "fixed grid: the processor resizes and centre-crops every image "
                                            "to the vision tower's input size, whatever its size")

    def build_layout(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualLayout:
        """Layout of this forward's tokens from `input_ids` and the number of images it encodes."""
        input_ids = layout_input_ids(kwargs)
        grids = [self.image_grid(model.config)] * count_encoded_images(kwargs)
        return build_layout(input_ids, model.config.image_token_id, grids, kwargs.get("attention_mask"))

    def vision_inputs(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """One blank image at the tower's input size."""
        size = model.config.vision_config.image_size
        dtype = next(model.model.vision_tower.parameters()).dtype
        return {"pixel_values": torch.zeros(1, 3, size, size, device=device, dtype=dtype)}
