"""What `visprune bench` times, built: the family's own transformers model at a real model's layer dimensions
(random weights, `--layers N` decoder layers spread over the depth, a one-block vision tower that is never
run), dense and hardened over the same weight tensors, a plan, and one prompt of the FLOPs model's default
layout in the family's token order. Timing and the report are `bench`'s.

The families: LLaVA, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, InternVL with its Qwen2 LM, with their attention details
(Qwen2's q/k/v biases, grouped KV heads, M-RoPE sections). The prompt is 35 system tokens, one image with all
its grids, 60 text tokens: Qwen2-VL's image pads between `<|vision_start|>` and `<|vision_end|>` with the M-RoPE
positions the model computes from `image_grid_thw`, InternVL's between `<img>` and `</img>`, LLaVA-NeXT's base
grid then its high-resolution grid with a newline token after each row. With `video_frames` (Qwen2-VL) the
prompt is one video instead: its video pads between `<|vision_start|>` and `<|vision_end|>`, one grid per
temporal slice, and `video_grid_thw`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from visprune.modeling import (
    BUILTIN_MODELS,
    HARDENED_KWARG,
    GateConfig,
    GateSet,
    ModelDims,
    Plan,
    TokenLayout,
    apply_plan,
    default_layout,
    hardened_forward_context,
    resolve_model_dims,
)
from visprune.modeling.families import FAMILIES, family_for
from visprune.modeling.flops import dims_from_config, video_frame_grids
from visprune.modeling.hardened import HardenedForward

logger = logging.getLogger(__name__)

BENCH_VOCAB = 1024  # embeddings and LM head are not timed; a small vocabulary saves memory
# special tokens at the top of the small vocabulary; text tokens are drawn below them
SPECIAL_IDS = {"image_token_id": BENCH_VOCAB - 1, "image_token_index": BENCH_VOCAB - 1,
               "video_token_id": BENCH_VOCAB - 2, "vision_start_token_id": BENCH_VOCAB - 3,
               "vision_end_token_id": BENCH_VOCAB - 4}
TEXT_IDS = (4, BENCH_VOCAB - 8)
IMAGE_START, IMAGE_END = BENCH_VOCAB - 5, BENCH_VOCAB - 6  # InternVL's <img> / </img> (tokenizer-only tokens)

MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "internvl": "InternVLForConditionalGeneration"}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
FLOPS_ONLY = {"internvl2-8b": "internvl2-8b (InternLM2.5 LM) has no native transformers class, so `visprune bench` "
                              "cannot build it (it is in `visprune flops` only); benchmark internvl3-8b "
                              "(Qwen2.5 LM, InternVLForConditionalGeneration) instead"}

# A one-block vision tower per vision model type: it is never run; the fields that set the image grid
# (image / patch size, merge size, downsample ratio) and the projector's output width are kept.
TINY_VISION: dict[str, dict[str, Any]] = {
    "clip_vision_model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "projection_dim": 32},
    "siglip_vision_model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2},
    "qwen2_vl_vision": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
    "qwen2_5_vl_vision": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "fullatt_block_indexes": [0]},
    "internvl_vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2},
}

# What the built-in models' published configs add to their ModelDims: the text model type, rotary and
# norm settings, and the vision geometry that sets the image grid.
CLIP_PATCH = 14  # CLIP ViT-L/14 (LLaVA-1.5, LLaVA-NeXT); Qwen2-VL's ViT and InternViT also use 14 px patches
LLAVA_NEXT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # llava-v1.6 anyres, in 336 px tiles


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's (t, h, w) split of the rotary half-dimension: [16, 24, 24] for head_dim 128 (the
    published Qwen2-VL-7B value), the same 1/4, 3/8, 3/8 proportions otherwise."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _builtin_config(dims: ModelDims) -> dict[str, Any]:
    """The config dict of a built-in model at full depth (published values; vision width irrelevant)."""
    if dims.name in FLOPS_ONLY:
        raise ValueError(FLOPS_ONLY[dims.name])
    rows, cols = dims.image_grid
    text = {"hidden_size": dims.hidden_size, "intermediate_size": dims.intermediate_size,
            "num_hidden_layers": dims.num_layers, "num_attention_heads": dims.num_heads,
            "num_key_value_heads": dims.num_kv_heads}
    if dims.family in ("llava", "llava_next"):  # Vicuna (Llama) LM, CLIP tower
        text.update(model_type="llama", head_dim=dims.head_dim, rms_norm_eps=1e-5, max_position_embeddings=4096)
        tile = rows * CLIP_PATCH
        config = {"model_type": dims.family, "text_config": text,
                  "vision_config": {"model_type": "clip_vision_model", "image_size": tile, "patch_size": CLIP_PATCH},
                  "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
        if dims.family == "llava":
            config["image_seq_length"] = rows * cols
        else:
            config["image_grid_pinpoints"] = [[h * tile, w * tile] for h, w in LLAVA_NEXT_PINPOINTS]
        return config
    if dims.hidden_size != dims.num_heads * dims.head_dim:
        raise ValueError(f"{dims.name}: Qwen2 attention needs head_dim = hidden_size / num_heads")
    qwen2 = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "use_sliding_window": False}
    if dims.family == "qwen2_vl":  # 2x2 patch merge: the visual grid is the patch grid / 2
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(dims.head_dim)}
        text.update(model_type="qwen2_vl_text", rope_parameters=rope, **qwen2)
        vision = {"model_type": "qwen2_vl_vision", "patch_size": CLIP_PATCH, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "hidden_size": dims.hidden_size}
        return {"model_type": "qwen2_vl", "text_config": text, "vision_config": vision}
    if dims.family == "internvl":  # Qwen2.5 LM; pixel shuffle 0.5 on a 448 px tile of 14 px patches
        text.update(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **qwen2)
        vision = {"model_type": "internvl_vision", "image_size": [rows * 2 * CLIP_PATCH, cols * 2 * CLIP_PATCH],
                  "patch_size": [CLIP_PATCH, CLIP_PATCH]}
        return {"model_type": "internvl", "text_config": text, "vision_config": vision, "downsample_ratio": 0.5,
                "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
                "image_seq_length": rows * cols}
    raise ValueError(f"{dims.name}: no benchmark config for family {dims.family!r}")


def _source_config(model: str, full: ModelDims) -> dict[str, Any]:
    if model in BUILTIN_MODELS:
        return _builtin_config(full)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, local_files_only=True, trust_remote_code=False).to_dict()


def bench_config(model: str, picked: list[int]) -> Any:
    """The transformers config the benchmark builds for `model` (a built-in name or a local config
    folder): its decoder layers `picked` of the full depth, a small vocabulary, special token ids
    remapped into it, and a one-block vision tower of the same grid geometry."""
    full = resolve_model_dims(model)
    config = copy.deepcopy(_source_config(model, full))
    text = config["text_config"]
    text.update(num_hidden_layers=len(picked), vocab_size=BENCH_VOCAB, pad_token_id=None, bos_token_id=None,
                eos_token_id=None)
    if text.get("layer_types"):
        text["layer_types"] = [text["layer_types"][i] for i in picked]
    vision = config["vision_config"]
    tiny = TINY_VISION.get(vision.get("model_type"))
    if tiny is None:
        logger.warning("no one-block stand-in for vision tower %r: building it at full size (it is not run)",
                       vision.get("model_type"))
    else:
        vision.update(tiny)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[config["model_type"]]
    config = config_class.from_dict(config).to_dict()  # with the class defaults, special token ids included
    for key, value in SPECIAL_IDS.items():
        if key in config:
            config[key] = value
    if "pad_token_id" in config:
        config["pad_token_id"] = None
    return config_class.from_dict(config)


# ---- the prompt ----------------------------------------------------------------------------------
Grid = tuple[int, int, bool]  # rows, cols, newline after each row


def image_grids(config: Any, family: str, layout: TokenLayout) -> list[Grid]:
    """The grids of the layout's image as the family's real input has them (from the family's own
    input-side rules), checked against the FLOPs layout: LLaVA-NeXT's base grid and high-resolution
    grid of the reference image (the largest square pinpoint) with its newlines; Qwen2-VL's grid from
    `image_grid_thw`; one tile's grid otherwise."""
    rows, cols = layout.image_grid
    rules = FAMILIES[family]
    if family == "llava_next":
        side = max(min(int(h), int(w)) for h, w in config.image_grid_pinpoints)
        grids = [tuple(g) for g in rules.image_grids(config, (side, side))]
    elif family in QWEN_FAMILIES:
        grids = [(r, c, False) for r, c in rules.image_grids(config, _grid_thw(config, [(rows, cols, False)]))]
    else:
        grids = [(*rules.image_grid(config), False)]
    newlines = sum(r for r, _, newline in grids if newline)
    if [(r, c) for r, c, _ in grids] != [tuple(g) for g in layout.grids] or newlines != layout.non_grid:
        raise ValueError(f"the family's input for one image has grids {grids}, the FLOPs layout has "
                         f"{list(layout.grids)} and {layout.non_grid} non-grid tokens")
    return grids


