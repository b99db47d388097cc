"""LLaVA-1.5 (`LlavaForConditionalGeneration`): where the language model, its layers and the image
grid are, and how image tokens map to the 24x24 (for 336 px / patch 14) patch grid."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..flops import ImageGrids
from ..layout import VisualLayout, build_layout
from .base import (
    MULTI_MODAL_PROJECTOR,
    LlamaStyleFamily,
    RotaryFn,
    TextDims,
    check_llama_family,
    check_patch_features,
    llama_text_dims,
    module_rotary_fn,
)

# attribute paths this family relies on (tests/modeling/test_families.py checks them)
PATHS = ("model.language_model.layers", "model.vision_tower", MULTI_MODAL_PROJECTOR,
         "model.get_image_features", "config.image_token_id")


class LlavaFamily(LlamaStyleFamily):
    name = "llava"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaForConditionalGeneration"

    def text_dims(self, config: Any) -> TextDims:
        return llama_text_dims(config.text_config)

    def image_grid(self, config: Any) -> tuple[int, int]:
        check_patch_features("llava", config)
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def image_extras(self, config: Any) -> tuple[tuple[tuple[int, int], ...], int]:
        return (), 0  # one grid per image (or tile), no other image tokens

    def image_size_grids(self, image_size: tuple[int, int], processor: dict[str, Any] | None,
                         grid: tuple[int, int]) -> ImageGrids:
        """`grid`, whatever the size: the processor resizes and centre-crops every image to the vision
        tower's input size (336 px for LLaVA-1.5), so the image size does not change the cost."""
        return ImageGrids((tuple(grid),), 0, "fixed grid: the processor resizes and centre-crops every image "
                                            "to the vision tower's input size, whatever its size")

    def multimodal_core(self, model: nn.Module) -> nn.Module:
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        self.check(model)
        return model.model.language_model.layers

    def build_layout(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualLayout:
        """Layout of this forward's tokens from `input_ids` and the number of images in `pixel_values`."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("visprune needs input_ids (not inputs_embeds) to find the image tokens")
        pixel_values = kwargs.get("pixel_values")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if pixel_values is not None:
            num_images = pixel_values.shape[0]
        elif encoded is not None:
            num_images = len(encoded.pooler_output)
        else:
            num_images = 0
        grid = self.image_grid(model.config)
        return build_layout(input_ids, model.config.image_token_id, [grid] * num_images,
                            kwargs.get("attention_mask"))

    def rotary_fn(self, layer: nn.Module) -> RotaryFn:
        return module_rotary_fn(layer)

    def vision_inputs(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """One blank image at the tower's input size."""
        size = model.config.vision_config.image_size
        dtype = next(model.model.vision_tower.parameters()).dtype
        return {"pixel_values": torch.zeros(1, 3, size, size, device=device, dtype=dtype)}

    def image_text(self, processor: Any) -> str:
        return processor.image_token  # "<image>", expanded by the processor

    def check(self, model: nn.Module) -> None:
        check_llama_family(self.name, model, PATHS)

