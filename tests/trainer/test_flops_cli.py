"""`visprune flops --image-size / --tiles / --processor`: the grids and costs it prints, and one-line
errors with exit code 2 for bad input."""

import json

import pytest
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from visprune.modeling import BUILTIN_MODELS, default_layout, flops_report
from visprune.modeling.flops import ImageGrids
from visprune.trainer.cli import main


def run_json(capsys, *argv) -> dict:
    assert main(["flops", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv) -> str:
    """The one stderr line of a refused `visprune flops` call (exit code 2)."""
    assert main(["flops", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("visprune flops: error: ")
    return captured.err


def test_qwen_image_size_json(capsys):
    result = run_json(capsys, "qwen2-vl-7b", "--image-size", "720x1280")
    assert result["image"]["image_size"] == [720, 1280] and result["image"]["tiles"] is None
    assert result["image"]["grids"] == [[26, 46]] and result["image"]["visual_tokens"] == 26 * 46  # 728x1288 px
    assert "Qwen/Qwen2-VL-7B-Instruct" in result["image"]["processor"]
    assert result["layout"]["visual"] == 1196 and result["layout"]["image_grid"] == [26, 46]
    dims = BUILTIN_MODELS["qwen2-vl-7b"]
    expected = flops_report(dims, default_layout(dims, image=ImageGrids(((26, 46),))))
    assert result["dense"] == pytest.approx(expected)


def test_internvl_image_size_and_tiles(capsys):
    result = run_json(capsys, "internvl3-8b", "--image-size", "1080x1920")
    assert result["image"]["grids"] == [[16, 16]] * 9 and result["layout"]["visual"] == 9 * 256  # 2 x 4 + thumbnail
    assert result["layout"]["image_grids"] == [[16, 16]] * 9
    tiles = run_json(capsys, "internvl3-8b", "--tiles", "9")
    assert tiles["dense"] == result["dense"] and tiles["image"]["tiles"] == 9 and tiles["image"]["image_size"] is None
    seven = run_json(capsys, "internvl3-8b", "--tiles", "7", "--images", "2")
    assert seven["layout"]["visual"] == 2 * 7 * 256


def test_llava_next_image_size(capsys):
    result = run_json(capsys, "llava-next-7b", "--image-size", "480x640")
    assert result["image"]["grids"] == [[24, 24], [36, 48]] and result["image"]["non_grid"] == 36
    assert result["layout"]["visual"] == 576 + 36 * 48 and result["layout"]["non_grid"] == 36


def test_text_output_prints_grids_and_tokens(capsys):
    assert main(["flops", "internvl3-8b", "--image-size", "1080x1920"]) == 0
    out = capsys.readouterr().out
    assert "image 1080x1920 px: 9 x 16x16 = 2304 visual tokens" in out and "2 rows x 4 columns" in out
    assert "processor settings: published OpenGVLab/InternVL3-8B-hf" in out
    assert "layout: 35 system + 2304 visual (1 x [9 x 16x16])" in out
    assert main(["flops", "llava-next-7b", "--image-size", "480x640"]) == 0
    assert "24x24 + 36x48 = 2304 visual tokens + 36 newlines" in capsys.readouterr().out
    assert main(["flops", "llava-1.5-7b", "--image-size", "1080x1920"]) == 0
    out = capsys.readouterr().out
    assert "24x24 = 576 visual tokens; fixed grid" in out and "processor settings" not in out
    assert main(["flops", "llava-next-7b"]) == 0  # no size: the reference image, printed as before
    assert "2880 visual (1 x [24x24 + 48x48]) + 48 newline" in capsys.readouterr().out


@pytest.mark.parametrize("size,message", [
    ("720", "'720' is not HEIGHTxWIDTH"), ("0x10", "each side must be 1 to"), ("-5x5", "is not HEIGHTxWIDTH"),
    ("axb", "is not HEIGHTxWIDTH"), ("10000000x10", "each side must be 1 to"), ("1x300", "aspect ratios above 200"),
])
def test_bad_image_sizes(capsys, size, message):
    assert message in run_error(capsys, "qwen2-vl-7b", f"--image-size={size}")


def test_huge_images_are_costed(capsys):
    for model, tokens in [("qwen2-vl-7b", 128 * 128), ("internvl3-8b", 10 * 256), ("llava-next-7b", 576 + 48 * 48),
                          ("llava-1.5-7b", 576)]:
        assert run_json(capsys, model, "--image-size", "100000x100000")["layout"]["visual"] == tokens
    assert "too thin for LLaVA-NeXT" in run_error(capsys, "llava-next-7b", "--image-size", "1x100000")


def test_bad_tiles(capsys):
    assert "tile count must be 1 to" in run_error(capsys, "internvl3-8b", "--tiles", "0")
    assert "only tiled families (internvl)" in run_error(capsys, "qwen2-vl-7b", "--tiles", "4")
    assert "only tiled families (internvl)" in run_error(capsys, "llava-1.5-7b", "--tiles", "1")
    assert "not both" in run_error(capsys, "internvl3-8b", "--tiles", "4", "--image-size", "448x448")


def test_processor_folder(capsys, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 200704}))
    result = run_json(capsys, "qwen2-vl-7b", "--image-size", "1080x1920", "--processor", str(tmp_path))
    height, width = hf_smart_resize(1080, 1920, factor=28, min_pixels=3136, max_pixels=200704)
    assert result["image"]["grids"] == [[height // 28, width // 28]]
    assert result["image"]["processor"] == str(tmp_path / "preprocessor_config.json")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 448, "width": 448},
                                                                   "max_patches": 4}))
    assert run_json(capsys, "internvl3-8b", "--image-size", "1080x1920", "--processor",
                    str(tmp_path))["image"]["grids"] == [[16, 16]] * 3  # 1 x 2 + thumbnail