def _grid_thw(config: Any, grids: list[Grid]) -> torch.Tensor:
    """Qwen2-VL's `image_grid_thw` (patches) of images of `grids` visual tokens."""
    merge = config.vision_config.spatial_merge_size
    return torch.tensor([[1, r * merge, c * merge] for r, c, _ in grids])


def video_grids(config: Any, family: str, layout: TokenLayout) -> list[Grid]:
    """The temporal slices of the layout's video as the family's own `video_grid_thw` rule lays them out, checked
    against the FLOPs layout (Qwen2-VL only: `video_frame_grids` refuses other families first)."""
    slices, _ = FAMILIES[family].video_slices(config, _video_thw(config, layout))
    if [tuple(g) for g in slices] != [tuple(g) for g in layout.grids]:
        raise ValueError(f"the family's input for one video has slices {slices}, the FLOPs layout {list(layout.grids)}")
    return [(r, c, False) for r, c in slices]


def _video_thw(config: Any, layout: TokenLayout) -> torch.Tensor:
    """Qwen2-VL's `video_grid_thw` (temporal slices, patches) of the layout's one video."""
    merge = config.vision_config.spatial_merge_size
    rows, cols = layout.image_grid
    return torch.tensor([[len(layout.grids), rows * merge, cols * merge]])


