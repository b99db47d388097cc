"""Harden a training checkpoint: base model + LoRA (merged) + gates -> a plan within the budget,
exported as a plain HF folder (config.json, sharded *.safetensors, processor files whose chat template is
the one training used) with `pruning_plan.json`, `pruning_report.json` and, written last, `visprune_export.json`.
The checkpoint is verified before it is read, its recipe never turns on remote code, and the export is staged
beside `--out` and renamed into place. Executing the plan fast is modeling's job."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from visprune.data_prep.files import fsync_dir, fsync_tree, write_atomic
from visprune.data_prep.templates import ChatTemplate, end_of_turn_ids, resolve_template
from visprune.modeling import (
    PLAN_FILE,
    GateSet,
    Plan,
    TokenLayout,
    apply_plan,
    attach_gates,
    default_layout,
    detach_gates,
)
from visprune.modeling.flops import plan_report
from visprune.modeling.plan import read_json_file, window_value

from . import checkpoints as ckpt
from .build import build_model
from .config import Recipe, first_line, load_recipe
from .gate_state import GATES_FILE, load_gate_state, stored_gate_config
from .plan_select import PlanSelection, select_plan
from .run_folder import FINAL_DIR, PLAN_CHOICE_FILE, PLAN_CHOICE_MAX_BYTES, RECIPE_FILE, STATE_FILE

logger = logging.getLogger(__name__)

REPORT_FILE = "pruning_report.json"
EXPORT_MARKER = "visprune_export.json"  # written last: this folder is harden's (and complete)
EXPORT_FORMAT = "visprune-export/1"


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


def build_report(gates: GateSet, plan: Plan, budget: float, layout: TokenLayout | None = None) -> dict[str, Any]:

    dims = gates.model_dims()
    layout = layout or default_layout(dims)
    report = plan_report(dims, layout, plan)
    dense, pruned = report["dense"], report["plan"]
    return {
        "budget": budget, "model": asdict(dims), "layout": layout.to_dict(), "window": window_value(plan.window, plan.temporal_window),
        "visual_flops": {"dense": dense["visual_flops"], "pruned": pruned["visual_flops"],
                         "ratio": report["visual_flops_ratio"]},
        "prefill_flops": {"dense": dense["prefill_flops"], "pruned": pruned["prefill_flops"],
                          "ratio": report["prefill_flops_ratio"]},
        "visual_kv_bytes": {"dense": dense["visual_kv_bytes"], "pruned": pruned["visual_kv_bytes"]},
        "heads_kept_per_layer": [len(layer.heads) for layer in plan.layers],
        "mlp_kept_per_layer": [layer.mlp for layer in plan.layers],
        "visual_layers_kept": sum(not layer.skipped for layer in plan.layers),
    }


def verify_checkpoint(checkpoint: str | Path) -> Path:
    """Check a checkpoint folder before anything in it is read: it exists, and a `checkpoint-N` or `final`
    folder, or any folder with a marker, verifies against its marker (sizes and sha256 of every file).

    Raises:
        FileNotFoundError: no such folder.
        HardenError: incomplete or corrupted, naming the file.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such folder")
    named = ckpt.checkpoint_step(checkpoint) is not None or checkpoint.name == FINAL_DIR
    if named or (checkpoint / ckpt.MARKER_FILE).exists():
        reason = ckpt.incomplete_reason(checkpoint)
        if reason:
            raise HardenError(f"{checkpoint} is not a complete checkpoint: {reason}")
    if not (checkpoint / RECIPE_FILE).is_file():
        raise HardenError(f"{checkpoint} is not a training checkpoint (no {RECIPE_FILE})")
    steps, skipped = _steps_and_skips(checkpoint)
    if steps and skipped >= steps:
        raise HardenError(f"{checkpoint}: every one of its {steps} optimizer steps was skipped as non-finite, so it "
                          "holds the untrained weights; fix the run (see its log) and harden a later checkpoint")
    return checkpoint


