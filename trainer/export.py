"""Harden a training checkpoint: base model + LoRA (merged) + gates -> a plan within the budget,
exported as a plain HF folder (config.json, sharded *.safetensors, processor files whose chat template is
the one training used) with `pruning_plan.json` and `pruning_report.json`. Executing the plan fast is modeling's job."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from visprune.data_prep.templates import ChatTemplate, end_of_turn_ids, resolve_template
from visprune.modeling import (
    PLAN_FILE,
    GateConfig,
    GateProbs,
    GateSet,
    Plan,
    apply_plan,
    attach_gates,
    default_layout,
    detach_gates,
    flops_report,
)

from . import checkpoints as ckpt
from .config import Recipe, load_recipe
from .trainer import GATES_FILE, RECIPE_FILE, build_model, load_gate_state

logger = logging.getLogger(__name__)

REPORT_FILE = "pruning_report.json"


class HardenError(ValueError):
    """A checkpoint or plan that cannot be hardened; the message says why, with the numbers."""


def _load_full_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Full fine-tuning checkpoints hold the whole (gated) model; load them. Every weight of the
    language model (the family's `language_model`) must be there."""
    from visprune.modeling.families import family_for

    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise HardenError(f"{checkpoint} has neither adapter_model.safetensors nor model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    language_model = family_for(model).language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is language_model) + "."
    missing = [k for k in missing if k.startswith(prefix)]
    if missing:
        raise HardenError(f"{checkpoint}: weights missing for {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    logger.info("loaded %d tensors from %s (%d not in the model)", len(state), checkpoint, len(unexpected))


def build_report(gates: GateSet, plan: Plan, budget: float) -> dict[str, Any]:
    dims = gates.model_dims()
    layout = default_layout(dims)
    dense = flops_report(dims, layout)
    pruned = flops_report(dims, layout, GateProbs.from_plan(plan, dims.intermediate_size), window=plan.window)
    return {
        "budget": budget, "model": asdict(dims), "layout": layout.to_dict(), "window": plan.window,
        "visual_flops": {"dense": dense["visual_flops"], "pruned": pruned["visual_flops"],
                         "ratio": pruned["visual_flops"] / dense["visual_flops"]},
        "prefill_flops": {"dense": dense["prefill_flops"], "pruned": pruned["prefill_flops"],
                          "ratio": pruned["prefill_flops"] / dense["prefill_flops"]},
        "visual_kv_bytes": {"dense": dense["visual_kv_bytes"], "pruned": pruned["visual_kv_bytes"]},
        "heads_kept_per_layer": [len(layer.heads) for layer in plan.layers],
        "mlp_kept_per_layer": [layer.mlp for layer in plan.layers],
        "visual_layers_kept": sum(not layer.skipped for layer in plan.layers),
    }


def load_checkpoint(checkpoint: str | Path) -> tuple[torch.nn.Module, GateSet, Any, Recipe]:
    """A training checkpoint in memory: (base model with LoRA merged and gates attached, its GateSet,
    the processor, the recipe)."""
    checkpoint = Path(checkpoint)
    if ckpt.checkpoint_step(checkpoint) is not None or (checkpoint / ckpt.MARKER_FILE).exists():
        reason = ckpt.incomplete_reason(checkpoint)
        if reason:
            raise HardenError(f"{checkpoint} is not a complete checkpoint: {reason}")
    recipe: Recipe = load_recipe(checkpoint / RECIPE_FILE)
    model, processor = build_model(recipe)
    g = recipe.gates
    gates = attach_gates(model, GateConfig(heads=g.heads, visual_skip=g.visual_skip, visual_mlp=g.visual_mlp,
                                           window=recipe.window, init_log_alpha=g.init_log_alpha))
    if recipe.plan is not None:  # a fixed-plan run: its gates are the plan's
        apply_plan(model, Plan.from_json(recipe.plan))
    load_gate_state(gates, None, checkpoint / GATES_FILE)
    if (checkpoint / "adapter_model.safetensors").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    else:
        _load_full_weights(model, checkpoint)
    return model, gates, processor, recipe


def training_template_of(checkpoint: Path, recipe: Recipe, model: torch.nn.Module, processor: Any) -> ChatTemplate:
    """The chat template the checkpoint was trained with (its saved `visprune_template.json`; resolved from the
    recipe's `data.template` again for a checkpoint without one)."""
    saved = ChatTemplate.load(checkpoint)
    if saved is not None:
        return saved
    return resolve_template(processor, recipe.data.template, recipe.model.family, model.generation_config)


def stop_on_end_of_turn(generation_config: Any, processor: Any, template: ChatTemplate) -> None:
    """Add the template's end-of-turn token ids to `generation_config.eos_token_id`, so `generate()` stops
    where training taught the model to (chatml's `<|im_end|>` on a base checkpoint that stops on
    `<|endoftext|>`)."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    ids += [token_id for token_id in end_of_turn_ids(processor, template) if token_id not in ids]
    generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids


def harden(checkpoint: str | Path, out: str | Path, budget: float | None = None, plan_path: str | None = None,
           max_shard_size: str = "5GB") -> dict[str, Any]:
    """Export `checkpoint` hardened at `budget` (default: the recipe's) or with a given plan.

    Returns the report. Raises HardenError when a given plan's visual FLOPs exceed the budget.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    model, gates, processor, recipe = load_checkpoint(checkpoint)
    budget = recipe.budget.visual_flops if budget is None else budget
    if plan_path is None and recipe.plan is not None:
        plan_path = recipe.plan  # a fixed-plan run exports its plan
    if plan_path is None:
        plan = gates.to_plan(budget)
    else:
        plan = Plan.from_json(plan_path)
        dims = gates.model_dims()
        plan.validate_for(dims.num_layers, dims.num_heads, dims.intermediate_size)
    report = build_report(gates, plan, budget)
    ratio = report["visual_flops"]["ratio"]
    if ratio > budget + 1e-9:
        raise HardenError(f"the plan keeps {ratio:.4f} of the dense visual FLOPs "
                          f"({report['visual_flops']['pruned']:.4g} of {report['visual_flops']['dense']:.4g}), "
                          f"over the budget {budget}")
    template = training_template_of(checkpoint, recipe, model, processor)
    report["template"] = template.name
    detach_gates(model)  # plain module names and attention again: the folder is a standard HF model
    stop_on_end_of_turn(model.generation_config, processor, template)
    processor.chat_template = template.source  # `apply_chat_template` prompts exactly as training did
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    template.save(out)
    plan.to_json(out / PLAN_FILE)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    logger.info("hardened %s -> %s: %.2f%% of dense visual FLOPs (budget %.2f%%), %d of %d visual layers kept",
                checkpoint, out, 100 * ratio, 100 * budget, report["visual_layers_kept"], plan.num_layers)
    return report


__all__ = ["PLAN_FILE", "REPORT_FILE", "HardenError", "build_report", "harden", "load_checkpoint"]
