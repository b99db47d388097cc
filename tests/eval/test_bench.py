"""`visprune bench` on tiny configs: the JSON contract and sane values (timings are not asserted), and
per family that the benchmark builds the family's own class with its attention details, feeds the
family's prompt layout (the FLOPs model's `default_layout`) and that its hardened slice == the gated
model on that prompt. The built-in models are checked on the meta device (no weights)."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llava
from tiny_families import TINY_FAMILIES
from visprune.modeling import (
    BUILTIN_MODELS,
    LayerPlan,
    Plan,
    apply_plan,
    default_layout,
    get_gate_set,
    hardened_forward_context,
)
from visprune.modeling.families import family_for
from visprune.modeling.flops import dims_from_config
from visprune.modeling.gated_attention import CTX_KWARG, VisualContext
from visprune.modeling.layout import build_layout
from visprune.trainer.cli import main
from visprune.trainer.eval.bench import run_bench
from visprune.trainer.eval.bench_setup import (
    BENCH_VOCAB,
    IMAGE_END,
    IMAGE_START,
    MODEL_CLASSES,
    bench_config,
    build_bench,
    build_models,
    image_grids,
    prompt_inputs,
    spread_layers,
)

KEYS = {"dense_ms", "hardened_ms", "measured_speedup", "predicted_speedup", "efficiency", "dense_kv_bytes",
        "hardened_kv_bytes", "family", "model_class", "attention_bias", "layout", "image_grids"}
QKV = ["q_proj", "k_proj", "v_proj"]
BIAS = {"llava": [], "llava_next": [], "qwen2_vl": QKV, "qwen2_5_vl": QKV, "internvl": QKV}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llava().config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, config_dir):
    """A local config folder per family: tiny LLaVA (4x4 grid), LLaVA-NeXT (4x4 base + 8x8 high-res +
    8 newlines), Qwen2-VL / Qwen2.5-VL (GQA 4:2, M-RoPE [2, 1, 1], 16x16 reference grid), InternVL
    (Qwen2 LM, 4x4 tile)."""
    dirs = {"llava": config_dir}
    for family, build in TINY_FAMILIES.items():
        dirs[family] = tmp_path_factory.mktemp(family)
        build().model.config.save_pretrained(dirs[family])
    return dirs


def test_bench_json_contract(config_dir, capsys):
    assert main(["bench", "--model", str(config_dir), "--layers", "2", "--budget", "0.5", "--repeats", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert result["dense_ms"] > 0 and result["hardened_ms"] > 0
    assert result["predicted_speedup"] >= 1.0
    assert result["efficiency"] == pytest.approx(result["measured_speedup"] / result["predicted_speedup"])
    assert 0 < result["hardened_kv_bytes"] <= result["dense_kv_bytes"]
    assert result["visual_flops_ratio"] <= 1.0 and result["plan_layers"] == [0, 2]
    assert result["family"] == "llava" and result["model_class"] == "LlavaForConditionalGeneration"


def test_bench_with_a_plan_file_and_text_output(config_dir, tmp_path, capsys):
    plan = Plan(family="llava", window=3, num_layers=3, num_heads=4,
                layers=(LayerPlan(heads=(0, 1), mlp=True), LayerPlan(heads=(), mlp=False), LayerPlan(heads=(2,), mlp=False)))
    plan.to_json(tmp_path / "plan.json")
    assert main(["bench", "--model", str(config_dir), "--layers", "3", "--plan", str(tmp_path / "plan.json"),
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "speed-up measured" in out and "predicted (FLOPs)" in out and "KV cache" in out
    assert "LlavaForConditionalGeneration" in out


def test_bench_synthetic_plan_with_frozen_layers_and_per_layer_windows(config_dir, capsys):
    """--freeze / --rings: the synthetic plan has freeze and ring gates; the hardened layers run it and the result
    names the frozen layers and the windows."""
    assert main(["bench", "--model", str(config_dir), "--layers", "3", "--budget", "0.12", "--freeze", "--rings",
                 "--repeats", "1", "--seed", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["visual_flops_ratio"] <= 0.12 + 1e-9 and result["hardened_ms"] > 0
    assert len(result["window_per_layer"]) == 3 and all(w in (1, 3, 5) for w in result["window_per_layer"])
    assert isinstance(result["frozen_layers"], list)
    assert main(["bench", "--model", str(config_dir), "--plan", "x.json", "--freeze"]) == 2
    assert "--freeze, --rings and --temporal-window shape the synthetic plan" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(6))
def test_synthetic_plans_with_freeze_gates_freeze_some_layers(seed):
    from visprune.modeling.flops import BUILTIN_MODELS
    from visprune.trainer.eval.bench_setup import synthetic_plan

    dims = BUILTIN_MODELS["llava-next-7b"]
    plain = synthetic_plan(dims, 0.12, seed=seed)
    frozen = synthetic_plan(dims, 0.12, seed=seed, freeze=True)
    assert not any(layer.frozen for layer in plain.layers) and any(layer.frozen for layer in frozen.layers)


def test_bench_errors(config_dir, family_dirs, tmp_path, capsys):
    assert main(["bench", "--model", str(config_dir), "--layers", "9"]) == 2
    assert "--layers must be in [1, 3]" in capsys.readouterr().err
    assert main(["bench", "--model", str(config_dir), "--budget", "0.5", "--plan", "x.json"]) == 2
    assert main(["bench", "--model", "internvl2-8b", "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "no native transformers class" in err and "internvl3-8b" in err
    Plan.dense(3, 4, family="llava").to_json(tmp_path / "llava_plan.json")  # same dims, another family
    assert main(["bench", "--model", str(family_dirs["internvl"]), "--layers", "3",
                 "--plan", str(tmp_path / "llava_plan.json")]) == 2
    assert "plan for family 'llava'" in capsys.readouterr().err


def test_spread_layers():
    assert spread_layers(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert spread_layers(3, 3) == [0, 1, 2]


# ---- per family, tiny configs ------------------------------------------------------------------------------
def _gated_hidden(setup) -> torch.Tensor:
    """The eval-mode gated model with the slice's plan (same weights), on the benchmark prompt."""
    family = setup.dims.family
    gated, _ = build_models(setup.config, family, torch.float32, "cpu", seed=0)
    gated.load_state_dict(setup.dense.state_dict())
    apply_plan(gated, setup.plan, mode="gated")
    gates = get_gate_set(gated).eval()
    ids = setup.inputs["input_ids"]
    ctx = VisualContext(layout=build_layout(ids, setup.config.image_token_id, setup.grids), gates=gates(),
                        window=gates.window, training=False, mlp_channel_masks=gates.mlp_channel_masks)
    core = family_for(gated).multimodal_core(gated)
    with torch.no_grad():
        return core(**setup.inputs, **{CTX_KWARG: ctx}).last_hidden_state


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl"])
def test_bench_builds_the_family(family, family_dirs, tmp_path):
    # partial heads (a KV group half open with GQA 4:2), a skipped layer, a kept MLP without heads
    plan = Plan(family=family, window=3, num_layers=3, num_heads=4,
                layers=(LayerPlan(heads=(0, 3), mlp=False), LayerPlan(heads=(), mlp=False),
                        LayerPlan(heads=(), mlp=True)))
    plan.to_json(tmp_path / "plan.json")
    setup = build_bench(str(family_dirs[family]), layers=3, plan_path=str(tmp_path / "plan.json"))
    assert setup.picked == [0, 1, 2] and setup.plan.layers == plan.layers and setup.dims.family == family
    assert type(setup.dense).__name__ == type(setup.hardened).__name__ == MODEL_CLASSES[family]
    assert setup.attention_bias() == BIAS[family]
    layers = family_for(setup.dense).decoder_layers(setup.dense)
    assert len(layers) == 3 and layers[0].self_attn.k_proj.out_features == setup.dims.num_kv_heads * setup.dims.head_dim
    assert setup.dims.num_kv_heads == (4 if family == "llava" else 2)

    # the prompt follows the FLOPs layout: system, the image's tokens (all its grids), text
    layout = setup.layout
    assert layout == default_layout(setup.dims)
    ids = setup.inputs["input_ids"][0]
    image = (ids == setup.config.image_token_id).nonzero().flatten()
    per_image = layout.visual + layout.non_grid
    assert ids.numel() == layout.system + per_image + layout.text
    assert image.tolist() == list(range(layout.system, layout.system + per_image))
    assert [(r, c) for r, c, _ in setup.grids] == list(layout.grids)
    ctx = hardened_forward_context(setup.hardened, setup.inputs["input_ids"], setup.grids)
    assert int(ctx.layout.visual_mask.sum()) == layout.visual  # newline tokens are text
    if family == "llava_next":
        assert setup.grids == [(4, 4, False), (8, 8, True)] and layout.non_grid == 8
    if family in ("qwen2_vl", "qwen2_5_vl", "internvl"):
        start, end = ((setup.config.vision_start_token_id, setup.config.vision_end_token_id)
                      if family != "internvl" else (IMAGE_START, IMAGE_END))
        assert ids[layout.system - 1] == start and ids[layout.system + per_image] == end

    # hardened == gated on the benchmark prompt
    with torch.no_grad():
        hard = setup.run_hardened().last_hidden_state
    torch.testing.assert_close(hard, _gated_hidden(setup), atol=1e-4, rtol=1e-4)