def test_bad_processor_folders(capsys, tmp_path):
    size = ("--image-size", "720x1280")
    assert "does not exist" in run_error(capsys, "qwen2-vl-7b", *size, "--processor", str(tmp_path / "missing"))
    assert "has no preprocessor_config.json" in run_error(capsys, "qwen2-vl-7b", *size, "--processor", str(tmp_path))
    for text, message in [("{not json", "not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                          ('{"max_pixels": "big"}', "max_pixels must be an integer"),
                          ('{"merge_size": 0}', "merge_size must be an integer")]:
        (tmp_path / "preprocessor_config.json").write_text(text)
        assert message in run_error(capsys, "qwen2-vl-7b", *size, "--processor", str(tmp_path))
    assert "--processor only applies with --image-size" in run_error(capsys, "qwen2-vl-7b", "--processor",
                                                                      str(tmp_path))


def test_model_folder_reads_its_own_preprocessor_config(capsys, tmp_path):
    Qwen2VLConfig(text_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "intermediate_size": 128},
                  vision_config={"depth": 1, "embed_dim": 32, "num_heads": 2}).save_pretrained(tmp_path)
    assert "none are known for this model" in run_error(capsys, str(tmp_path), "--image-size", "720x1280")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    result = run_json(capsys, str(tmp_path), "--image-size", "720x1280")
    assert result["image"]["grids"] == [[26, 46]] and result["layout"]["visual"] == 1196


