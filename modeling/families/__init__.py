"""Model families by short registry name (the transformers `model_type`); `family_for(model)` picks
the one that matches."""

from __future__ import annotations

from torch import nn

from .base import (
    Family,
    LayerSlot,
    TextDims,
    VisualAttentionWrapper,
    VisualMLPWrapper,
    forward_inputs,
    suppress_in_generation,
)
from .internvl import InternVLFamily
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily
from .qwen2_vl import Qwen2VLFamily

FAMILIES: dict[str, Family] = {
    "llava": LlavaFamily(),
    "qwen2_vl": Qwen2VLFamily("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": Qwen2VLFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "internvl": InternVLFamily(),
    "llava_next": LlavaNextFamily(),
}


def family_for(model: nn.Module) -> Family:
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    raise ValueError(f"no visprune family supports {type(model).__name__}; supported: {sorted(FAMILIES)}")


__all__ = ["FAMILIES", "Family", "LayerSlot", "TextDims", "VisualAttentionWrapper", "VisualMLPWrapper", "family_for",
           "forward_inputs", "suppress_in_generation"]
