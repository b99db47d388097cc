"""Each family's image size -> grids rule against transformers' own processors (their functions, and their
PIL image processors on real images), the published built-in processor settings, and the layout and
FLOPs of a sized image."""

import re
from functools import partial
from types import SimpleNamespace

import pytest
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from visprune.modeling import BUILTIN_MODELS, default_layout, visual_flops
from visprune.modeling.families import FAMILIES
from visprune.modeling.families.internvl import GOT_OCR2_DEFAULTS, PROCESSOR_CROP_TO_PATCHES
from visprune.modeling.families.llava_next import LLAVA_NEXT_DEFAULTS
from visprune.modeling.families.qwen2_vl import QWEN_PROCESSOR_DEFAULTS
from visprune.modeling.flops import (
    BUILTIN_PROCESSORS,
    MAX_TILES,
    image_size_grids,
    parse_image_size,
    resolve_processor_settings,
    tile_grids,
)

# (height, width) px: common photos and screens, squares at tile boundaries, tiny images, extreme aspect
# ratios (up to Qwen2-VL's limit of 200) and huge images
SIZES = [(720, 1280), (1080, 1920), (480, 640), (1280, 720), (448, 448), (449, 448), (672, 672), (336, 1008),
         (1, 1), (3, 5), (27, 29), (56, 56), (10, 1999), (1999, 10), (40, 3000), (3000, 40), (300, 2000),
         (4000, 3000), (12345, 67), (100000, 100000), (100000, 600), (7, 1400)]
QWEN = BUILTIN_MODELS["qwen2-vl-7b"]
INTERNVL = BUILTIN_MODELS["internvl3-8b"]
NEXT = BUILTIN_MODELS["llava-next-7b"]


def settings(model: str) -> dict:
    return resolve_processor_settings(model)[0]


# Qwen2-VL: smart_resize, then patches merged 2 x 2