def prompt_inputs(config: Any, family: str, layout: TokenLayout, grids: list[Grid],
                  seed: int = 0, video: bool = False) -> dict[str, torch.Tensor]:
    """The multimodal core's inputs for one prompt of `layout` (one image, or with `video` one video), without
    pixel values: system tokens, the image (video) tokens, text tokens. Qwen2-VL's `<|vision_start|>` /
    `<|vision_end|>` and InternVL's `<img>` / `</img>` are the last system and first text token; Qwen2-VL also
    gets `image_grid_thw` (`video_grid_thw`) and `mm_token_type_ids`, from which the model computes its M-RoPE
    positions."""
    if layout.num_images != 1:
        raise ValueError(f"the benchmark prompt has one image, the layout {layout.num_images}")
    gen = torch.Generator().manual_seed(seed)
    system = torch.randint(*TEXT_IDS, (layout.system,), generator=gen)
    text = torch.randint(*TEXT_IDS, (layout.text,), generator=gen)
    if family in QWEN_FAMILIES:
        system[-1], text[0] = config.vision_start_token_id, config.vision_end_token_id
    elif family == "internvl":
        system[-1], text[0] = IMAGE_START, IMAGE_END
    token = config.video_token_id if video else config.image_token_id
    image = torch.full((sum(r * (c + int(newline)) for r, c, newline in grids),), token)
    ids = torch.cat([system, image, text])[None]  # (1, T)
    inputs = {"input_ids": ids}
    if video:
        inputs["video_grid_thw"] = _video_thw(config, layout)
        inputs["mm_token_type_ids"] = 2 * (ids == token).int()  # 2 = video
    elif family in QWEN_FAMILIES:
        inputs["image_grid_thw"] = _grid_thw(config, grids)
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).int()  # 1 = image
    return inputs


