"""Typed builders of a run: the base model and processor (`from_pretrained`; remote code only when asked), gates
and LoRA on the family's paths (`prepare_model`), the DeepSpeed config, TrainingArguments and the collator."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, TrainingArguments, set_seed
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.processing import load_processor
from visprune.data_prep.templates import resolve_template
from visprune.modeling import GateSet, Plan, apply_plan, attach_gates
from visprune.modeling.families import family_for

from .config import Recipe, RecipeError, first_line
from .sparsity import SparsityController

logger = logging.getLogger(__name__)

SPARSITY_ATTR = "visprune_sparsity"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # `name` or `org/name`


def pick_dtype(recipe: Recipe) -> torch.dtype:
    if recipe.model.dtype == "bf16" or (recipe.model.dtype == "auto" and torch.cuda.is_available()):
        return torch.bfloat16
    return torch.float32


def build_model(recipe: Recipe, trust_remote_code: bool | None = None) -> tuple[nn.Module, Any]:
    """Load the base model and its processor with the stock `from_pretrained` (local or hub).

    Seeds every RNG first: LoRA and gate initialisation are then the same in every run of a recipe.

    Args:
        recipe: the run's recipe (`model.path`, `model.family`, `model.dtype`).
        trust_remote_code: let the model folder's own code run. None takes `model.trust_remote_code` of
            `recipe`, which `train` does with the recipe the user gave; `harden` passes its own flag, so a
            checkpoint's recipe never turns it on.

    Raises:
        FileNotFoundError: `model.path` names no model folder (the message names `model.path`).
        RecipeError: the model needs its own code and `trust_remote_code` is off.
        ValueError: the folder's model is not a `model.family` model.
    """
    cfg = recipe.model
    trust = cfg.trust_remote_code if trust_remote_code is None else trust_remote_code
    if not isinstance(trust, bool):  # a string "false" is truthy
        raise TypeError(f"trust_remote_code must be True or False, got {trust!r}")
    check_model_path(cfg.path)
    set_seed(recipe.train.seed)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            cfg.path, dtype=pick_dtype(recipe), attn_implementation="sdpa", trust_remote_code=trust)
    except OSError as exc:  # a hub id that does not resolve (offline, or no such repository)
        if os.path.isdir(cfg.path):
            raise
        raise FileNotFoundError(f"model.path {cfg.path}: not a local model folder, and no model of that name "
                                f"could be loaded from the hub ({first_line(exc)})") from exc
    except ValueError as exc:
        if trust or "trust_remote_code" not in str(exc):
            raise
        raise RecipeError(f"model.path {cfg.path} can only be loaded by running its own code (auto_map in its "
                          "config): if you trust it, set model.trust_remote_code: true (train) or pass "
                          "--trust-remote-code (harden)") from exc
    processor = load_processor(cfg.path, trust_remote_code=trust)
    if model.config.model_type != cfg.family:
        raise ValueError(f"model.family is {cfg.family!r} but {cfg.path} is a {model.config.model_type!r} model")
    return model, processor


def check_model_path(path: str) -> None:
    """Refuse a `model.path` that is not a model folder, unless it may be a hub id (`name` or `org/name`),
    which is left to `from_pretrained`.

    Raises:
        FileNotFoundError: naming `model.path`.
    """
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model.path {path}: not a model folder (no config.json)")
        return
    if os.path.exists(path):
        raise FileNotFoundError(f"model.path {path}: a file, not a model folder")
    if not _HUB_ID.fullmatch(path):
        raise FileNotFoundError(f"model.path {path}: no such folder")



def prepare_model(model: nn.Module, recipe: Recipe) -> tuple[nn.Module, GateSet, SparsityController]:
    """Attach gates and the sparsity controller, then `add_trainable` (freeze what is not trained, add LoRA).

    Trainable: LoRA adapters on the language model's linear layers (or the whole LM when
    `lora: null`), optionally the projector, the gates and the Lagrange multipliers. The family
    says where these are (`lora_target_regex`, `language_model`, `projector_paths`).
    """
    gates = attach_gates(model, recipe.gates)
    if recipe.plan is not None:  # fixed gates: fine-tune under a given plan (baselines, re-training)
        apply_plan(model, Plan.from_json(recipe.plan))
    controller = SparsityController(recipe.budget.visual_flops, recipe.budget.warmup_steps)
    setattr(model, SPARSITY_ATTR, controller.to(next(model.parameters()).device))

    model = add_trainable(model, recipe)
    # peft freezes raw parameters it does not know; gates and λ are always trained
    for param in list(gates.parameters()) + list(controller.parameters()):
        param.requires_grad = True
    return model, gates, controller


def add_trainable(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Freeze the model, then make trainable what the recipe trains: LoRA adapters on the language model's
    linear layers (peft; the projector as a trained copy with `model.train_projector`) or, with `lora: null`,
    the whole language model (and the projector). Returns the model (the peft model with LoRA)."""
    family = family_for(model)
    for name, param in model.named_parameters():
        param.requires_grad = False
    projector = list(family.projector_paths()) if recipe.model.train_projector else []
    if recipe.lora is not None:
        from peft import LoraConfig, get_peft_model

        check_lora_targets(model, family, recipe.lora.targets)
        peft_config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                                 target_modules=family.lora_target_regex(recipe.lora.targets),
                                 modules_to_save=projector or None)  # peft trains and saves a copy
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as exc:  # peft's own refusal of the targets or the projector
            raise RecipeError(f"lora: peft cannot add adapters with lora.targets {recipe.lora.targets}: "
                              f"{first_line(exc)}") from exc
    else:
        trained = [family.language_model(model)] + [model.get_submodule(path) for path in projector]
        for module in trained:
            for param in module.parameters():
                param.requires_grad = True
    return model


