"""`visprune train RECIPE --dry-run`: what a recipe will need per GPU, without weights and without training.

The recipe's model is built from its `config.json` on the meta device (shapes, no memory), gates and LoRA are
attached by the training code itself (`prepare_model`), and the DeepSpeed config is rendered as training would.
From that model come the parameter counts; from the counts and the ZeRO stage the model-state bytes per GPU;
from a forward on the meta device the activation bytes (see `activation_bytes`). docs/training.md#dry-run
explains every figure.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from visprune.modeling.families import family_for
from visprune.modeling.flops import default_layout, dims_from_config, prefill_flops, resolve_model_dims

from .build import add_trainable, prepare_model, render_deepspeed_config
from .config import Recipe, RecipeError

CONFIG_FILE = "config.json"
ADAM_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq per trainable parameter
FP32 = 4


def find_config_folder(recipe: Recipe, recipe_path: str | os.PathLike | None) -> Path:
    """The folder whose config.json describes the recipe's model: `model.path` when it is a local folder, else
    the recipe's own folder (the built-in recipes ship their checkpoint's config.json beside them)."""
    if os.path.isdir(recipe.model.path):
        folder = Path(recipe.model.path)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"model.path {folder}: not a model folder (no config.json)")
        return folder
    if recipe_path is not None and (Path(recipe_path).parent / CONFIG_FILE).is_file():
        return Path(recipe_path).parent
    where = f"{Path(recipe_path).parent / CONFIG_FILE} does not exist" if recipe_path else "no recipe folder"
    raise FileNotFoundError(f"model.path {recipe.model.path} is not a local folder and {where}: the dry run "
                            "needs the checkpoint's config.json (download it, or point model.path at a folder)")


def build_meta_model(recipe: Recipe, folder: Path, num_layers: int | None = None) -> torch.nn.Module:
    """The recipe's model on the meta device, from `folder/config.json` (optionally with fewer text layers)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder, trust_remote_code=recipe.model.trust_remote_code,
                                        local_files_only=True)
    if config.model_type != recipe.model.family:
        raise RecipeError(f"model.family is {recipe.model.family!r} but {folder / CONFIG_FILE} is a "
                          f"{config.model_type!r} model")
    if num_layers is not None:
        config.text_config.num_hidden_layers = num_layers
        if hasattr(config.text_config, "layer_types") and config.text_config.layer_types is not None:
            config.text_config.layer_types = config.text_config.layer_types[:num_layers]
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, dtype=_train_dtype(recipe), attn_implementation="sdpa",
                                                       trust_remote_code=recipe.model.trust_remote_code)


def _train_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype training on GPUs uses: `auto` is bf16 there."""
    return torch.float32 if recipe.model.dtype == "fp32" else torch.bfloat16


def parameter_counts(model: torch.nn.Module, gates: torch.nn.Module, recipe: Recipe) -> dict[str, int]:
    unique = {id(p): p for p in model.parameters()}.values()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_for(base)
    projector = 0
    for path in family.projector_paths():
        with contextlib.suppress(AttributeError):
            projector += sum(p.numel() for p in base.get_submodule(path).parameters())
    return {
        "total_params": sum(p.numel() for p in unique),
        "trainable_params": sum(p.numel() for p in unique if p.requires_grad),
        "lora_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        "gate_params": sum(p.numel() for p in gates.parameters()),
        "projector_params": projector,
        "largest_layer_params": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
    }


def model_state_bytes(total: int, trainable: int, largest_layer: int, zero_stage: int, gpus: int, offload: bool,
                      dtype_bytes: int) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients and optimizer states (Adam).

    Mixed precision (bf16): 16-bit weights; per trainable parameter 16-bit and fp32 gradients, an fp32 master
    copy and Adam's two fp32 moments, split as DeepSpeed's estimators split them, so that with every parameter
    trainable the sum equals `estimate_zero2_model_states_mem_needs` / `estimate_zero3_...` (no offload):
    ZeRO-2 = 2 P + 18 P / N, ZeRO-3 = 4 x largest layer + 18 P / N. ZeRO-2 keeps every weight on every GPU and
    partitions gradients and optimizer states; ZeRO-3 partitions the weights too and gathers one layer at a time.
    Stage 0 (one process or DDP, no DeepSpeed): everything on every GPU, Adam's moments in the weights' dtype.
    `offload` moves gradients' fp32 copies and optimizer states to CPU memory (per-GPU 0).
    """
    mixed = dtype_bytes < FP32
    if zero_stage == 0:
        return {"weights": dtype_bytes * total, "grads": dtype_bytes * trainable,
                "optimizer": 2 * dtype_bytes * trainable}
    master = FP32 if mixed else 0
    if zero_stage == 2:
        weights = dtype_bytes * total
        grads = ((dtype_bytes + FP32) if mixed else FP32) * trainable // gpus
    else:
        weights = dtype_bytes * total // gpus + FP32 * largest_layer
        grads = FP32 * trainable // gpus
    optimizer = (master + ADAM_STATE_BYTES) * trainable // gpus
    if offload:
        grads, optimizer = 0, 0
    return {"weights": weights, "grads": grads, "optimizer": optimizer}