def _steps_and_skips(checkpoint: Path) -> tuple[int, int]:
    """(optimizer steps, steps skipped as non-finite) a checkpoint records; (0, 0) when it does not say."""
    try:
        steps = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("global_step", 0)
        skipped = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")).get("skipped_steps", 0)
    except (OSError, ValueError, AttributeError):
        return 0, 0
    return (steps, skipped) if isinstance(steps, int) and isinstance(skipped, int) else (0, 0)


def checkpoint_recipe(checkpoint: Path, trust_remote_code: bool) -> Recipe:
    """The recipe a checkpoint was trained with, refused when it asks for remote code the caller did not allow:
    a checkpoint someone handed you must not run its model folder's code unless you say so.

    Raises:
        HardenError: the recipe says `model.trust_remote_code: true` and `trust_remote_code` is False.
    """
    recipe: Recipe = load_recipe(checkpoint / RECIPE_FILE)
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise HardenError(f"{checkpoint / RECIPE_FILE} says model.trust_remote_code: true, which a checkpoint cannot "
                          f"turn on: pass --trust-remote-code if you trust the code in {recipe.model.path}")
    return recipe


def load_checkpoint(checkpoint: str | Path, trust_remote_code: bool = False
                    ) -> tuple[torch.nn.Module, GateSet, Any, Recipe]:
    """A training checkpoint in memory: (base model with LoRA merged and gates attached, its GateSet,
    the processor, the recipe).

    Args:
        checkpoint: a `checkpoint-N` or `final` folder of `visprune train` (verified first).
        trust_remote_code: let the base model folder's own code run; only ever from the caller, never from
            the checkpoint's recipe.

    Raises:
        FileNotFoundError: no such checkpoint, or its recipe's `model.path` does not exist.
        HardenError: incomplete or corrupted checkpoint, or its recipe asks for remote code not allowed here.
        CheckpointError: its adapter or gates do not fit the base model (naming the file and tensor).
    """
    checkpoint = verify_checkpoint(checkpoint)
    recipe = checkpoint_recipe(checkpoint, trust_remote_code)
    return (*_build_from_checkpoint(checkpoint, recipe, trust_remote_code), recipe)


def _build_from_checkpoint(checkpoint: Path, recipe: Recipe, trust_remote_code: bool
                           ) -> tuple[torch.nn.Module, GateSet, Any]:
    model, processor = build_model(recipe, trust_remote_code=trust_remote_code)
    # the gate config the checkpoint's gates were trained with (an older checkpoint: its recipe's)
    gates = attach_gates(model, stored_gate_config(checkpoint / GATES_FILE) or recipe.gates)
    if recipe.plan is not None:  # a fixed-plan run: its gates are the plan's
        apply_plan(model, Plan.from_json(recipe.plan))
    load_gate_state(gates, None, checkpoint / GATES_FILE)
    if (checkpoint / "adapter_model.safetensors").is_file():
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
        except RuntimeError as exc:  # torch's "size mismatch for <tensor>: ..." lines
            lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
            raise ckpt.CheckpointError(f"{checkpoint / 'adapter_model.safetensors'} does not fit {recipe.model.path}: "
                                       f"{lines[0] if lines else first_line(exc)}") from exc
    else:
        _load_full_weights(model, checkpoint)
    return model, gates, processor



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