# ---- plans and models -----------------------------------------------------------------------------
def synthetic_plan(dims: ModelDims, budget: float, window: int | None = 5, seed: int = 0, freeze: bool = False,
                   rings: bool = False, temporal: int = 1, layout: TokenLayout | None = None) -> Plan:
    """A plan at `budget` for `dims` from seeded random gate scores, deeper layers weaker (as the
    paper found), hardened by the same `GateSet.to_plan` as a trained run (on `layout`, default the family's image
    layout). With `freeze`, freeze gates too (deeper layers more often frozen); with `rings`, ring gates (per-layer
    windows); `temporal`: the temporal window of a video's slices (`window: [t, w, w]`)."""
    gen = torch.Generator().manual_seed(seed)
    L, H = dims.num_layers, dims.num_heads
    cfg = GateConfig(window=window, visual_freeze=freeze, window_rings=rings, temporal_window=temporal)
    gates = GateSet(dims.text_dims(), cfg, dims.family, dims.image_grid, (dims.extra_grids, dims.non_grid_tokens))
    depth = torch.linspace(0, 1, L)
    with torch.no_grad():
        gates.router.log_alpha.copy_(torch.randn(L, generator=gen) - 2 * depth)
        gates.head.log_alpha.copy_(torch.randn(L, H, generator=gen))
        gates.mlp.log_alpha.copy_(torch.randn(L, generator=gen) - 0.5)
        if freeze:  # drawn after the others, so a plan without freeze gates stays the same for a seed
            gates.update.log_alpha.copy_(torch.randn(L, generator=gen) - 2 * depth)
        if rings:
            gates.rings.log_alpha.copy_(torch.randn(gates.rings.shape, generator=gen))
    return gates.to_plan(budget, layout)


def spread_layers(total: int, count: int) -> list[int]:
    """`count` layer indices spread evenly over `total` layers (0, total/count, ...): the benchmarked
    slice sees the plan's early, middle and late layers."""
    return [round(i * total / count) for i in range(count)]


def _fill_random(model: nn.Module) -> None:
    """Norms at identity, every other parameter (biases included) N(0, 0.02)."""
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                else:
                    param.normal_(0.0, 0.02)


def build_models(config: Any, family: str, dtype: torch.dtype, device: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """The family's model from `config` with random weights, twice over the same weight tensors (the
    second one is for hardening)."""
    import transformers
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, MODEL_CLASSES[family])
    torch.manual_seed(seed)
    with no_init_weights():
        dense = cls._from_config(config, attn_implementation="sdpa", dtype=dtype)
    _fill_random(dense)
    dense = dense.to(device).eval()
    with no_init_weights():
        hardened = cls._from_config(config, attn_implementation="sdpa", dtype=dtype)
    hardened.load_state_dict(dense.state_dict(), assign=True)  # the same tensors: no second copy
    return dense, hardened.to(device).eval()


@dataclass
class BenchSetup:
    """One benchmark: the full model's dims, the benchmarked slice (`picked` layers) with its plan,
    the dense and hardened models, the FLOPs layout and the prompt that follows it."""

    full: ModelDims
    dims: ModelDims
    picked: list[int]
    plan: Plan
    config: Any
    dense: nn.Module
    hardened: nn.Module
    layout: TokenLayout
    grids: list[Grid]
    inputs: dict[str, torch.Tensor]
    video_frames: int | None = None

    def run_dense(self) -> Any:
        core = family_for(self.dense).multimodal_core(self.dense)
        return core(**self.inputs, use_cache=True)

    def run_hardened(self) -> Any:
        family = family_for(self.hardened)
        if self.video_frames is None:
            ctx = hardened_forward_context(self.hardened, self.inputs["input_ids"], self.grids)
        else:  # the family's own layout of video tokens (one grid per temporal slice of `video_grid_thw`)
            ctx = HardenedForward(family.build_layout(self.hardened, self.inputs))
        core = family.multimodal_core(self.hardened)
        return core(**self.inputs, use_cache=True, **{HARDENED_KWARG: ctx})

    def attention_bias(self) -> list[str]:
        """The attention projections of the (dense) decoder layers that have a bias."""
        attn = family_for(self.dense).decoder_layers(self.dense)[0].self_attn
        return [name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(attn, name).bias is not None]