def dense_position_ids(setup) -> torch.Tensor:
    """The position ids the dense run's language model gets."""
    seen = {}
    lm = setup.dense.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        setup.run_dense()
    handle.remove()
    return seen["position_ids"]


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_bench_uses_mrope_positions(variant, family_dirs):
    """The dense run's language model gets the M-RoPE positions the model computes from image_grid_thw:
    image tokens span the grid's rows and columns, text continues after the largest one."""
    setup = build_bench(str(family_dirs[variant]), layers=1, budget=0.5)
    rows, cols = setup.layout.image_grid
    assert setup.inputs["image_grid_thw"].tolist() == [[1, 2 * rows, 2 * cols]]  # tiny merge size 2
    pos = dense_position_ids(setup)[-3:, 0]  # (3, T): t, h, w
    image = setup.inputs["mm_token_type_ids"][0].bool()
    s = setup.layout.system
    assert (pos[1][image] - s).unique().tolist() == list(range(rows))
    assert (pos[2][image] - s).unique().tolist() == list(range(cols))
    assert pos[0][~image][s:].tolist()[0] == s + max(rows, cols)  # text after the image


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_a_video_prompt_is_one_grid_per_slice_and_hardened_equals_gated(variant, family_dirs):
    """`--video-frames 4`: two temporal slices of the reference grid between the vision start / end tokens, with
    `video_grid_thw` and the model's M-RoPE positions (a slice per temporal position); a plan with a temporal window
    (`[3, 5, 5]`) made on that prompt; the hardened slice == the gated model on it."""
    setup = build_bench(str(family_dirs[variant]), layers=3, budget=0.5, video_frames=4, temporal=3)
    rows, cols = setup.layout.image_grid
    assert setup.layout.grids == ((rows, cols),) * 2 and setup.layout.slices == (0, 1)
    assert setup.inputs["video_grid_thw"].tolist() == [[2, 2 * rows, 2 * cols]] and "image_grid_thw" not in setup.inputs
    ids = setup.inputs["input_ids"][0]
    video = ids == setup.config.video_token_id
    assert int(video.sum()) == 2 * rows * cols and not bool((ids == setup.config.image_token_id).any())
    assert setup.plan.temporal_window == 3 and setup.plan.window == 5
    assert dense_position_ids(setup)[-3, 0][video].unique().numel() == 2  # one temporal position per slice

    gated, _ = build_models(setup.config, variant, torch.float32, "cpu", seed=0)
    gated.load_state_dict(setup.dense.state_dict())
    apply_plan(gated, setup.plan, mode="gated")
    with torch.no_grad():
        expected = family_for(gated).multimodal_core(gated.eval())(**setup.inputs).last_hidden_state
        hard = setup.run_hardened().last_hidden_state
    torch.testing.assert_close(hard, expected, atol=1e-4, rtol=1e-4)
    result = run_bench(str(family_dirs[variant]), layers=1, budget=0.5, repeats=1, progress=False, video_frames=4,
                       temporal=3)
    assert result["video_frames"] == 4 and result["window"] == [3, 5, 5] and result["layout"]["slices"] == [0, 1]


