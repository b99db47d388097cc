"""`visprune bench`: prefill time of the dense vs the hardened language model, measured in one
process on this machine, beside the speed-up the FLOPs model predicts.

The language model is built at a real model's layer dimensions (random weights, `--layers N` of
them so it fits in memory) inside a LLaVA wrapper; the prompt is the FLOPs model's default layout
(35 system tokens, one image's visual tokens, 60 text tokens). Dense and hardened share the same
weight tensors and run alternately; medians are reported. The vision tower and LM head are not
timed (they are the same in both).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, replace
from typing import Any

import torch
from visprune.modeling import (
    HARDENED_KWARG,
    GateConfig,
    GateProbs,
    GateSet,
    ModelDims,
    Plan,
    apply_plan,
    cache_nbytes,
    default_layout,
    hardened_forward_context,
    prefill_flops,
    resolve_model_dims,
    visual_flops,
)
from visprune.modeling.families import TextDims

logger = logging.getLogger(__name__)

BENCH_VOCAB = 1024  # embeddings and LM head are not timed; a small vocabulary saves memory


def synthetic_plan(dims: ModelDims, budget: float, window: int | None = 5, seed: int = 0) -> Plan:
    """A plan at `budget` for `dims` from seeded random gate scores, deeper layers weaker (as the
    paper found), hardened by the same `GateSet.to_plan` as a trained run."""
    gen = torch.Generator().manual_seed(seed)
    L, H = dims.num_layers, dims.num_heads
    text = TextDims(L, dims.hidden_size, H, dims.num_kv_heads, dims.head_dim, dims.intermediate_size)
    gates = GateSet(text, GateConfig(window=window), dims.family, dims.image_grid)
    depth = torch.linspace(0, 1, L)
    with torch.no_grad():
        gates.router.log_alpha.copy_(torch.randn(L, generator=gen) - 2 * depth)
        gates.head.log_alpha.copy_(torch.randn(L, H, generator=gen))
        gates.mlp.log_alpha.copy_(torch.randn(L, generator=gen) - 0.5)
    return gates.to_plan(budget)


def spread_layers(total: int, count: int) -> list[int]:
    """`count` layer indices spread evenly over `total` layers (0, total/count, ...): the benchmarked
    slice sees the plan's early, middle and late layers."""
    return [round(i * total / count) for i in range(count)]