def build_bench(model: str = "llava-1.5-7b", layers: int = 4, plan_path: str | None = None,
                budget: float | None = None, seed: int = 0, device: str = "cpu", freeze: bool = False,
                rings: bool = False, video_frames: int | None = None, temporal: int = 1) -> BenchSetup:
    """Build everything `run_bench` times (see the module docstring); `budget` defaults to 0.25; `freeze` and
    `rings` add freeze and ring gates to the synthetic plan, `temporal` its temporal window; `video_frames`: the
    prompt is a video of that many frames of the reference grid (Qwen2-VL) instead of an image, and the synthetic
    plan is made at `budget` on that prompt."""
    if plan_path is not None and budget is not None:
        raise ValueError("give either --plan or --budget, not both")
    if plan_path is not None and (freeze or rings or temporal != 1):
        raise ValueError("--freeze, --rings and --temporal-window shape the synthetic plan; a --plan brings its own")
    if model in FLOPS_ONLY:
        raise ValueError(FLOPS_ONLY[model])
    full = resolve_model_dims(model)
    if not 1 <= layers <= full.num_layers:
        raise ValueError(f"--layers must be in [1, {full.num_layers}] for {full.name}, got {layers}")
    picked = spread_layers(full.num_layers, layers)
    dims = replace(full, num_layers=layers)
    config = bench_config(model, picked)
    built = dims_from_config(config, name=full.name)
    if built != dims:  # the FLOPs model must cost what is built
        raise ValueError(f"{full.name}: the benchmark model has dims {built}, the FLOPs model {dims}")
    video = None if video_frames is None else video_frame_grids(full, video_frames, None, None)
    if plan_path is not None:
        source = Plan.from_json(plan_path)
        source.validate_for(full.num_layers, full.num_heads, full.intermediate_size)
        if source.family != full.family:
            raise ValueError(f"{plan_path} is a plan for family {source.family!r}, {full.name} is {full.family!r}")
    else:
        source = synthetic_plan(full, 0.25 if budget is None else budget, seed=seed, freeze=freeze, rings=rings,
                                temporal=temporal, layout=default_layout(full, image=video))
    plan = Plan(family=full.family, window=source.window, num_layers=layers, num_heads=source.num_heads,
                layers=tuple(source.layers[i] for i in picked), temporal_window=source.temporal_window)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logger.info("building %d layer(s) of %s as %s (%s, %s)", layers, full.name, MODEL_CLASSES[full.family],
                device, dtype)
    dense, hardened = build_models(config, full.family, dtype, device, seed)
    apply_plan(hardened, plan, mode="hardened")
    layout = default_layout(dims, image=video)
    grids = image_grids(config, full.family, layout) if video is None else video_grids(config, full.family, layout)
    inputs = prompt_inputs(config, full.family, layout, grids, seed, video=video is not None)
    return BenchSetup(full, dims, picked, plan, config, dense, hardened, layout, grids,
                      {k: v.to(device) for k, v in inputs.items()}, video_frames)


__all__ = ["BENCH_VOCAB", "IMAGE_END", "IMAGE_START", "MODEL_CLASSES", "BenchSetup", "bench_config", "build_bench",
           "build_models", "image_grids", "prompt_inputs", "spread_layers", "synthetic_plan", "video_grids"]