def check_lora_targets(model: nn.Module, family: Any, targets: list[str]) -> None:
    """Every name in `lora.targets` must select at least one layer (as peft matches the family's regex: in
    full, against module names); a typo would otherwise train fewer adapters than the recipe says.

    Raises:
        RecipeError: naming `lora.targets`, the names that match nothing and the language model's linear
            layers.
    """
    names = [name for name, _ in model.named_modules()]
    unmatched = [target for target in targets
                 if not any(re.fullmatch(family.lora_target_regex([target]), name) for name in names)]
    if unmatched:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in family.language_model(model).named_modules()
                         if isinstance(module, nn.Linear)})
        raise RecipeError(f"lora.targets: {', '.join(map(repr, unmatched))} "
                          f"{'matches' if len(unmatched) == 1 else 'match'} no layer of the language model "
                          f"(its linear layers: {', '.join(linear) or 'none'})")


def render_deepspeed_config(recipe: Recipe) -> dict[str, Any] | None:
    """DeepSpeed config for the recipe's ZeRO stage (HF "auto" values are filled by the Trainer)."""
    stage = recipe.distributed.zero_stage
    if stage == 0:
        return None
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    if recipe.distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    # check_grad_overflow: a bf16 step with a non-finite gradient is skipped (fp32 ZeRO skips on the norm)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto", "check_grad_overflow": True},
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True}


def build_training_args(recipe: Recipe, deepspeed_config: dict[str, Any] | None) -> TrainingArguments:
    t, o, opt = recipe.train, recipe.output, recipe.optim
    on_gpu = torch.cuda.is_available()
    # transformers 5.x reads the TensorBoard folder from this variable (TrainingArguments.logging_dir is gone)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(o.dir) / "tensorboard")
    return TrainingArguments(
        output_dir=o.dir, max_steps=t.max_steps, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=opt.lr, weight_decay=opt.weight_decay,
        lr_scheduler_type=opt.scheduler, warmup_steps=opt.warmup_ratio, max_grad_norm=opt.max_grad_norm,
        logging_steps=t.logging_steps, save_steps=o.save_steps,
        save_total_limit=None,  # VispruneTrainer rotates: only complete checkpoints count (output.save_total_limit)
        seed=t.seed, data_seed=t.seed, bf16=on_gpu and pick_dtype(recipe) == torch.bfloat16,
        use_cpu=not on_gpu, deepspeed=deepspeed_config, report_to=["tensorboard"],
        remove_unused_columns=False, dataloader_num_workers=recipe.data.num_workers,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5.x name of gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        ddp_find_unused_parameters=False, disable_tqdm=False,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random", length_column_name="length",
    )


def build_collator(recipe: Recipe, model: nn.Module, processor: Any) -> ChatCollator:
    """The run's collator: its chat template resolved from `data.template` for the model's family (the
    choice is logged), images inside `data.image_folder`."""
    template = resolve_template(processor, recipe.data.template, recipe.model.family, model.generation_config)
    logger.info("chat template: %s (data.template %s%s)", template.name, recipe.data.template,
                f": {template.reason}" if recipe.data.template == "auto" else "")
    return ChatCollator(processor, template, image_folder=recipe.data.image_folder,
                        max_length=recipe.data.max_length, drop_overlong=recipe.data.drop_overlong,
                        max_image_pixels=recipe.data.max_image_pixels)


__all__ = ["SPARSITY_ATTR", "build_collator", "build_model", "build_training_args", "check_lora_targets",
           "check_model_path", "pick_dtype", "prepare_model", "render_deepspeed_config"]
