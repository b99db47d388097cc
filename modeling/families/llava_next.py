"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, "anyres"): each image is the base image's grid
(image_size / patch_size, 24x24 at 336 px) followed by the high-resolution grid the model stitches
from its tiles and unpads to the image's aspect ratio, with a newline token after each of its rows.
The tiles are stitched into one spatial map before the language model sees them, so the
high-resolution grid is one grid (neighbours across a tile seam are neighbours in the image); the
newline tokens are no grid cells and count as text (never gated, plain causal attention)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..flops import MAX_IMAGE_SIDE, ImageGrids, require_processor, setting_int
from ..layout import VisualLayout, build_layout
from .base import MULTI_MODAL_PROJECTOR, LlamaStyleFamily, check_patch_features, layout_input_ids

# attribute paths this family relies on (tests/modeling/test_families.py checks them)
PATHS = ("model.language_model.layers", "model.vision_tower", MULTI_MODAL_PROJECTOR,
         "model.image_newline", "model.get_image_features", "config.image_token_id",
         "config.image_grid_pinpoints", "config.vision_config.image_size", "config.vision_config.patch_size")
Grid = tuple[int, int, bool]


class LlavaNextFamily(LlamaStyleFamily):
    """The image text is `<image>`, expanded by the processor to base + high-res grid + newlines."""

    name = "llava_next"
    class_name = "LlavaNextForConditionalGeneration"
    paths = PATHS

    def image_grid(self, config: Any) -> tuple[int, int]:
        """The base image's grid (the first grid of every image)."""
        check_patch_features("llava_next", config)
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side, side

    def image_extras(self, config: Any) -> tuple[tuple[tuple[int, int], ...], int]:
        """What the FLOPs model costs beyond the base grid for one reference image, the largest square
        grid pinpoint (672 x 672 px for LLaVA-v1.6: a 48 x 48 high-resolution grid): its grids and its
        newline tokens."""
        side = max(min(int(h), int(w)) for h, w in config.image_grid_pinpoints)
        rows, cols, _ = self.image_grids(config, (side, side))[1]
        return ((rows, cols),), rows

    def image_grids(self, config: Any, image_size: tuple[int, int]) -> list[Grid]:
        """The grids of one image of `image_size` (height, width) px, as `pack_image_features` lays
        out its features: base grid, then the stitched and unpadded high-resolution grid + newlines."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side = config.vision_config.image_size // config.vision_config.patch_size
        tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints,
                                                       config.vision_config.image_size)
        stitched = torch.empty(0, tiles_h * side, tiles_w * side)  # shape arithmetic only, no data
        rows, cols = unpad_image(stitched, list(image_size)).shape[1:]
        return [(side, side, False), (int(rows), int(cols), True)]

    def image_size_grids(self, image_size: tuple[int, int], processor: dict[str, Any] | None,
                         grid: tuple[int, int]) -> ImageGrids:
        """The grids of one image of `image_size` (height, width) px with the processor's
        `image_grid_pinpoints` and tile size (`crop_size`, else `size`): the base `grid`, then the
        tiles of the best pinpoint stitched into one grid and unpadded to the image's aspect ratio
        (`get_anyres_image_grid_shape`, `unpad_image`, as the model packs its features), with one
        newline token per row of it."""
        from transformers.image_processing_utils import select_best_resolution
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        settings = require_processor(self.name, processor)
        pinpoints = settings.get("image_grid_pinpoints", LLAVA_NEXT_DEFAULTS["image_grid_pinpoints"])
        if not isinstance(pinpoints, list) or not pinpoints or not all(
                isinstance(point, list) and len(point) == 2 for point in pinpoints):
            raise ValueError(f"processor setting image_grid_pinpoints must be a list of [height, width], "
                             f"got {pinpoints!r}")
        pinpoints = [[setting_int(side, "image_grid_pinpoints", high=MAX_IMAGE_SIDE) for side in point]
                     for point in pinpoints]
        tile = _tile_size(settings)
        best = select_best_resolution(list(image_size), pinpoints)
        if best is None:  # every pinpoint scales the image's shorter side to under 1 px
            raise ValueError(f"a {image_size[0]}x{image_size[1]} px image is too thin for LLaVA-NeXT's pinpoints")
        tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_size), pinpoints, tile)
        side = grid[0]
        stitched = torch.empty(0, tiles_h * side, tiles_w * side)  # shape arithmetic only, no data
        rows, cols = (int(n) for n in unpad_image(stitched, list(image_size)).shape[1:])
        if rows < 1 or cols < 1:
            raise ValueError(f"a {image_size[0]}x{image_size[1]} px image is too thin for LLaVA-NeXT: its "
                             f"high-resolution grid unpads to {rows}x{cols}")
        note = (f"pinpoint {best[0]}x{best[1]} px: {tiles_h}x{tiles_w} tiles of {tile} px stitched into "
                f"{tiles_h * side}x{tiles_w * side}, unpadded to {rows}x{cols}")
        return ImageGrids((tuple(grid), (rows, cols)), rows, note)

    def build_layout(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualLayout:
        """Layout of this forward's tokens: grids from `image_sizes` when this forward encodes images,
        or, when `generate()` has encoded them up front (`mm_encoder_outputs`, no `image_sizes`), from
        where the newline embedding sits in each image's packed features."""
        input_ids = layout_input_ids(kwargs)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        image_sizes = kwargs.get("image_sizes")
        if kwargs.get("pixel_values") is not None:
            if image_sizes is None:
                raise ValueError("llava_next family: pixel_values without image_sizes")
            grids = [g for size in image_sizes.tolist() for g in self.image_grids(model.config, size)]
        elif encoded is not None:
            grids = [g for features in encoded.pooler_output for g in self._grids_from_features(model, features)]
        else:
            grids = []
        return build_layout(input_ids, model.config.image_token_id, grids, kwargs.get("attention_mask"))

    def _grids_from_features(self, model: nn.Module, features: torch.Tensor) -> list[Grid]:
        """Grids of one image's packed features (N, d): base grid, then rows ending in the newline
        embedding (an exact copy of `image_newline`, so its positions give rows and cols)."""
        side, _ = self.image_grid(model.config)
        base = side * side
        newline = model.model.image_newline.to(features.device, features.dtype)
        ends = (features[base:] == newline).all(dim=-1).nonzero().flatten().tolist()
        high = features.shape[0] - base
        rows = len(ends)
        cols = high // rows - 1 if rows else -1
        if not rows or rows * (cols + 1) != high or ends != [(r + 1) * (cols + 1) - 1 for r in range(rows)]:
            raise ValueError(f"llava_next family: cannot recover the grids of an image of {features.shape[0]} "
                             f"features ({rows} newline embeddings found after the {side}x{side} base grid)")
        return [(side, side, False), (rows, cols, True)]

    def vision_inputs(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """One blank image of one tile's size (base + its tiles, as the processor would give it)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = model.config.vision_config.image_size
        num_patches = image_size_to_num_patches((size, size), model.config.image_grid_pinpoints, size)
        dtype = next(model.model.vision_tower.parameters()).dtype
        return {"pixel_values": torch.zeros(1, num_patches, 3, size, size, device=device, dtype=dtype),
                "image_sizes": torch.tensor([[size, size]], device=device)}


# LlavaNextImageProcessor's class defaults, what a preprocessor_config.json without these keys gets
LLAVA_NEXT_DEFAULTS = {"image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                       "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}


def _tile_size(settings: dict[str, Any]) -> int:
    """The processor's tile side in px: crop_size's height, else size's height or shortest edge."""
    crop = settings["crop_size"] if "crop_size" in settings else LLAVA_NEXT_DEFAULTS["crop_size"]
    size = settings["size"] if "size" in settings else LLAVA_NEXT_DEFAULTS["size"]
    for name, value, key in (("crop_size", crop, "height"), ("size", size, "height"), ("size", size, "shortest_edge")):
        if isinstance(value, dict) and value.get(key) is not None:
            return setting_int(value[key], f"{name}.{key}", high=MAX_IMAGE_SIDE)
    raise ValueError(f"processor settings give no tile size (crop_size.height or size.shortest_edge): "
                     f"crop_size {crop!r}, size {size!r}")
