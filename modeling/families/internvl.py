"""InternVL (`InternVLForConditionalGeneration`, the native transformers class of the "-hf" checkpoints):
each `pixel_values` entry is one tile (dynamic tiling + thumbnail are the processor's), and each tile
is its own grid of (image_size / patch_size * downsample_ratio)^2 visual tokens after the pixel
shuffle (16 x 16 at 448 px, patch 14, ratio 0.5), so the neighbour window never crosses tiles."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..flops import MAX_TILES, ImageGrids, require_processor, setting_dict, setting_int
from ..layout import VisualLayout, build_layout
from .base import MULTI_MODAL_PROJECTOR, LlamaStyleFamily, check_patch_features, count_encoded_images, layout_input_ids

# attribute paths this family relies on (tests/modeling/test_families.py checks them)
PATHS = ("model.language_model.layers", "model.vision_tower", MULTI_MODAL_PROJECTOR,
         "model.get_image_features", "config.image_token_id", "config.downsample_ratio",
         "config.vision_config.image_size", "config.vision_config.patch_size")


class InternVLFamily(LlamaStyleFamily):
    """The image text is `<IMG_CONTEXT>`: the processor adds `<img>` ... `</img>` and one run per tile; the
    text model (Qwen2 / Llama) applies its own rotate-half rotary."""

    name = "internvl"
    class_name = "InternVLForConditionalGeneration"
    paths = PATHS

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

    def image_size_grids(self, image_size: tuple[int, int], processor: dict[str, Any] | None,
                         grid: tuple[int, int]) -> ImageGrids:
        """The tiles of one image of `image_size` (height, width) px as `InternVLProcessor` lays it out
        through the GotOcr2 image processor's `crop_image_to_patches`: the columns x rows of `size` px
        tiles (min_patches to max_patches of them) closest to the image's aspect ratio, plus a
        thumbnail when that is more than one tile; each tile is one `grid` of visual tokens.

        InternVLProcessor always calls its image processor with crop_to_patches=True (its
        `images_kwargs`), which overrides the preprocessor_config.json value (false in the published
        -hf checkpoints); with max_patches 1 an image is one tile."""
        settings = require_processor(self.name, processor)
        size = setting_dict(settings.get("size") or GOT_OCR2_DEFAULTS["size"], "size")
        tile = (setting_int(size.get("height"), "size.height"), setting_int(size.get("width"), "size.width"))
        min_patches = setting_int(settings.get("min_patches", GOT_OCR2_DEFAULTS["min_patches"]), "min_patches",
                                  high=MAX_TILES)
        max_patches = setting_int(settings.get("max_patches", GOT_OCR2_DEFAULTS["max_patches"]), "max_patches",
                                  high=MAX_TILES - 1)
        limits = f"min_patches {min_patches}, max_patches {max_patches}"
        if not (PROCESSOR_CROP_TO_PATCHES and max_patches > 1):
            return ImageGrids((tuple(grid),), 0, f"one {tile[0]}x{tile[1]} px tile ({limits})")
        columns, rows = optimal_tiled_canvas(image_size, tile, min_patches, max_patches)
        if columns * rows == 1:
            return ImageGrids((tuple(grid),), 0, f"one {tile[0]}x{tile[1]} px tile ({limits})")
        note = (f"{rows} rows x {columns} columns of {tile[0]}x{tile[1]} px tiles + 1 thumbnail "
                f"({limits}; InternVL's processor always tiles)")
        return ImageGrids((tuple(grid),) * (columns * rows + 1), 0, note)

    def tile_grids(self, num_tiles: int, grid: tuple[int, int]) -> ImageGrids:
        """One image of `num_tiles` tiles as given (a thumbnail, if wanted, is one of them)."""
        return ImageGrids((tuple(grid),) * num_tiles, 0, f"{num_tiles} tiles as given (a thumbnail counts as a tile)")

    def build_layout(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualLayout:
        """Layout of this forward's tokens from `input_ids` and the number of tiles it encodes (`pixel_values`
        rows, or precomputed `mm_encoder_outputs`): one grid per tile, in order."""
        input_ids = layout_input_ids(kwargs)
        grids = [self.image_grid(model.config)] * count_encoded_images(kwargs)
        return build_layout(input_ids, model.config.image_token_id, grids, kwargs.get("attention_mask"))

    def vision_inputs(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """One blank tile."""
        height, width = _pair(model.config.vision_config.image_size)
        dtype = next(model.model.vision_tower.parameters()).dtype
        return {"pixel_values": torch.zeros(1, 3, height, width, device=device, dtype=dtype)}


# InternVLProcessor's images_kwargs: it tiles whatever its image processor's own crop_to_patches says
PROCESSOR_CROP_TO_PATCHES = True
# GotOcr2ImageProcessor's class defaults, what a preprocessor_config.json without these keys gets
GOT_OCR2_DEFAULTS = {"size": {"height": 384, "width": 384}, "min_patches": 1, "max_patches": 12}


def optimal_tiled_canvas(image_size: tuple[int, int], tile: tuple[int, int], min_patches: int,
                         max_patches: int) -> tuple[int, int]:
    """(columns, rows) of tiles the GotOcr2 image processor cuts an image of `image_size` (height,
    width) px into (transformers' `get_optimal_tiled_canvas`, InternVL's `dynamic_preprocess`): of the
    arrangements with min_patches to max_patches tiles, in order of tile count, the one closest to the
    image's aspect ratio; a tie goes to the later one while the image covers over half its area."""
    arrangements = [(columns, rows) for columns in range(1, max_patches + 1)
                    for rows in range(1, max_patches // columns + 1) if columns * rows >= min_patches]
    arrangements.sort(key=lambda arrangement: arrangement[0] * arrangement[1])  # stable, as transformers'
    height, width = image_size
    aspect_ratio, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in arrangements:
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * columns * rows:
            best = (columns, rows)
    return best


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))