def _plan_choice(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's `plan_select.json` (a run whose `plan_select` fixed its plan), or None."""
    path = checkpoint / PLAN_CHOICE_FILE
    if not path.is_file():
        return None
    choice = read_json_file(path, PLAN_CHOICE_MAX_BYTES, "plan choice", HardenError)
    if isinstance(choice, dict) and "finalists" in choice and "plan" not in choice:
        raise HardenError(f"{checkpoint} was saved while plan_select trained its finalists in turn (from step "
                          f"{choice.get('step')}): no plan was chosen yet; harden a later checkpoint (or give --plan)")
    if not isinstance(choice, dict) or not {"plan", "budget", "step"} <= choice.keys():
        raise HardenError(f"{path}: not a plan choice visprune wrote (keys plan, budget, step)")
    return choice


def harden(checkpoint: str | Path, out: str | Path, budget: float | None = None, plan_path: str | None = None,
           max_shard_size: str = "5GB", *, trust_remote_code: bool = False, overwrite: bool = False,
           fill: bool = False, select: PlanSelection | None = None) -> dict[str, Any]:
    """Export `checkpoint` hardened at `budget` (default: the recipe's) or with a given plan, into `out`.

    The folder is written beside `out` and renamed into place at the end (a crash leaves the old `out` or
    the new one); `visprune_export.json` is written last and marks it as harden's.

    Args:
        checkpoint: a `checkpoint-N` or `final` folder of `visprune train` (verified before it is read).
        out: the output folder; must not exist or be empty, unless `overwrite`.
        budget: visual-FLOPs fraction to keep; default the recipe's `budget.visual_flops`.
        plan_path: a pruning_plan.json to export instead of the gates' top-k (checked against `budget`).
        max_shard_size: largest weight shard.
        trust_remote_code: let the base model folder's code run; a checkpoint's recipe never turns it on.
        overwrite: replace `out` when it is a folder harden wrote (it holds `visprune_export.json`).
        fill: harden with `GateSet.to_plan`'s fill rule (use the budget; not monotone across budgets)
            instead of its prefix rule; ignored with a plan.
        select: choose among the gates' plan and plans drawn from the trained gates by their loss on a few
            held-out samples (`plan_select.select_plan`); ignored with a plan.

    Returns:
        The report (also written as `pruning_report.json`).

    Raises:
        HardenError: a checkpoint that is incomplete or corrupted or asks for remote code, a plan over the
            budget, or an `out` that is not empty (without `overwrite`), not harden's, or overlaps the
            checkpoint, its run folder or the base model folder.
    """
    if budget is not None and not 0.0 < budget <= 1.0:
        raise HardenError(f"budget must be in (0, 1], got {budget}")
    checkpoint = verify_checkpoint(checkpoint)
    recipe = checkpoint_recipe(checkpoint, trust_remote_code)
    check_output_folder(out, checkpoint, recipe, overwrite)
    select_rows = select.rows() if select is not None and plan_path is None and recipe.plan is None else None
    out = Path(os.path.realpath(out))  # a symlinked `out` keeps pointing at the new folder
    choice = _plan_choice(checkpoint) if plan_path is None and recipe.plan is None else None
    if choice is not None and budget is not None and abs(budget - choice["budget"]) > 1e-6:
        raise HardenError(f"{checkpoint} trained one plan fixed from step {choice['step']} (plan_select) at the "
                          f"budget {choice['budget']:.4g}: harden it at that budget (or give --plan)")
    model, gates, processor = _build_from_checkpoint(checkpoint, recipe, trust_remote_code)
    budget = recipe.budget.visual_flops if budget is None else budget
    if plan_path is None and recipe.plan is not None:
        plan_path = recipe.plan  # a fixed-plan run exports its plan
    template = training_template_of(checkpoint, recipe, model, processor)
    layout = recipe.budget.layout(gates.model_dims())
    selection = None
    if choice is not None:  # the plan training chose and then trained fixed (its gates are committed to it)
        plan, rule = Plan.from_json(choice["plan"]), "selected in training"
        selection = {k: v for k, v in choice.items() if k != "plan"}
    elif plan_path is None and select is not None:
        plan, selection = select_plan(model, gates, budget, fill, select, processor, template,
                                      recipe.data.max_length, layout, rows=select_rows)
        rule = ("fill" if fill else "prefix") + ", selected"
    elif plan_path is None:
        plan, rule = gates.to_plan(budget, layout, fill=fill), ("fill" if fill else "prefix")
    else:
        rule = "given"
        plan = Plan.from_json(plan_path)
        dims = gates.model_dims()
        plan.validate_for(dims.num_layers, dims.num_heads, dims.intermediate_size, family=dims.family)
    report = build_report(gates, plan, budget, layout)
    report["plan_rule"] = rule
    if selection is not None:
        report["plan_selection"] = selection
    ratio = report["visual_flops"]["ratio"]
    if ratio > budget + 1e-9:
        raise HardenError(f"the plan keeps {ratio:.4f} of the dense visual FLOPs "
                          f"({report['visual_flops']['pruned']:.4g} of {report['visual_flops']['dense']:.4g}), "
                          f"over the budget {budget}")
    report["template"] = template.name
    detach_gates(model)  # plain module names and attention again: the folder is a standard HF model
    stop_on_end_of_turn(model.generation_config, processor, template)
    processor.chat_template = template.source  # `apply_chat_template` prompts exactly as training did
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.harden-", dir=out.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        template.save(staging)
        plan.to_json(staging / PLAN_FILE)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        fsync_tree(staging)
        write_atomic(staging / EXPORT_MARKER, json.dumps({
            "format": EXPORT_FORMAT, "checkpoint": str(checkpoint.resolve()), "budget": budget,
            "files": {path.name: path.stat().st_size for path in sorted(staging.iterdir()) if path.is_file()}},
            indent=1) + "\n")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("hardened %s -> %s: %.2f%% of dense visual FLOPs (budget %.2f%%), %d of %d visual layers kept",
                checkpoint, out, 100 * ratio, 100 * budget, report["visual_layers_kept"], plan.num_layers)
    return report


def check_output_folder(out: str | Path, checkpoint: Path, recipe: Recipe, overwrite: bool) -> None:
    """Refuse an output folder harden must not write: one that overlaps (is, is inside or holds) the checkpoint,
    its run folder or the base model folder (paths resolved); a file; a non-empty folder without `overwrite`;
    with `overwrite`, a folder harden did not write (no `visprune_export.json`).

    Raises:
        HardenError: naming `out` and the reason.
    """
    resolved = Path(os.path.realpath(out))
    protected = [("the checkpoint", checkpoint)]
    if ckpt.checkpoint_step(checkpoint) is not None or checkpoint.name == FINAL_DIR:
        protected.append(("the checkpoint's run folder", checkpoint.parent))
    if os.path.isdir(recipe.model.path):
        protected.append(("the base model folder (the checkpoint's model.path)", Path(recipe.model.path)))
    for what, folder in protected:
        folder = Path(os.path.realpath(folder))
        if resolved == folder or folder in resolved.parents or resolved in folder.parents:
            relation = "is" if resolved == folder else "is inside" if folder in resolved.parents else "holds"
            raise HardenError(f"--out {out} {relation} {what} {folder}: harden never writes there; choose another "
                              "output folder")
    if not resolved.exists():
        return
    if not resolved.is_dir():
        raise HardenError(f"--out {out} exists and is not a folder")
    if not any(resolved.iterdir()):
        return
    if not overwrite:
        raise HardenError(f"--out {out} exists and is not empty (--overwrite replaces a folder visprune harden wrote)")
    if not (resolved / EXPORT_MARKER).is_file():
        raise HardenError(f"--out {out} was not written by visprune harden (no {EXPORT_MARKER}): refusing to replace "
                          "it, even with --overwrite")


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished `staging` folder to `out`. An existing `out` (empty, or harden's) is swapped with it
    in one atomic exchange where the system has one (Linux renameat2), so a crash leaves the old folder or
    the new one; elsewhere it is moved aside first (a crash between the two renames leaves both on disk,
    beside `out`). The old folder is deleted last."""
    if not out.exists():
        os.replace(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging)  # now the old folder
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old)
    fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


__all__ = ["EXPORT_MARKER", "PLAN_FILE", "REPORT_FILE", "HardenError", "build_report", "check_output_folder",
           "checkpoint_recipe", "harden", "load_checkpoint", "verify_checkpoint"]