def test_qwen_video_frames_are_temporal_slices_of_the_frame_grid(capsys):
    """16 frames in pairs (temporal_patch_size 2) are 8 slices of the reference 16 x 16 grid; a 720x1280 frame is
    resized within the video processor's pixel bounds (transformers' Qwen2VLVideoProcessor), not the image's."""
    import importlib.util
    import math
    import re
    from pathlib import Path

    from visprune.modeling.families.qwen2_vl import VIDEO_PIXELS

    # the installed transformers' Qwen2VLVideoProcessor defaults (the class needs torchvision to import: read it)
    folder = Path(importlib.util.find_spec("transformers.models.qwen2_vl").submodule_search_locations[0])
    source = (folder / "video_processing_qwen2_vl.py").read_text()
    size = re.search(r'size = \{"shortest_edge": ([0-9* ]+), "longest_edge": ([0-9* ]+)\}', source)
    product = lambda text: math.prod(int(factor) for factor in text.split("*"))
    assert VIDEO_PIXELS == (product(size.group(1)), product(size.group(2)))
    assert re.search(r"\n    temporal_patch_size = 2\n", source)
    result = run_json(capsys, "qwen2-vl-7b", "--video-frames", "16")
    assert result["image"]["grids"] == [[16, 16]] * 8 and result["layout"]["visual"] == 2048
    assert result["image"]["video_frames"] == 16
    dims = BUILTIN_MODELS["qwen2-vl-7b"]
    expected = flops_report(dims, default_layout(dims, image=ImageGrids(((16, 16),) * 8)))
    assert result["dense"] == pytest.approx(expected)
    height, width = hf_smart_resize(720, 1280, factor=28, min_pixels=VIDEO_PIXELS[0], max_pixels=VIDEO_PIXELS[1])
    result = run_json(capsys, "qwen2-vl-7b", "--video-frames", "15", "--image-size", "720x1280")
    assert result["image"]["grids"] == [[height // 28, width // 28]] * 8  # 15 frames: the last pair padded
    assert main(["flops", "qwen2-vl-7b", "--video-frames", "16"]) == 0
    assert "video: 8 x 16x16 = 2048 visual tokens" in capsys.readouterr().out


def test_a_spatio_temporal_plan_pairs_a_videos_neighbouring_slices(capsys, tmp_path):
    """A plan with `window: [t, w, w]` costs each slice's w x w pairs with its own slice and the slices at most
    t//2 away in the same video: 8 slices, t = 3 -> 8 + 2 * 7 = 22 slice pairs; t = 5 -> 8 + 2 * (7 + 6) = 34."""
    from visprune.modeling import GateProbs, LayerPlan, Plan, visual_flops
    from visprune.modeling.flops import window_pairs

    dims = BUILTIN_MODELS["qwen2-vl-7b"]
    layout = default_layout(dims, image=ImageGrids(((16, 16),) * 8, slices=tuple(range(8))))
    for temporal, slice_pairs in ((1, 8), (3, 22), (5, 34), (17, 64)):
        assert layout.visual_pairs(5, temporal) == slice_pairs * window_pairs(16, 16, 5)
    two_videos = default_layout(dims, image=ImageGrids(((4, 4),) * 4, slices=(0, 1, 0, 1)))
    assert two_videos.visual_pairs(3, 3) == 2 * 4 * window_pairs(4, 4, 3)  # never across videos
    layers = tuple(LayerPlan(heads=tuple(range(0, 28, 4)), mlp=i % 3 == 0) for i in range(28))
    figures = {}
    for temporal in (1, 3):
        plan = Plan(family="qwen2_vl", window=5, num_layers=28, num_heads=28, layers=layers, temporal_window=temporal)
        path = tmp_path / f"plan{temporal}.json"
        plan.to_json(path)
        result = run_json(capsys, "qwen2-vl-7b", "--video-frames", "16", "--plan", str(path))
        probs = GateProbs.from_plan(plan, dims.intermediate_size)
        assert result["plan"]["visual_flops"] == pytest.approx(float(visual_flops(dims, layout, probs, 5, temporal)))
        figures[temporal] = result["plan"]["visual_flops"]
        assert main(["flops", "qwen2-vl-7b", "--video-frames", "16", "--plan", str(path)]) == 0
        assert f"plan (window {5 if temporal == 1 else [3, 5, 5]})" in capsys.readouterr().out
    assert figures[3] > figures[1]
    assert json.loads((tmp_path / "plan3.json").read_text())["window"] == [3, 5, 5]


@pytest.mark.parametrize("argv, message", [
    (("qwen2-vl-7b", "--video-frames", "0"), "the frame count must be 1 to"),
    (("qwen2-vl-7b", "--video-frames", "100001"), "the frame count must be 1 to"),
    (("qwen2-vl-7b", "--video-frames", "9" * 5000), "invalid int value"),
    (("llava-1.5-7b", "--video-frames", "16"), "only Qwen2-VL / Qwen2.5-VL take videos"),
    (("internvl3-8b", "--video-frames", "16", "--tiles", "2"), "--video-frames and --tiles do not go together"),
    (("qwen2-vl-7b", "--video-frames", "16", "--image-size", "0x10"), "each side must be 1 to"),
])
def test_bad_video_frames(capsys, argv, message):
    if message == "invalid int value":  # argparse's own refusal: exit 2, usage on stderr
        with pytest.raises(SystemExit) as info:
            main(["flops", *argv])
        assert info.value.code == 2
        return
    assert message in run_error(capsys, *argv)