@pytest.mark.parametrize("argv, message", [
    (["--video-frames", "4"], "only Qwen2-VL / Qwen2.5-VL take videos"),
    (["--video-frames", "4", "--compare", "fastv"], "does not go with --video-frames"),
    (["--temporal-window", "2"], "temporal_window must be an odd positive integer"),
    (["--temporal-window", "3", "--plan", "p.json"], "a --plan brings its own"),
    (["--video-frames", "0"], "argument --video-frames: must be >= 1, got 0"),
])
def test_bench_video_errors(argv, message, config_dir, family_dirs, capsys):
    model = config_dir if "only Qwen2-VL" in message else family_dirs["qwen2_vl"]
    if message.startswith("argument"):
        with pytest.raises(SystemExit) as info:
            main(["bench", "--model", str(model), "--layers", "1", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err
        return
    assert main(["bench", "--model", str(model), "--layers", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_result_keys_per_family(family_dirs):
    for family in ("llava_next", "qwen2_vl", "internvl"):
        result = run_bench(str(family_dirs[family]), layers=1, budget=0.5, repeats=1, progress=False)
        assert KEYS <= set(result)
        assert result["family"] == family and result["model_class"] == MODEL_CLASSES[family]
        assert result["attention_bias"] == BIAS[family]
        dims = replace(dims_from_config(bench_config(str(family_dirs[family]), [0])), name=result["model"])
        assert result["layout"] == default_layout(dims).to_dict()
    assert result["mrope_section"] is None and result["image_grids"] == [[4, 4, False]]


# ---- built-in models, meta device ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b", "qwen2-vl-7b", "internvl3-8b", "llava-next-7b"])
def test_builtin_models_build_their_family(name):
    import transformers

    full = BUILTIN_MODELS[name]
    picked = spread_layers(full.num_layers, 2)
    config = bench_config(name, picked)
    dims = replace(full, num_layers=2)
    assert dims_from_config(config, name=name) == dims
    with torch.device("meta"):
        model = getattr(transformers, MODEL_CLASSES[full.family])._from_config(config)
    assert family_for(model).name == full.family
    attn = family_for(model).decoder_layers(model)[0].self_attn
    assert [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(attn, n).bias is not None] == BIAS[full.family]
    assert attn.k_proj.out_features == full.num_kv_heads * full.head_dim
    layout = default_layout(dims)
    grids = image_grids(config, full.family, layout)
    ids = prompt_inputs(config, full.family, layout, grids)["input_ids"]
    assert int(ids.max()) < config.text_config.vocab_size == BENCH_VOCAB  # special ids remapped into it
    assert int((ids == config.image_token_id).sum()) == layout.visual + layout.non_grid
    if name == "qwen2-vl-7b":
        assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
        assert type(model.model.language_model.layers[0].self_attn).__name__ == "Qwen2VLAttention"
    if name == "internvl3-8b":
        assert config.text_config.model_type == "qwen2" and config.text_config.rope_parameters["rope_theta"] == 1e6
    if name == "llava-next-7b":  # 576 base tokens + the 48x48 anyres grid + 48 newlines
        assert grids == [(24, 24, False), (48, 48, True)]
        assert ids.shape[1] == 35 + 576 + 48 * 49 + 60
    else:
        assert grids == [(*full.image_grid, False)] and ids.shape[1] == 35 + full.tokens_per_image + 60
