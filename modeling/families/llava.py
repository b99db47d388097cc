"""LLaVA-1.5 (`LlavaForConditionalGeneration`): where the language model, its layers and the image
grid are, and how image tokens map to the 24x24 (for 336 px / patch 14) patch grid."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layout import VisualLayout, build_layout
from .base import TextDims


class LlavaFamily:
    name = "llava"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaForConditionalGeneration"

    def text_dims(self, config: Any) -> TextDims:
        text = config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return TextDims(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                        num_heads=text.num_attention_heads,
                        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                        head_dim=head_dim, intermediate_size=text.intermediate_size)

    def image_grid(self, config: Any) -> tuple[int, int]:
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(f"llava family: vision_feature_select_strategy={strategy!r} keeps the CLS token, "
                             "which is not on the patch grid; only 'default' is supported")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def multimodal_core(self, model: nn.Module) -> nn.Module:
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
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
