"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`):
the image grids come from `image_grid_thw` (patches) divided by the vision tower's spatial merge
size; rotary handling is M-RoPE, whose sections transformers 5.x recomposes in the text rotary
embedding, so decoder layers receive ordinary (B, T, D) cos/sin tables. A video (`pixel_values_videos` with
`video_grid_thw`) is laid out as one grid per temporal slice; a spatio-temporal window (`[t, h, w]`) also reaches
the slices of the same video t//2 on either side."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..flops import ImageGrids, require_processor, setting_dict, setting_int
from ..layout import VisualLayout, build_layout, merge_layouts
from .base import LlamaStyleFamily, RotaryFn, TextDims, layout_input_ids, llama_text_dims, module_rotary_fn

# The FLOPs model costs one image of 16 x 16 visual tokens (the real grid depends on the image: the
# processor's min/max pixels decide): 448 x 448 px for Qwen2-VL's 14 px patches and 2 x 2 merge. Fixed in
# tokens, not pixels, so that tiny test configs get the same layout as the real model.
REFERENCE_GRID = (16, 16)
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
MERGER = "model.visual.merger"  # the projector: the vision tower's last module (patch merger + MLP)

# attribute paths this family relies on (tests/modeling/test_families.py checks them)
PATHS = ("model.language_model.layers", "model.language_model.rotary_emb.recomposition_frequencies",
         "model.visual", MERGER, "model.get_image_features", "config.image_token_id", "config.video_token_id",
         "config.vision_config.spatial_merge_size", "config.vision_config.patch_size",
         "config.vision_config.temporal_patch_size", "config.vision_config.in_channels")


