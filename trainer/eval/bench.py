"""`visprune bench`: prefill time of the dense vs the hardened language model, measured in one process on this
machine, beside the speed-up the FLOPs model predicts. The models and the prompt are `bench_setup`'s (random
weights at a real model's layer dimensions); dense and hardened share the same weight tensors and run
alternately (`timing.time_alternating`); medians are reported. The vision tower and LM head are not timed
(they are the same in both).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

import torch
from visprune.modeling import cache_nbytes
from visprune.modeling.flops import plan_report
from visprune.modeling.plan import window_value

from .bench_setup import build_bench
from .peers import build_peer
from .timing import time_alternating


def run_bench(model: str = "llava-1.5-7b", layers: int = 4, plan_path: str | None = None,
              budget: float | None = None, repeats: int = 3, seed: int = 0, device: str | None = None,
              progress: bool = True, compare: tuple[str, ...] = (), kernel: str = "auto", freeze: bool = False,
              rings: bool = False, video_frames: int | None = None, temporal: int = 1) -> dict[str, Any]:
    """Measure dense vs hardened prefill; returns the result dict (see module docstring).

    At most one of `plan_path` and `budget` (a synthetic plan of the full-depth model, default
    0.25) selects the plan; `layers` of its layers, spread evenly over the depth, are benchmarked,
    and the result reports their own visual-FLOPs fraction. `compare` names token-dropping peers (`peers.PEERS`)
    timed in the same alternation, each at the visual FLOPs closest to the hardened plan's. `kernel` is the
    hardened attention kernel (`hardened.ATTENTION_KERNELS`; auto: SDPA on CUDA, the merged fp32 softmax elsewhere).
    `freeze` / `rings`: the synthetic plan also has freeze gates (frozen layers) / ring gates (per-layer windows);
    `temporal`: its temporal window. `video_frames`: the prompt is a Qwen2-VL video of that many frames.
    """
    from visprune.modeling import hardened

    if kernel not in hardened.ATTENTION_KERNELS:
        raise ValueError(f"--kernel must be one of {', '.join(hardened.ATTENTION_KERNELS)}, got {kernel!r}")
    saved, hardened.attention_kernel = hardened.attention_kernel, kernel
    try:
        return _run_bench(model, layers, plan_path, budget, repeats, seed, device, progress, compare, kernel, freeze,
                          rings, video_frames, temporal)
    finally:
        hardened.attention_kernel = saved


def _run_bench(model, layers, plan_path, budget, repeats, seed, device, progress, compare, kernel, freeze=False,
               rings=False, video_frames=None, temporal=1) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if compare and video_frames is not None:
        raise ValueError("--compare times token-dropping peers on an image prompt; it does not go with --video-frames")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    setup = build_bench(model, layers, plan_path, budget, seed, device, freeze=freeze, rings=rings,
                        video_frames=video_frames, temporal=temporal)
    if plan_path is None and budget is None:
        budget = 0.25
    kv: dict[str, int] = {}  # KV-cache bytes after a timed prefill, per model
    dims, layout, plan = setup.dims, setup.layout, setup.plan
    cost = plan_report(dims, layout, plan)
    peers = {name: build_peer(setup, name, cost["visual_flops_ratio"]) for name in compare}
    runs = {"dense": setup.run_dense, "hardened": setup.run_hardened, **{n: p.run for n, p in peers.items()}}
    with tqdm(total=len(runs) * repeats, desc="bench", disable=not progress) as bar:
        def after(name: str, out: Any) -> None:
            cache = out[1] if isinstance(out, tuple) else out.past_key_values
            kv[name] = cache_nbytes(cache)
            bar.update(1)

        times = time_alternating(runs, repeats, device, after)

    dense_flops, hard_flops = cost["dense"]["prefill_flops"], cost["plan"]["prefill_flops"]
    dense_ms = 1000 * statistics.median(times["dense"])
    hard_ms = 1000 * statistics.median(times["hardened"])
    measured = dense_ms / hard_ms
    predicted = dense_flops / hard_flops
    rope = getattr(setup.config.text_config, "rope_parameters", None) or {}
    return {
        "model": setup.full.name, "family": dims.family, "model_class": type(setup.dense).__name__,
        "attention_bias": setup.attention_bias(), "mrope_section": rope.get("mrope_section"),
        "layers": layers, "device": device, "dtype": str(setup.dense.dtype).replace("torch.", ""),
        "hardened_kernel": ("sdpa" if device == "cuda" else "merged") if kernel == "auto" else kernel,
        "threads": torch.get_num_threads(), "repeats": repeats, "budget": budget, "plan": plan_path,
        "plan_layers": setup.picked,
        "layout": layout.to_dict(), "image_grids": [list(g) for g in setup.grids], "video_frames": video_frames,
        "num_tokens": int(setup.inputs["input_ids"].shape[1]), "window": window_value(plan.window, plan.temporal_window),
        "visual_flops_ratio": cost["visual_flops_ratio"],
        "heads_kept_per_layer": [len(lp.heads) for lp in plan.layers],
        "mlp_kept_per_layer": [lp.mlp for lp in plan.layers],
        "frozen_layers": [i for i, lp in enumerate(plan.layers) if lp.frozen],
        "window_per_layer": [plan.layer_window(i) for i in range(plan.num_layers)],
        "dense_ms": dense_ms, "hardened_ms": hard_ms, "measured_speedup": measured, "predicted_speedup": predicted,
        "efficiency": measured / predicted, "dense_kv_bytes": kv["dense"], "hardened_kv_bytes": kv["hardened"],
        "dense_ms_all": [1000 * t for t in times["dense"]], "hardened_ms_all": [1000 * t for t in times["hardened"]],
        "dims": asdict(dims),
        **({"peers": {n: {"ms": 1000 * statistics.median(times[n]), "visual_flops_ratio": p.visual_flops_ratio,
                          "layer": p.layer, "visual_tokens_kept": p.keep, "kv_bytes": kv[n],
                          "ms_all": [1000 * t for t in times[n]]} for n, p in peers.items()}} if peers else {}),
    }


def _describe_model(result: dict[str, Any]) -> str:
    bias = "/".join(name.removesuffix("_proj") for name in result["attention_bias"])
    parts = [result["model_class"], f"{bias} bias" if bias else "no attention bias"]
    if result["mrope_section"]:
        parts.append(f"M-RoPE {result['mrope_section']}")
    return ", ".join(parts)


def _describe_prompt(layout: dict[str, Any]) -> str:
    visual = f"{layout['visual']} visual"
    if "slices" in layout:  # a video: one grid per temporal slice
        rows, cols = layout["image_grid"]
        return f"{layout['system']} system + {visual} (a video: {len(layout['slices'])} slices of {rows}x{cols}) + " \
               f"{layout['text']} text tokens"
    if "image_grids" in layout:  # several grids per image (LLaVA-NeXT) and non-grid image tokens
        visual += f" ({' + '.join(f'{r}x{c}' for r, c in layout['image_grids'])}) + {layout['non_grid']} newline"
    return f"{layout['system']} system + {visual} + {layout['text']} text tokens"


def format_bench(result: dict[str, Any]) -> str:
    kv_ratio = result["hardened_kv_bytes"] / result["dense_kv_bytes"] if result["dense_kv_bytes"] else float("nan")
    lines = [
        (f"{result['model']} ({_describe_model(result)}), {result['layers']} layer(s), {result['device']} "
         f"{result['dtype']}, {result['threads']} thread(s), {result['repeats']} repeats, hardened attention "
         f"{result['hardened_kernel']}; prompt "
         f"{_describe_prompt(result['layout'])}"),
        (f"plan: {result['visual_flops_ratio']:.2%} of dense visual FLOPs, window {result['window']}, "
         f"heads kept per layer {result['heads_kept_per_layer']}, MLP kept {result['mlp_kept_per_layer']}"
         + (f", frozen layers {result['frozen_layers']}" if result.get("frozen_layers") else "")
         + (f", window per layer {result['window_per_layer']}"
            if len(set(result.get("window_per_layer", []))) > 1 else "")),
        f"prefill  dense {result['dense_ms']:.1f} ms   hardened {result['hardened_ms']:.1f} ms",
        (f"speed-up measured {result['measured_speedup']:.2f}x   predicted (FLOPs) {result['predicted_speedup']:.2f}x   "
         f"efficiency {result['efficiency']:.2f}"),
        (f"KV cache after prefill  dense {result['dense_kv_bytes'] / 2**20:.1f} MiB   "
         f"hardened {result['hardened_kv_bytes'] / 2**20:.1f} MiB ({kv_ratio:.1%})"),
    ]
    for name, peer in result.get("peers", {}).items():
        lines.append(f"peer {name:<6} {peer['ms']:.1f} ms at {peer['visual_flops_ratio']:.2%} visual FLOPs (drops visual "
                     f"tokens before layer {peer['layer']}, keeps {peer['visual_tokens_kept']}); hardened / peer time "
                     f"{result['hardened_ms'] / peer['ms']:.2f}")
    return "\n".join(lines)


__all__ = ["format_bench", "run_bench"]