class _FusedAttentionStandIn(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient SDPA) keeps for backward: q, k, v, the output and
    the fp32 log-sum-exp per row, plus the additive mask when there is one. Used only on the meta device, where
    SDPA would otherwise fall back to the math path that keeps the whole attention matrix."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: meta only
        raise NotImplementedError


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    mask = attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None
    return _FusedAttentionStandIn.apply(query, key, value, mask)


def _saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of every tensor autograd keeps for backward in one forward (views counted once)."""
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        sizes[id(base)] = max(sizes.get(id(base), 0), base.numel() * base.element_size())
        return tensor

    with mock.patch.object(F, "scaled_dot_product_attention", _fused_sdpa), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(sizes.values())


def _text_batch(model: torch.nn.Module, micro_batch: int, length: int) -> dict[str, torch.Tensor]:
    """Embeddings in (the vision tower is frozen and keeps nothing for backward) and labels on every token; no
    padding mask (a full micro-batch, causal)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = family_for(base).text_dims(base.config).hidden_size
    dtype = next(model.parameters()).dtype
    return {"inputs_embeds": torch.empty(micro_batch, length, hidden, device="meta", dtype=dtype),
            "labels": torch.zeros(micro_batch, length, dtype=torch.long, device="meta")}


def activation_bytes(recipe: Recipe, folder: Path, backend: str) -> dict[str, Any]:
    """Activation bytes of one micro-batch of `data.max_length` tokens, with and without gradient checkpointing.

    Measured: the recipe's model with 1 and 2 text layers, LoRA attached as training attaches it, runs one forward
    on the meta device while a saved-tensors hook adds up what autograd keeps for backward (attention as a fused
    kernel keeps it). One layer's share is the difference, the rest (embeddings, LM head, loss) the remainder.
    Without checkpointing: rest + L x layer. With it (each decoder layer recomputed in backward): rest + L x the
    layer's input + one layer. Added on top, what the gated attention materialises: with the `sdpa` backend, per
    layer, q, k and v with every query head's K/V and the gate channel padded to a multiple of 8 (kept by the
    kernel for backward), and once per forward the additive (B, 1, Q, K) mask shared by every layer and head plus
    the (B, Q, K) boolean window mask; with `flex` the transient (B, Q, K) boolean mask its block mask is built
    from. The per-sample gate tensors are (B, L, H).
    """
    micro, length = recipe.train.micro_batch_size, recipe.data.max_length
    measured = []
    for layers in (1, 2):
        model = build_meta_model(recipe, folder, num_layers=layers)
        for module in model.modules():  # dynamic RoPE rescales on the max position (.item(), not on meta);
            if isinstance(getattr(module, "rope_type", None), str) and "dynamic" in module.rope_type:
                module.rope_type = "default"  # the tensors kept for backward are the same
        model = add_trainable(model, recipe)  # LoRA as training adds it; no gates (their masks: by formula)
        model.train()
        measured.append(_saved_bytes(model, _text_batch(model, micro, length)))
    layer, rest = measured[1] - measured[0], 2 * measured[0] - measured[1]
    config_model = build_meta_model(recipe, folder, num_layers=1)
    dims = family_for(config_model).text_dims(config_model.config)
    num_layers = _num_text_layers(recipe, folder)
    dtype_bytes = torch.finfo(_train_dtype(recipe)).bits // 8
    layer_input = micro * length * dims.hidden_size * dtype_bytes
    pairs = micro * length * length
    gates = micro * num_layers * dims.num_heads * FP32 * 3
    if backend == "sdpa":  # padded q, k, v per layer (the gate channel); one additive mask for every layer
        padded = dims.head_dim + 8 - dims.head_dim % 8
        gated_kept = 3 * micro * dims.num_heads * length * padded * dtype_bytes
        gated_transient = pairs * dtype_bytes + pairs
    else:
        gated_kept, gated_transient = 0, pairs
    without = rest + num_layers * (layer + gated_kept) + gated_transient + gates
    with_ckpt = rest + num_layers * layer_input + layer + gated_kept + gated_transient + gates
    return {"micro_batch": micro, "max_length": length, "attention_backend": backend,
            "gradient_checkpointing": recipe.train.gradient_checkpointing,
            "with_checkpointing": int(with_ckpt), "without_checkpointing": int(without),
            "per_layer": int(layer), "embeddings_head_loss": int(rest),
            "gated_attention_per_layer": int(gated_kept), "gated_attention_transient": int(gated_transient)}


def _num_text_layers(recipe: Recipe, folder: Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=recipe.model.trust_remote_code,
                                        local_files_only=True)
    return family_for_config(config).text_dims(config).num_layers


def family_for_config(config: Any):
    from visprune.modeling.families import FAMILIES

    return FAMILIES[config.model_type]