class Qwen2VLFamily(LlamaStyleFamily):
    """One instance per model class: `qwen2_vl` and `qwen2_5_vl` differ only in the class name."""

    paths = PATHS

    def __init__(self, name: str, class_name: str) -> None:
        self.name = name
        self.class_name = class_name

    def text_dims(self, config: Any) -> TextDims:
        text = config.text_config
        # Qwen2VLAttention uses hidden_size // num_heads whatever config.head_dim says
        return llama_text_dims(text, head_dim=text.hidden_size // text.num_attention_heads)

    def image_grid(self, config: Any) -> tuple[int, int]:
        return REFERENCE_GRID

    def image_size_grids(self, image_size: tuple[int, int], processor: dict[str, Any] | None,
                         grid: tuple[int, int]) -> ImageGrids:
        """The grid of one image of `image_size` (height, width) px as `Qwen2VLImageProcessor` lays it
        out: `smart_resize` to multiples of patch_size * merge_size within [min_pixels, max_pixels]
        (`min_pixels` / `max_pixels` override `size`'s shortest / longest edge, as its __init__ does),
        then (height, width) / patch_size patches merged merge_size x merge_size into visual tokens."""
        settings = require_processor(self.name, processor)
        patch = setting_int(settings.get("patch_size", QWEN_PROCESSOR_DEFAULTS["patch_size"]), "patch_size")
        merge = setting_int(settings.get("merge_size", QWEN_PROCESSOR_DEFAULTS["merge_size"]), "merge_size")
        size = setting_dict(settings.get("size") or QWEN_PROCESSOR_DEFAULTS["size"], "size")
        min_pixels, max_pixels = (
            setting_int(settings[key] if settings.get(key) is not None else size.get(edge), key)
            for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")))
        height, width = smart_resize(*image_size, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
        rows, cols = height // patch // merge, width // patch // merge
        note = (f"smart_resize to {height}x{width} px (min_pixels {min_pixels}, max_pixels {max_pixels}), "
                f"{height // patch}x{width // patch} patches of {patch} px merged {merge}x{merge}")
        return ImageGrids(((rows, cols),), 0, note)

    def video_grids(self, frames: int, frame_size: tuple[int, int] | None, processor: dict[str, Any] | None,
                    grid: tuple[int, int]) -> ImageGrids:
        """One video as `Qwen2VLVideoProcessor` lays it out: every `temporal_patch_size` frames (the processor's,
        default 2; a last partial group padded) are one temporal slice; each slice is the frame's grid: `grid`
        without a frame size, else `smart_resize` within the video processor's pixel bounds (transformers'
        defaults, VIDEO_PIXELS) and patches merged as for an image."""
        settings = processor or {}
        temporal = setting_int(settings.get("temporal_patch_size", 2), "temporal_patch_size")
        slices = -(-frames // temporal)
        note = f"{frames} frames in groups of temporal_patch_size {temporal}: {slices} temporal slices"
        if frame_size is not None:
            patch = setting_int(settings.get("patch_size", QWEN_PROCESSOR_DEFAULTS["patch_size"]), "patch_size")
            merge = setting_int(settings.get("merge_size", QWEN_PROCESSOR_DEFAULTS["merge_size"]), "merge_size")
            low, high = VIDEO_PIXELS
            height, width = smart_resize(*frame_size, factor=patch * merge, min_pixels=low, max_pixels=high)
            grid = (height // patch // merge, width // patch // merge)
            note += (f"; each frame smart_resize to {height}x{width} px (video pixel bounds {low}-{high}), "
                     f"patches of {patch} px merged {merge}x{merge}")
        return ImageGrids(tuple(tuple(grid) for _ in range(slices)), 0, note, slices=tuple(range(slices)))

    def image_grids(self, config: Any, image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
        """(rows, cols) of visual tokens of each image: its (t, h, w) patch grid over the merge size."""
        merge = config.vision_config.spatial_merge_size
        grids = []
        for t, h, w in image_grid_thw.tolist():
            if t != 1 or h % merge or w % merge:
                raise ValueError(f"{self.name} family: image_grid_thw row {(t, h, w)} is not an image grid "
                                 f"(t must be 1 and h, w multiples of the merge size {merge})")
            grids.append((h // merge, w // merge))
        return grids

    def video_slices(self, config: Any, video_grid_thw: torch.Tensor) -> tuple[list[tuple[int, int]], list[int]]:
        """(rows, cols) of every temporal slice of every video, and each slice's index in its video: a (t, h, w)
        patch grid is t slices of (h, w) over the merge size, in the order the vision tower emits them (slice by
        slice, rows, columns)."""
        merge = config.vision_config.spatial_merge_size
        grids, slices = [], []
        for t, h, w in video_grid_thw.tolist():
            if t < 1 or h % merge or w % merge:
                raise ValueError(f"{self.name} family: video_grid_thw row {(t, h, w)} is not a video grid "
                                 f"(t at least 1 and h, w multiples of the merge size {merge})")
            grids.extend([(h // merge, w // merge)] * t)
            slices.extend(range(t))
        return grids, slices

    def build_layout(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualLayout:
        """Layout of this forward's tokens: image tokens from `input_ids`, each image's grid from
        `image_grid_thw` or, when `generate()` has encoded the images up front (it passes
        `mm_encoder_outputs` and drops `image_grid_thw`), from the M-RoPE positions of its tokens; video
        tokens, one grid per temporal slice, from `video_grid_thw`."""
        input_ids = layout_input_ids(kwargs)
        layout = self._image_layout(model, kwargs, input_ids)
        video_id = model.config.video_token_id
        video_thw = kwargs.get("video_grid_thw")
        encoded = kwargs.get("mm_encoder_outputs") or {}
        has_videos = (kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None
                      or bool((input_ids == video_id).any()))
        if not has_videos:
            return layout
        position_ids = kwargs.get("position_ids")
        if video_thw is not None:
            grids, slices = self.video_slices(model.config, video_thw)
        elif encoded.get("video") is not None and position_ids is not None and position_ids.dim() == 3:
            sizes = [len(features) for features in encoded["video"].pooler_output]
            grids, slices = self._video_slices_from_positions(model, input_ids, position_ids, sizes)
        else:
            raise ValueError(f"{self.name} family: video tokens or pixel_values_videos without video_grid_thw")
        videos = build_layout(input_ids, video_id, grids, kwargs.get("attention_mask"), slices=slices)
        return merge_layouts(layout, videos)

    def _video_slices_from_positions(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                                     sizes: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """The temporal slices of each video (features encoded up front by `generate()`, which drops
        `video_grid_thw`) from its tokens' M-RoPE height / width positions: rows x cols per slice, size / (rows x
        cols) slices; with each slice's index in its video."""
        grids, slices = [], []
        for rows, cols, size in _position_spans("video", input_ids == model.config.video_token_id, position_ids, sizes):
            if size % (rows * cols):
                raise ValueError(f"{self.name} family: a video of {size} tokens has M-RoPE positions spanning "
                                 f"{rows} x {cols}; its slices cannot be recovered")
            grids.extend([(rows, cols)] * (size // (rows * cols)))
            slices.extend(range(size // (rows * cols)))
        return grids, slices

    def _image_layout(self, model: nn.Module, kwargs: dict[str, Any], input_ids: torch.Tensor) -> VisualLayout:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        grid_thw, position_ids = kwargs.get("image_grid_thw"), kwargs.get("position_ids")
        if kwargs.get("pixel_values") is not None:
            if grid_thw is None:
                raise ValueError(f"{self.name} family: pixel_values without image_grid_thw")
            grids = self.image_grids(model.config, grid_thw)
        elif encoded.get("image") is not None:
            sizes = [len(features) for features in encoded["image"].pooler_output]
            if grid_thw is not None:
                grids = self.image_grids(model.config, grid_thw)
            elif position_ids is not None and position_ids.dim() == 3:
                grids = self._grids_from_positions(model, input_ids, position_ids, sizes)
            else:
                raise ValueError(f"{self.name} family: image features without image_grid_thw or 3D position ids")
        else:
            grids = []
        return build_layout(input_ids, model.config.image_token_id, grids, kwargs.get("attention_mask"))

    def _grids_from_positions(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                              sizes: list[int]) -> list[tuple[int, int]]:
        """(rows, cols) of each image from its tokens' M-RoPE height / width positions, which are
        start + row and start + col (`get_rope_index`); position_ids (3 or 4, B, T), t/h/w last."""
        grids = []
        for rows, cols, size in _position_spans("image", input_ids == model.config.image_token_id, position_ids, sizes):
            if rows * cols != size:
                raise ValueError(f"{self.name} family: an image of {size} tokens has M-RoPE positions spanning "
                                 f"{rows} x {cols}; its grid cannot be recovered")
            grids.append((rows, cols))
        return grids

    def rotary_fn(self, layer: nn.Module) -> RotaryFn:
        """The plain rotate-half `apply_rotary_pos_emb`: the M-RoPE sections are already recomposed
        into the (B, T, D) tables by the text rotary embedding (transformers 5.x). A release that
        applies them in the attention again (`apply_multimodal_rotary_pos_emb`) is refused."""
        import sys

        module = sys.modules[type(layer.self_attn).__module__]
        if hasattr(module, "apply_multimodal_rotary_pos_emb"):
            raise TypeError(f"{self.name} family: {module.__name__} applies M-RoPE inside the attention "
                            "(apply_multimodal_rotary_pos_emb); this transformers version is not supported")
        return module_rotary_fn(layer)

    def vision_inputs(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """The smallest image: one merge window of patches (one visual token)."""
        vision = model.config.vision_config
        merge = vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * _patch_size(vision) ** 2
        dtype = next(model.model.visual.parameters()).dtype
        return {"pixel_values": torch.zeros(merge * merge, width, device=device, dtype=dtype),
                "image_grid_thw": torch.tensor([[1, merge, merge]], device=device)}

    def image_text(self, processor: Any) -> str:
        """As Qwen2-VL's chat template renders an image: the pad token (expanded by the processor to
        the image's visual tokens) between the vision start / end tokens."""
        return f"{VISION_START}{processor.image_token}{VISION_END}"

    def video_text(self, processor: Any) -> str:
        """As Qwen2-VL's chat template renders a video: the video pad token (expanded by the processor to the
        video's visual tokens) between the vision start / end tokens."""
        return f"{VISION_START}{processor.video_token}{VISION_END}"

    def projector_paths(self) -> tuple[str, ...]:
        return (MERGER,)

    def placeholder_token_ids(self, config: Any) -> tuple[int, ...]:
        return (config.image_token_id, config.video_token_id)  # never generated


# Qwen2VLImageProcessor's class defaults, what a preprocessor_config.json without these keys gets
QWEN_PROCESSOR_DEFAULTS = {"patch_size": 14, "merge_size": 2,
                           "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}}
def _position_spans(what: str, tokens: torch.Tensor, position_ids: torch.Tensor, sizes: list[int]):
    """(rows, cols, size) of each image or video, in batch-major order as features scatter, from the spans of its
    tokens' M-RoPE height / width positions (start + row, start + col); `tokens` (B, T) bool, `sizes` features per
    item. Raises ValueError when the token count differs from the features'."""
    heights, widths = position_ids[-2][tokens], position_ids[-1][tokens]
    if int(tokens.sum()) != sum(sizes):
        raise ValueError(f"{what} tokens do not match {what} features: {int(tokens.sum())} {what} tokens, "
                         f"{sum(sizes)} features (per {what} {sizes})")
    start = 0
    for size in sizes:
        h, w = heights[start:start + size], widths[start:start + size]
        yield int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1, size
        start += size


# Qwen2VLVideoProcessor's frame pixel bounds in transformers 5.x (size shortest_edge 128*28*28, longest_edge
# 28*28*768): video frames are resized within them, not within the image processor's min/max_pixels
VIDEO_PIXELS = (128 * 28 * 28, 28 * 28 * 768)
MAX_ASPECT_RATIO = 200  # smart_resize refuses a longer side over 200 times the shorter


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) px the Qwen2-VL image processor resizes an image to (transformers'
    `smart_resize`): both multiples of `factor`, about the same aspect ratio, area in
    [min_pixels, max_pixels] (up to one `factor` step)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"the Qwen2-VL processor refuses aspect ratios above {MAX_ASPECT_RATIO} "
                         f"(got {height}x{width} px)")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _patch_size(vision: Any) -> int:
    size = vision.patch_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square patches {size} are not supported")
        size = size[0]
    return int(size)