@pytest.mark.parametrize("min_pixels,max_pixels", [(3136, 12845056), (256 * 28 * 28, 1280 * 28 * 28), (3136, 3136)])
def test_qwen_grid_is_smart_resize_over_patch_and_merge(min_pixels, max_pixels):
    processor = {"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "merge_size": 2}
    for height, width in SIZES:
        grids = image_size_grids(QWEN, (height, width), processor)
        resized = hf_smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        assert grids.grids == ((resized[0] // 28, resized[1] // 28),), (height, width)
        assert grids.non_grid == 0


def test_qwen_refuses_what_smart_resize_refuses():
    for size in [(1, 201), (300, 1), (5, 1002)]:
        with pytest.raises(ValueError, match="aspect ratio"):
            hf_smart_resize(*size, factor=28, min_pixels=3136, max_pixels=12845056)
        with pytest.raises(ValueError, match="aspect ratios above 200"):
            image_size_grids(QWEN, size, settings("qwen2-vl-7b"))


@pytest.mark.parametrize("size", [(720, 1280), (40, 3000), (5, 7), (333, 250)])
def test_qwen_grid_matches_the_pil_processor_on_a_real_image(size):
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1280 * 28 * 28)
    _, rows, cols = processor(images=Image.new("RGB", size[::-1]))["image_grid_thw"][0].tolist()
    expected = ((rows // 2, cols // 2),)
    assert image_size_grids(QWEN, size, {"min_pixels": 3136, "max_pixels": 1280 * 28 * 28}).grids == expected


def test_qwen_min_max_pixels_override_size_and_missing_keys_take_class_defaults():
    def expected(min_pixels: int, max_pixels: int) -> tuple:
        height, width = hf_smart_resize(1080, 1920, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        return ((height // 28, width // 28),)

    sized = {"size": {"shortest_edge": 3136, "longest_edge": 200704}}
    assert image_size_grids(QWEN, (1080, 1920), sized).grids == expected(3136, 200704)
    overridden = {**sized, "max_pixels": 12845056}
    assert image_size_grids(QWEN, (1080, 1920), overridden).grids == expected(3136, 12845056)
    assert image_size_grids(QWEN, (1080, 1920), {}).grids == expected(56 * 56, 28 * 28 * 1280)
    assert expected(3136, 200704) != expected(3136, 12845056) != expected(56 * 56, 28 * 28 * 1280)
    assert QWEN_PROCESSOR_DEFAULTS == {"patch_size": Qwen2VLImageProcessorPil.patch_size,
                                       "merge_size": Qwen2VLImageProcessorPil.merge_size,
                                       "size": Qwen2VLImageProcessorPil.size}


# InternVL: GotOcr2 tiles (+ a thumbnail), each tile one 16 x 16 grid

@pytest.mark.parametrize("min_patches,max_patches", [(1, 12), (2, 6), (1, 40), (1, 1)])
def test_internvl_tiles_match_got_ocr2(min_patches, max_patches):
    processor = {"size": {"height": 448, "width": 448}, "min_patches": min_patches, "max_patches": max_patches}
    hf = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                  min_patches=min_patches, max_patches=max_patches)
    for height, width in SIZES:
        grids = image_size_grids(INTERNVL, (height, width), processor)
        assert grids.grids == ((16, 16),) * hf.get_number_of_image_patches(height, width), (height, width)


@pytest.mark.parametrize("size", [(1080, 1920), (720, 1280), (20, 2000), (2000, 20), (3, 3), (500, 449)])
def test_internvl_tiles_match_the_pil_processor_on_a_real_image(size):
    hf = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True)
    (num_tiles,) = hf(images=Image.new("RGB", size[::-1]))["num_patches"]
    assert len(image_size_grids(INTERNVL, size, settings("internvl3-8b")).grids) == num_tiles


def test_internvl_always_tiles_like_its_processor():
    """The published -hf preprocessor_config.json says crop_to_patches false, but InternVLProcessor calls its
    image processor with crop_to_patches=True; max_patches 1 is what makes one tile."""
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    assert PROCESSOR_CROP_TO_PATCHES is InternVLProcessor.images_kwargs["crop_to_patches"] is True
    published = settings("internvl3-8b")
    assert published["crop_to_patches"] is False
    assert len(image_size_grids(INTERNVL, (1080, 1920), published).grids) == 9  # 2 x 4 tiles + thumbnail
    assert len(image_size_grids(INTERNVL, (1080, 1920), {**published, "max_patches": 1}).grids) == 1
    assert GOT_OCR2_DEFAULTS == {"size": GotOcr2ImageProcessorPil.size, "min_patches": GotOcr2ImageProcessorPil.min_patches,
                                 "max_patches": GotOcr2ImageProcessorPil.max_patches}


def test_tiles_are_internvl_only_and_bounded():
    assert tile_grids(INTERNVL, 7).grids == ((16, 16),) * 7 and tile_grids(INTERNVL, 7).non_grid == 0
    assert tile_grids(BUILTIN_MODELS["internvl2-8b"], 1).visual_tokens == 256
    for bad in (0, -1, MAX_TILES + 1, True):
        with pytest.raises(ValueError, match="tile count must be 1 to"):
            tile_grids(INTERNVL, bad)
    for model in ("qwen2-vl-7b", "llava-1.5-7b", "llava-next-7b"):
        with pytest.raises(ValueError, match="only tiled families"):
            tile_grids(BUILTIN_MODELS[model], 4)


# LLaVA-NeXT: base grid + unpadded high-resolution grid + one newline per row

def processor_features(height: int, width: int, pinpoints: list, tile: int = 336, patch: int = 14) -> tuple | None:
    """(unpadded high-resolution features, newlines, all image tokens) as LlavaNextProcessor counts them
    (None: no pinpoint holds the image)."""
    best = select_best_resolution([height, width], pinpoints)
    if best is None:
        return None
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints), patch_size=patch,
                                num_additional_image_tokens=0)
    processor._get_unpadded_features = partial(LlavaNextProcessor._get_unpadded_features, processor)
    total = LlavaNextProcessor._get_number_of_features(processor, height, width, tile, tile)
    unpadded, newlines = processor._get_unpadded_features(height, width, tile // patch, tile // patch,
                                                          best[0] // tile, best[1] // tile)
    return unpadded, newlines, total


@pytest.mark.parametrize("pinpoints", [LLAVA_NEXT_DEFAULTS["image_grid_pinpoints"],
                                       [[336, 336], [336, 1344], [1344, 336], [672, 1008], [1008, 1008]]])
def test_llava_next_grids_match_the_processor_token_count(pinpoints):
    processor = {"image_grid_pinpoints": pinpoints, "crop_size": {"height": 336, "width": 336}}
    for height, width in SIZES + [(1, 100000), (2, 1000)]:
        counted = processor_features(height, width, pinpoints)
        if counted is None or counted[0] == 0:  # the processor has nothing (or no rows) to give
            with pytest.raises(ValueError, match="too thin"):
                image_size_grids(NEXT, (height, width), processor)
            continue
        grids = image_size_grids(NEXT, (height, width), processor)
        (base, (rows, cols)) = grids.grids
        unpadded, newlines, total = counted
        assert base == (24, 24) and rows * cols == unpadded and grids.non_grid == rows == newlines, (height, width)
        assert grids.visual_tokens + grids.non_grid == total


def test_llava_next_grids_match_the_models_own_layout():
    """The same grids as the family's `image_grids` (what `build_layout` gives a real forward)."""
    pinpoints = BUILTIN_PROCESSORS["llava-next-7b"][1]["image_grid_pinpoints"]
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=336, patch_size=14), image_grid_pinpoints=pinpoints)
    for size in [(480, 640), (1080, 1920), (336, 1008), (100000, 100000), (3, 5)]:
        model_grids = [(rows, cols) for rows, cols, _ in FAMILIES["llava_next"].image_grids(config, size)]
        assert list(image_size_grids(NEXT, size, settings("llava-next-7b")).grids) == model_grids


@pytest.mark.parametrize("size", [(480, 640), (200, 1000), (9, 9)])
def test_llava_next_tile_count_matches_the_pil_processor_on_a_real_image(size):
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=LLAVA_NEXT_DEFAULTS["image_grid_pinpoints"])
    num_tiles = len(hf(images=Image.new("RGB", size[::-1]))["pixel_values"][0]) - 1  # minus the base image
    note = image_size_grids(NEXT, size, settings("llava-next-7b")).note
    tiles_h, tiles_w = (int(n) for n in re.search(r"(\d+)x(\d+) tiles of", note).groups())
    assert tiles_h * tiles_w == num_tiles


def test_llava_next_refuses_images_that_unpad_to_nothing():
    for size in [(1, 100000), (100000, 1), (2, 1000)]:
        with pytest.raises(ValueError, match="too thin"):
            image_size_grids(NEXT, size, settings("llava-next-7b"))
    assert LLAVA_NEXT_DEFAULTS == {"image_grid_pinpoints": LlavaNextImageProcessorPil.image_grid_pinpoints,
                                   "size": LlavaNextImageProcessorPil.size, "crop_size": LlavaNextImageProcessorPil.crop_size}


# LLaVA-1.5, built-in settings, layouts and FLOPs

def test_llava_grid_is_fixed():
    for size in [(1, 1), (480, 640), (100000, 7)]:
        grids = image_size_grids(BUILTIN_MODELS["llava-1.5-7b"], size, None)
        assert grids.grids == ((24, 24),) and "fixed grid" in grids.note


def test_builtin_settings_are_the_published_ones_and_give_the_reference_grids():
    assert BUILTIN_PROCESSORS["qwen2-vl-7b"][1] == {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                                                     "temporal_patch_size": 2, "merge_size": 2}
    assert set(BUILTIN_PROCESSORS) == {name for name, dims in BUILTIN_MODELS.items() if dims.family != "llava"}
    assert resolve_processor_settings("llava-1.5-7b") == (None, None)
    # the reference grid of each family is what its processor makes of the reference image size
    for model, size in [("qwen2-vl-7b", (448, 448)), ("internvl3-8b", (448, 448)), ("internvl2-8b", (400, 400)),
                        ("llava-next-7b", (672, 672))]:
        dims = BUILTIN_MODELS[model]
        grids = image_size_grids(dims, size, settings(model))
        assert grids.grids == dims.image_grids and grids.non_grid == dims.non_grid_tokens, model


def test_processor_settings_are_required_and_checked():
    for model in ("qwen2-vl-7b", "internvl3-8b", "llava-next-7b"):
        with pytest.raises(ValueError, match="processor settings"):
            image_size_grids(BUILTIN_MODELS[model], (480, 640), None)
    bad = [(QWEN, {"max_pixels": "big"}, "max_pixels"), (QWEN, {"patch_size": 0}, "patch_size"),
           (QWEN, {"size": [1, 2]}, "size"), (INTERNVL, {"max_patches": 10**9}, "max_patches"),
           (INTERNVL, {"size": {"height": 448}}, "size.width"), (NEXT, {"image_grid_pinpoints": [336, 672]}, "pinpoints"),
           (NEXT, {"image_grid_pinpoints": [[336, -1]]}, "pinpoints"), (NEXT, {"crop_size": None, "size": {}}, "tile size")]
    for dims, processor, match in bad:
        with pytest.raises(ValueError, match=match):
            image_size_grids(dims, (480, 640), processor)
    as_float = image_size_grids(QWEN, (480, 640), {"max_pixels": 200704.0})  # JSON may write 200704.0
    assert as_float == image_size_grids(QWEN, (480, 640), {"max_pixels": 200704})


def test_parse_image_size():
    assert parse_image_size("720x1280") == (720, 1280)
    assert parse_image_size(" 1080 X 1920 ") == (1080, 1920)
    for text in ("720", "0x10", "10x0", "-5x5", "axb", "7.5x8", "5x5x5", "", "x", "1000001x5", "9" * 5000 + "x5"):
        with pytest.raises(ValueError):
            parse_image_size(text)


def test_sized_layout_costs_every_grid():
    """Nine InternVL tiles cost as 2304 visual tokens (dense: the paper's formula), windows per tile."""
    grids = image_size_grids(INTERNVL, (1080, 1920), settings("internvl3-8b"))
    layout = default_layout(INTERNVL, num_images=2, image=grids)
    assert layout.grids == ((16, 16),) * 9 and layout.visual == 2 * 2304 and layout.text_rows == 60
    n, d, m, L = layout.visual, INTERNVL.hidden_size, INTERNVL.intermediate_size, INTERNVL.num_layers
    heads, kv, Dh = INTERNVL.num_heads, INTERNVL.num_kv_heads, INTERNVL.head_dim
    dense = L * (2 * n * d * Dh * (2 * heads + 2 * kv) + 4 * n * n * Dh * heads + 6 * n * d * m)
    assert float(visual_flops(INTERNVL, layout)) == pytest.approx(dense, rel=1e-6)
    one_tile = default_layout(INTERNVL, num_images=18)  # the same 18 tiles as separate images
    assert float(visual_flops(INTERNVL, layout, window=5)) == pytest.approx(
        float(visual_flops(INTERNVL, one_tile, window=5)), rel=1e-6)
    next_layout = default_layout(NEXT, image=image_size_grids(NEXT, (480, 640), settings("llava-next-7b")))
    assert next_layout.visual == 576 + 36 * 48 and next_layout.text_rows == 60 + 36