def flops_per_sample(recipe: Recipe, config: Any, vision_params: int) -> dict[str, int]:
    """Training FLOPs of one sample of `data.max_length` tokens with one image (the budget's layout).

    Language model: the dense prefill FLOPs plus the LM head (2 x hidden x vocab per token) for the forward;
    backward ~1x forward with LoRA (input gradients only; the frozen weights get none) or 2x in full fine-tuning;
    +1x forward recomputed with gradient checkpointing; +1x forward for the distillation teacher; the plan loss
    adds its forward, backward and recompute from `plan_loss.start` on (until `plan_select.at`, when set; its
    one-off scoring of candidate plans is left out). Vision tower: forward only,
    2 x its parameters per patch.
    """
    dims = dims_from_config(config)
    budget = default_layout(dims, system=recipe.budget.system_tokens, text=0)
    text = max(0, recipe.data.max_length - budget.system - budget.visual - budget.text_rows)
    layout = default_layout(dims, system=recipe.budget.system_tokens, text=text)
    tokens = layout.system + layout.visual + layout.text_rows
    vocab = config.text_config.vocab_size
    forward = float(prefill_flops(dims, layout)) + 2 * tokens * dims.hidden_size * vocab
    backward = (1.0 if recipe.lora is not None else 2.0) * forward
    recompute = forward if recipe.train.gradient_checkpointing else 0.0
    step = forward + backward + recompute
    teacher = forward if recipe.distill.enabled else 0.0
    # the plan loss runs from plan_loss.start on, until plan_select fixes the plan (then the one forward is the plan)
    plan_end = 1.0 if recipe.plan_select.at is None else recipe.plan_select.at
    plan = step * max(0.0, plan_end - recipe.plan_loss.start) if recipe.plan_loss.weight > 0 else 0.0
    patches = sum(rows * cols for rows, cols in layout.grids)
    vision = 2 * vision_params * patches
    total = step + teacher + plan + vision
    return {"flops_per_sample": int(total), "language_model_forward": int(forward), "vision_forward": int(vision),
            "tokens": tokens}


def dry_run(recipe: Recipe, recipe_path: str | os.PathLike | None = None, gpus: int | None = 1) -> dict[str, Any]:
    """Parameter counts, per-GPU memory and FLOPs of a recipe on `gpus` GPUs, without weights or training."""
    gpus = 1 if gpus is None else gpus
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    folder = find_config_folder(recipe, recipe_path)
    resolve_model_dims(str(folder))  # the config read bounded and checked first: errors name the file and key
    model = build_meta_model(recipe, folder)
    config = model.config
    model, gates, _ = prepare_model(model, recipe)
    counts = parameter_counts(model, gates, recipe)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision_params = sum(p.numel() for n, p in base.named_parameters() if "vision" in n or "visual" in n)
    dtype_bytes = torch.finfo(_train_dtype(recipe)).bits // 8
    stage = recipe.distributed.zero_stage
    states = model_state_bytes(counts["total_params"], counts["trainable_params"], counts["largest_layer_params"],
                               stage, gpus, recipe.distributed.offload_optimizer, dtype_bytes)
    backend = recipe.gates.backend if recipe.gates.backend != "auto" else "flex"  # auto picks flex on CUDA
    acts = activation_bytes(recipe, folder, backend)
    activations = acts["with_checkpointing" if recipe.train.gradient_checkpointing else "without_checkpointing"]
    per_gpu = {**states, "activations": activations}
    per_gpu["total"] = sum(per_gpu.values())
    flops = flops_per_sample(recipe, config, vision_params)
    return {"config": str(folder / CONFIG_FILE), "family": recipe.model.family, "gpus": gpus, "zero_stage": stage,
            "offload_optimizer": recipe.distributed.offload_optimizer,
            "dtype": "fp32" if dtype_bytes == FP32 else "bf16", **counts, "per_gpu_bytes": per_gpu,
            "activations": acts, "flops_per_sample": flops["flops_per_sample"], "flops": flops,
            "deepspeed_config": render_deepspeed_config(recipe)}


def format_dry_run(report: dict[str, Any]) -> str:
    gib = 2**30
    per_gpu, acts = report["per_gpu_bytes"], report["activations"]
    lines = [(f"dry run: {report['family']} from {report['config']}, {report['gpus']} GPU(s), "
              f"ZeRO-{report['zero_stage']}{' + optimizer offload' if report['offload_optimizer'] else ''}, "
              f"{report['dtype']}"),
             (f"parameters: total {report['total_params']:,}  trainable {report['trainable_params']:,}  "
              f"LoRA {report['lora_params']:,}  gates {report['gate_params']:,}  "
              f"projector {report['projector_params']:,}"),
             "per GPU:"]
    for key in ("weights", "grads", "optimizer", "activations", "total"):
        lines.append(f"  {key:<12}{per_gpu[key] / gib:>9.2f} GiB")
    lines.append(f"activations per micro-batch ({acts['micro_batch']} x {acts['max_length']} tokens, "
                 f"{acts['attention_backend']} gated attention): {acts['with_checkpointing'] / gib:.2f} GiB with "
                 f"gradient checkpointing, {acts['without_checkpointing'] / gib:.2f} GiB without "
                 f"(recipe: {'on' if acts['gradient_checkpointing'] else 'off'})")
    lines.append(f"training FLOPs per sample: {report['flops_per_sample'] / 1e12:.2f} TFLOPs")
    return "\n".join(lines)