def _build_model(dims: ModelDims, dtype: torch.dtype, device: str, seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    rows, cols = dims.image_grid
    if rows != cols:
        raise ValueError(f"{dims.name}: the benchmark's LLaVA wrapper needs a square image grid, got {rows}x{cols}")
    vision = CLIPVisionConfig(image_size=rows * 14, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2)
    text = LlamaConfig(vocab_size=BENCH_VOCAB, hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
                       num_hidden_layers=dims.num_layers, num_attention_heads=dims.num_heads,
                       num_key_value_heads=dims.num_kv_heads, head_dim=dims.head_dim, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=BENCH_VOCAB - 1,
                         image_seq_length=rows * cols)
    torch.manual_seed(seed)
    with no_init_weights():
        dense = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    with torch.no_grad():
        for name, param in dense.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                param.fill_(1.0)
            elif param.dim() >= 2:
                param.normal_(0.0, 0.02)
            else:
                param.zero_()
    dense = dense.to(device).eval()
    with no_init_weights():
        hardened = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    hardened.load_state_dict(dense.state_dict(), assign=True)  # the same tensors: no second copy
    return dense, hardened.to(device).eval(), config


def _time(fn, device: str) -> tuple[float, Any]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_bench(model: str = "llava-1.5-7b", layers: int = 4, plan_path: str | None = None,
              budget: float | None = None, repeats: int = 3, seed: int = 0, device: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Measure dense vs hardened prefill; returns the result dict (see module docstring).

    At most one of `plan_path` and `budget` (a synthetic plan of the full-depth model, default
    0.25) selects the plan; `layers` of its layers, spread evenly over the depth, are benchmarked,
    and the result reports their own visual-FLOPs fraction.
    """
    if plan_path is not None and budget is not None:
        raise ValueError("give either --plan or --budget, not both")
    full = resolve_model_dims(model)
    if not 1 <= layers <= full.num_layers:
        raise ValueError(f"--layers must be in [1, {full.num_layers}] for {full.name}, got {layers}")
    dims = replace(full, num_layers=layers)
    if plan_path is not None:
        source = Plan.from_json(plan_path)
        source.validate_for(full.num_layers, full.num_heads, full.intermediate_size)
    else:
        budget = 0.25 if budget is None else budget
        source = synthetic_plan(full, budget, seed=seed)
    picked = spread_layers(full.num_layers, layers)
    plan = Plan(family="llava", window=source.window, num_layers=layers, num_heads=source.num_heads,
                layers=tuple(source.layers[i] for i in picked))

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logger.info("building %d layer(s) of %s (%s, %s)", layers, full.name, device, dtype)
    dense, hardened, config = _build_model(dims, dtype, device, seed)
    apply_plan(hardened, plan, mode="hardened")

    layout = default_layout(dims)
    gen = torch.Generator().manual_seed(seed)
    image_id = config.image_token_id
    ids = torch.cat([torch.randint(4, image_id, (layout.system,), generator=gen),
                     torch.full((layout.visual,), image_id),
                     torch.randint(4, image_id, (layout.text,), generator=gen)])[None].to(device)

    def run_dense():
        return dense.model(input_ids=ids, use_cache=True)

    def run_hardened():
        ctx = hardened_forward_context(hardened, ids, [dims.image_grid])
        return hardened.model(input_ids=ids, use_cache=True, **{HARDENED_KWARG: ctx})

    times: dict[str, list[float]] = {"dense": [], "hardened": []}
    kv: dict[str, int] = {}
    from tqdm.auto import tqdm

    steps = [("dense", run_dense), ("hardened", run_hardened)]
    with torch.no_grad():
        for name, fn in steps:  # warm-up
            fn()
        bar = tqdm(total=2 * repeats, desc="bench", disable=not progress)
        for rep in range(repeats):
            for name, fn in steps if rep % 2 == 0 else steps[::-1]:  # alternate the order
                seconds, out = _time(fn, device)
                times[name].append(seconds)
                kv[name] = cache_nbytes(out.past_key_values)
                del out
                bar.update(1)
        bar.close()

    probs = GateProbs.from_plan(plan, dims.intermediate_size)
    dense_flops = float(prefill_flops(dims, layout))
    hard_flops = float(prefill_flops(dims, layout, probs, window=plan.window))
    dense_ms = 1000 * statistics.median(times["dense"])
    hard_ms = 1000 * statistics.median(times["hardened"])
    measured = dense_ms / hard_ms
    predicted = dense_flops / hard_flops
    return {
        "model": full.name, "layers": layers, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "repeats": repeats, "budget": budget, "plan": plan_path,
        "plan_layers": picked,
        "layout": layout.to_dict(), "window": plan.window,
        "visual_flops_ratio": float(visual_flops(dims, layout, probs, plan.window) / visual_flops(dims, layout)),
        "heads_kept_per_layer": [len(lp.heads) for lp in plan.layers],
        "mlp_kept_per_layer": [lp.mlp for lp in plan.layers],
        "dense_ms": dense_ms, "hardened_ms": hard_ms, "measured_speedup": measured, "predicted_speedup": predicted,
        "efficiency": measured / predicted, "dense_kv_bytes": kv["dense"], "hardened_kv_bytes": kv["hardened"],
        "dense_ms_all": [1000 * t for t in times["dense"]], "hardened_ms_all": [1000 * t for t in times["hardened"]],
        "dims": asdict(dims),
    }


def format_bench(result: dict[str, Any]) -> str:
    kv_ratio = result["hardened_kv_bytes"] / result["dense_kv_bytes"] if result["dense_kv_bytes"] else float("nan")
    lines = [
        (f"{result['model']}, {result['layers']} layer(s), {result['device']} {result['dtype']}, "
        f"{result['threads']} thread(s), {result['repeats']} repeats; prompt {result['layout']['system']} system + "
        f"{result['layout']['visual']} visual + {result['layout']['text']} text tokens"),
        (f"plan: {result['visual_flops_ratio']:.2%} of dense visual FLOPs, window {result['window']}, "
        f"heads kept per layer {result['heads_kept_per_layer']}, MLP kept {result['mlp_kept_per_layer']}"),
        f"prefill  dense {result['dense_ms']:.1f} ms   hardened {result['hardened_ms']:.1f} ms",
        (f"speed-up measured {result['measured_speedup']:.2f}x   predicted (FLOPs) {result['predicted_speedup']:.2f}x   "
        f"efficiency {result['efficiency']:.2f}"),
        (f"KV cache after prefill  dense {result['dense_kv_bytes'] / 2**20:.1f} MiB   "
        f"hardened {result['hardened_kv_bytes'] / 2**20:.1f} MiB ({kv_ratio:.1%})"),
    ]
    return "\n".join(lines)


__all__ = ["format_bench", "run_bench", "synthetic_plan"]
