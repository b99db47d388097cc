"""The Trainer subclass and the typed builders around it: model + gates + LoRA, DeepSpeed config,
TrainingArguments, and the loss (LM + optional self-distillation + Lagrangian FLOPs constraint); `train` runs
one recipe in its run folder, which holds one run (never two runs or two recipes mixed)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageTextToText, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import TrainerCallback
from visprune.data_prep.collator import LlavaCollator
from visprune.data_prep.files import fsync_dir
from visprune.data_prep.prepared import check_prepared_matches
from visprune.data_prep.processing import load_processor
from visprune.data_prep.records import DataError, build_dataset
from visprune.data_prep.templates import ChatTemplate, resolve_template
from visprune.modeling import GateConfig, GateSet, Plan, apply_plan, attach_gates, default_layout
from visprune.modeling.families import family_for

from . import checkpoints as ckpt
from .config import Recipe, RecipeError, load_recipe, read_recipe_mapping, recipe_to_dict, save_recipe
from .sparsity import ExpectedFlops, SparsityController

logger = logging.getLogger(__name__)

GATES_FILE = "gates.safetensors"
RECIPE_FILE = "recipe.yaml"
FINAL_DIR = "final"  # RUN_DIR/final: the adapter (or model), gates and recipe after the last step
STATE_FILE = "visprune_state.json"  # skipped-step counters, beside trainer_state.json
SPARSITY_ATTR = "visprune_sparsity"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # `name` or `org/name`


# ---- builders ------------------------------------------------------------------------------------
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
                                f"could be loaded from the hub ({_first_line(exc)})") from exc
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def prepare_model(model: nn.Module, recipe: Recipe) -> tuple[nn.Module, GateSet, SparsityController]:
    """Freeze what is not trained, attach gates and the sparsity controller, add LoRA (peft).

    Trainable: LoRA adapters on the language model's linear layers (or the whole LM when
    `lora: null`), optionally the projector, the gates and the Lagrange multipliers. The family
    says where these are (`lora_target_regex`, `language_model`, `projector_paths`).
    """
    family = family_for(model)
    gates = attach_gates(model, recipe.gates)
    if recipe.plan is not None:  # fixed gates: fine-tune under a given plan (baselines, re-training)
        apply_plan(model, Plan.from_json(recipe.plan))
    controller = SparsityController(recipe.budget.visual_flops, recipe.budget.warmup_steps)
    setattr(model, SPARSITY_ATTR, controller.to(next(model.parameters()).device))

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
                              f"{_first_line(exc)}") from exc
    else:
        trained = [family.language_model(model)] + [model.get_submodule(path) for path in projector]
        for module in trained:
            for param in module.parameters():
                param.requires_grad = True
    # peft freezes raw parameters it does not know; gates and λ are always trained
    for param in list(gates.parameters()) + list(controller.parameters()):
        param.requires_grad = True
    return model, gates, controller


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


# ---- the Trainer ----------------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient (`train.stop_after_nonfinite`)."""


class VispruneTrainer(Trainer):
    """transformers.Trainer with the visprune loss, parameter groups and checkpoint extras.

    loss = LM loss + distill.weight * KL(dense teacher || student) on answer tokens
           + λ1(ŝ − t) + λ2(ŝ − t)²

    Checkpoints are complete or invisible (see `checkpoints`); a step whose loss or gradient is not
    finite is skipped and counted, and `train.stop_after_nonfinite` such steps in a row stop the run.
    """

    def __init__(self, *args, recipe: Recipe, gates: GateSet, controller: SparsityController,
                 template: ChatTemplate | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recipe, self.gates, self.controller, self.template = recipe, gates, controller, template
        dims = gates.model_dims()
        layout = default_layout(dims, system=recipe.budget.system_tokens, text=recipe.budget.text_tokens)
        self.expected_flops = ExpectedFlops(dims, layout, recipe.window)
        self.loss_is_scaled_for_ga = False  # every term is a per-micro-batch mean: the Trainer divides by GA
        self._metrics: dict[str, float] = {}
        self._metric_count = 0
        self._constant_lr_groups: list[int] = []
        self._staging_root: str | None = None
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.nonfinite_in_a_row = 0
        self.last_grad_norm: torch.Tensor | float | None = None  # this step's, before clipping (NonFiniteGuard)
        self.add_callback(GateHeatmapCallback(self))
        self.add_callback(NonFiniteGuard(self))

    # -- optimizer: LoRA / LM, gates, λ each with their own group ---------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model
        opt = self.recipe.optim
        special = {id(p) for p in self.gates.parameters()} | {id(p) for p in self.controller.parameters()}
        decay_names = set(self.get_decay_parameter_names(model))
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad and id(param) not in special:
                (decay if name in decay_names else no_decay).append(param)
        groups = [{"params": decay, "lr": opt.lr, "weight_decay": opt.weight_decay},
                  {"params": no_decay, "lr": opt.lr, "weight_decay": 0.0},
                  {"params": list(self.gates.parameters()), "lr": opt.gate_lr, "weight_decay": 0.0,
                   "betas": (opt.gate_momentum, 0.999)},
                  {"params": list(self.controller.parameters()), "lr": opt.lambda_lr, "weight_decay": 0.0,
                   "betas": (opt.lambda_momentum, 0.999)}]
        groups = [g for g in groups if g["params"]]
        # by index: ZeRO flattens each group but keeps their order
        self._constant_lr_groups = [idx for idx, g in enumerate(groups) if any(id(p) in special for p in g["params"])]
        self.optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(0.9, 0.999), eps=1e-8)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The recipe's schedule (cosine + warm-up) for LoRA / LM weights; gates and λ keep a constant
        learning rate so the constraint can act until the last step (as in CoFi)."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is None or len(lambdas) != len(scheduler.optimizer.param_groups):
            raise RuntimeError(f"cannot give gates a constant learning rate with {type(scheduler).__name__}")
        for idx in self._constant_lr_groups:
            lambdas[idx] = _constant_lr
            scheduler.optimizer.param_groups[idx]["lr"] = scheduler.base_lrs[idx]
        return scheduler

    # -- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        vision_anchor = self._vision_anchor(model, inputs)
        outputs = model(**inputs)
        lm_loss = outputs.loss
        loss = lm_loss + vision_anchor
        metrics: dict[str, float] = {"loss_lm": float(lm_loss.detach())}

        if self.recipe.distill.enabled:
            kl = self.distillation_loss(model, inputs, outputs.logits)
            loss = loss + self.recipe.distill.weight * kl
            metrics["loss_distill"] = float(kl.detach())

        probs = self.gates.last_probs
        if probs is not None and self.gates.learnable():
            expected = self.expected_flops(probs)
            penalty = self.controller(expected, self.state.global_step)
            loss = loss + penalty
            effective = probs.layer[:, None] * probs.head
            metrics.update({
                "loss_lagrangian": float(penalty.detach()), "expected_visual_flops": float(expected.detach()),
                "target_visual_flops": self.controller.target_at(self.state.global_step),
                "lambda_1": self.controller.last_lambdas[0], "lambda_2": self.controller.last_lambdas[1],
                "open_heads": float((effective > 0.5).sum()), "open_layers": float((probs.layer > 0.5).sum()),
            })
        if not bool(torch.isfinite(loss.detach())):
            # every gradient is made non-finite too (NaN * anything is NaN), so the optimizer step is skipped,
            # by NonFiniteGuard or by DeepSpeed's overflow check, on every rank alike; the graph is unchanged
            logger.warning("step %d: non-finite loss (%s); the step will be skipped", self.state.global_step + 1,
                           ", ".join(f"{key}={value:.4g}" for key, value in metrics.items()))
            loss = loss * float("nan")
        elif model.training:
            for key, value in metrics.items():
                self._metrics[key] = self._metrics.get(key, 0.0) + value
            self._metric_count += 1
        return (loss, outputs) if return_outputs else loss

    def _vision_anchor(self, model, inputs) -> torch.Tensor:
        """A text-only batch still runs the vision tower (zero-weighted): ZeRO-3 hangs when ranks skip it."""
        if "pixel_values" in inputs:
            return torch.zeros((), device=inputs["input_ids"].device)
        base = _base_model(model)
        family = family_for(base)
        dummy = family.vision_inputs(base, inputs["input_ids"].device)  # the family's smallest image
        features = family.image_features(base, dummy)
        return 0.0 * torch.cat(list(features)).float().sum()

    def distillation_loss(self, model, inputs, student_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) on answer tokens; the teacher is this model with adapters disabled
        and every gate open (no second copy of the weights)."""
        peft_model = _unwrap(model)  # the peft model, also inside a DeepSpeed engine
        if not hasattr(peft_model, "disable_adapter"):
            raise ValueError("distill.enabled needs LoRA (the teacher is the model with adapters disabled)")
        temperature = self.recipe.distill.temperature
        with torch.no_grad(), peft_model.disable_adapter(), self.gates.open_all():
            teacher_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        answer = inputs["labels"][:, 1:] != -100  # logits at i predict token i + 1
        if not answer.any():
            return student_logits.sum() * 0.0
        student = F.log_softmax(student_logits[:, :-1][answer].float() / temperature, dim=-1)
        teacher = F.log_softmax(teacher_logits[:, :-1][answer].float() / temperature, dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2

    # -- logging ------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metric_count and "loss" in logs:
            for key, value in self._metrics.items():
                logs[f"visprune/{key}"] = round(value / self._metric_count, 6)
            self._metrics, self._metric_count = {}, 0
            groups = self.optimizer.param_groups if self.optimizer is not None else []
            if len(groups) >= 2 and len(self._constant_lr_groups) == 2:
                gate_idx, lambda_idx = self._constant_lr_groups
                logs["visprune/lr_gates"] = groups[gate_idx]["lr"]
                logs["visprune/lr_lambda"] = groups[lambda_idx]["lr"]
        if "loss" in logs:
            logs["visprune/skipped_steps"] = self.skipped_steps
        super().log(logs, start_time)

    # -- checkpoints: gates, λ and the recipe beside the adapter; complete or invisible ------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter (or model), gates.safetensors and recipe.yaml; refuses non-finite weights and checks
        what it wrote (every trainable tensor present, non-empty, with its shape)."""
        self._check_finite_weights()
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        tensors = gate_state_dict(self.gates, self.controller)  # collective under ZeRO-3
        if self.args.should_save:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_file(tensors, os.path.join(output_dir, GATES_FILE), metadata=gate_metadata(self.gates))
            save_recipe(self.recipe, os.path.join(output_dir, RECIPE_FILE))
            if self.template is not None:
                self.template.save(output_dir)
            check_saved_tensors(output_dir, expected_tensor_shapes(self.model), self.gates, self.controller)

    def _get_train_sampler(self, train_dataset=None):
        """With `train.group_by_length`: transformers' LengthGroupedSampler on the prepared folder's `length`
        column (read in one go: indexing the lazy column per row takes minutes at 665K), seeded by the
        recipe so a resumed run sees the same order."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler
        from visprune.data_prep.prepared import prepared_lengths

        lengths = prepared_lengths(self.train_dataset if train_dataset is None else train_dataset)
        if lengths is None:
            raise DataError("train.group_by_length needs a prepared dataset (data.path: a `visprune data prepare` "
                            "folder), which stores every sample's length")
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths,
                                    generator=torch.Generator().manual_seed(self.args.data_seed or self.args.seed))

    def _get_grad_norm(self, model, grad_norm=None):
        self.last_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)  # the norm before clipping
        return self.last_grad_norm

    def train(self, *args, **kwargs):
        with ckpt.deepspeed_weights_only():  # resuming a ZeRO checkpoint unpickles no code
            return super().train(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        return self._staging_root if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint (model, optimizer, scheduler, RNG, trainer state), written into
        RUN_DIR/.staging/checkpoint-N, fsync'ed, marked complete, renamed to RUN_DIR/checkpoint-N;
        then the oldest complete checkpoints beyond output.save_total_limit are deleted."""
        run_dir, step = self.args.output_dir, self.state.global_step
        staging = ckpt.staging_folder(run_dir, step)
        if self.args.should_save:
            ckpt.clear_staging(run_dir, step)
        self.accelerator.wait_for_everyone()
        self._staging_root = str(staging.parent)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        if self.args.should_save:
            (staging / STATE_FILE).write_text(json.dumps({"skipped_steps": self.skipped_steps,
                                                          "nonfinite_in_a_row": self.nonfinite_in_a_row}))
        self.accelerator.wait_for_everyone()  # every rank's files (ZeRO partitions, RNG states) are written
        if self.args.should_save:
            ckpt.publish(staging, Path(run_dir) / f"checkpoint-{step}", step)
            ckpt.rotate(run_dir, self.recipe.output.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_gate_state(self.gates, self.controller, os.path.join(resume_from_checkpoint, GATES_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        state = Path(checkpoint or "") / STATE_FILE
        if checkpoint and state.is_file():
            data = json.loads(state.read_text())
            self.skipped_steps, self.nonfinite_in_a_row = data["skipped_steps"], data["nonfinite_in_a_row"]

    def _check_finite_weights(self) -> None:
        """Raise before anything is written when a trainable tensor holds NaN or inf (every rank agrees)."""
        bad = [name for name, p in self.model.named_parameters()
               if p.requires_grad and not bool(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all())]
        flag = torch.tensor([float(bool(bad))])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            raise NonFiniteError(f"refusing to save non-finite weights at step {self.state.global_step}: "
                                 f"{bad[:5] or 'on another rank'}")


def _constant_lr(step: int) -> float:
    return 1.0


class NonFiniteGuard(TrainerCallback):
    """Skips optimizer steps whose gradient is not finite, counts them, and stops the run after
    `train.stop_after_nonfinite` in a row.

    Without DeepSpeed the gradients and their pre-clipping norm are checked before the step (DDP has already
    averaged them, so every rank decides alike; a norm that overflows is non-finite too: clipping by it
    would zero every gradient); a bad step's gradients are dropped, so AdamW leaves parameters and moments
    as they were, and the learning-rate schedule does not advance. Under DeepSpeed the engine's own
    overflow check skips the step, and `was_step_applied()` tells. A non-finite loss reaches here as
    non-finite gradients (see `compute_loss`).
    """

    def __init__(self, trainer: VispruneTrainer) -> None:
        self.trainer = trainer
        self.skipped = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled:
            return
        params = [p for p in self.trainer.model.parameters() if p.grad is not None]
        norm, self.trainer.last_grad_norm = self.trainer.last_grad_norm, None
        if not params:
            self.skipped = False
            return
        finite = [torch.isfinite(p.grad).all() for p in params]
        if isinstance(norm, torch.Tensor):
            finite.append(torch.isfinite(norm).all().to(finite[0].device))
        elif norm is not None:
            finite.append(torch.tensor(math.isfinite(norm), device=finite[0].device))
        self.skipped = not bool(torch.stack(finite).all())  # one host sync per step, not one per parameter
        if self.skipped:
            for p in params:
                p.grad = None  # AdamW leaves a parameter without a gradient untouched

    def on_optimizer_step(self, args, state, control, **kwargs):
        optimizer = self.trainer.optimizer
        if not self.trainer.is_deepspeed_enabled and getattr(optimizer, "scaler", None) is None \
                and hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = self.skipped  # accelerate: the scheduler does not step after a skipped step

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:
            self.skipped = not trainer.model_wrapped.was_step_applied()
        if not self.skipped:
            trainer.nonfinite_in_a_row = 0
            return
        self.skipped = False
        trainer.skipped_steps += 1
        trainer.nonfinite_in_a_row += 1
        limit = trainer.recipe.train.stop_after_nonfinite
        logger.warning("step %d skipped: non-finite loss or gradient (%d in a row, %d in all; the run stops at %d "
                       "in a row)", state.global_step, trainer.nonfinite_in_a_row, trainer.skipped_steps, limit)
        if trainer.nonfinite_in_a_row >= limit:
            last = ckpt.latest_complete(args.output_dir)
            raise NonFiniteError(
                f"{limit} optimizer steps in a row (up to step {state.global_step}) had a non-finite loss or gradient "
                f"(train.stop_after_nonfinite={limit}); nothing was saved from them. Last complete checkpoint: "
                f"{last or 'none'}. Lower optim.lr / optim.gate_lr, check the data, or train in fp32.")


class GateHeatmapCallback(TrainerCallback):
    """Clamps gate log_alpha after each optimizer step and writes an L x H image of head-gate
    probabilities to TensorBoard every `output.heatmap_steps` steps (rank 0)."""

    def __init__(self, trainer: VispruneTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.gates.constrain_()

    def on_step_end(self, args, state, control, **kwargs):
        every = self.trainer.recipe.output.heatmap_steps
        probs = self.trainer.gates.last_probs
        if not state.is_world_process_zero or probs is None or every <= 0 or state.global_step % every:
            return
        writer = _tensorboard_writer(self.trainer)
        if writer is None:
            return
        effective = (probs.layer[:, None] * probs.head).detach().float().cpu().clamp(0, 1)  # (L, H)
        writer.add_image("visprune/head_gate_prob", effective[None], state.global_step, dataformats="CHW")
        writer.flush()


def _tensorboard_writer(trainer: Trainer):
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            return callback.tb_writer
    return None


# ---- gate state ------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _base_model(model: nn.Module) -> nn.Module:
    model = _unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _gathered(params: list[nn.Parameter]):
    """Context that makes ZeRO-3 partitioned parameters whole (a no-op otherwise)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def gate_state_dict(gates: GateSet, controller: SparsityController) -> dict[str, torch.Tensor]:
    """Gate log_alpha tensors and λ as plain CPU float32 tensors (gathered under ZeRO-3)."""
    named = {f"gates.{n}": p for n, p in gates.named_parameters()}
    named.update({f"sparsity.{n}": p for n, p in controller.named_parameters()})
    with _gathered(list(named.values())):
        tensors = {name: p.detach().float().cpu().clone().contiguous() for name, p in named.items()}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            raise RuntimeError(f"gate tensor {name} is empty after gathering; refusing to save it")
    return tensors


def gate_metadata(gates: GateSet) -> dict[str, str]:
    return {"format": "visprune-gates/1", "family": gates.family, "window": json.dumps(gates.window),
            "dims": json.dumps(asdict(gates.dims)), "config": json.dumps(asdict(gates.cfg))}


def stored_gate_config(path: str | os.PathLike) -> GateConfig | None:
    """The GateConfig saved beside trained gates (`gates.safetensors` metadata `config`), the one hardening
    rebuilds the gates with; None for a file without one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        stored = (handle.metadata() or {}).get("config")
    if stored is None:
        return None
    try:
        return GateConfig(**json.loads(stored))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: its stored gate config is not one this visprune reads: {exc}") from exc


def load_gate_state(gates: GateSet, controller: SparsityController | None, path: str | os.PathLike) -> None:
    """Restore gates (and λ, when a controller is given) from a checkpoint's gates.safetensors.

    Raises:
        FileNotFoundError: the file is missing.
        CheckpointError: a tensor is missing or has another shape (naming the file and tensor).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint has no gates")
    tensors = load_file(str(path))
    named = {f"gates.{n}": p for n, p in gates.named_parameters()}
    if controller is not None:
        named.update({f"sparsity.{n}": p for n, p in controller.named_parameters()})
    missing = sorted(set(named) - set(tensors))
    if missing:
        raise ckpt.CheckpointError(f"{path} lacks {missing}")
    with _gathered(list(named.values())), torch.no_grad():
        for name, param in named.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ckpt.CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected "
                                           f"{tuple(param.shape)} (gates of another model?)")
            param.copy_(tensors[name].to(param.device, param.dtype))


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions leave an empty local tensor


def _saved_name(name: str) -> str:
    """A trainable parameter's key in the file peft writes (the adapter name is dropped)."""
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def expected_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Saved key -> full shape of every trainable tensor but the gates and λ (ZeRO-3: the shape before
    partitioning, `ds_shape`). A full model is saved in its original checkpoint format, so its keys go
    through transformers' own renaming (on shapes only: meta tensors)."""
    model = _unwrap(model)
    shapes = {_saved_name(name): _full_shape(p) for name, p in model.named_parameters()
              if p.requires_grad and "visprune_gates." not in name and "visprune_sparsity." not in name}
    if hasattr(model, "peft_config"):
        return shapes
    from transformers.core_model_loading import revert_weight_conversion

    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})  # saved once, under the other name
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items() if name not in tied}
    return {name: tuple(tensor.shape) for name, tensor in revert_weight_conversion(model, meta).items()}


def tensor_problems(folder: str | os.PathLike, expected: dict[str, tuple[int, ...]], gates: GateSet,
                    controller: SparsityController | None = None) -> list[str]:
    """What is wrong with the tensors a save wrote in `folder`, each problem naming its file and tensor: an
    expected adapter (or model) or gate tensor that is missing, has another shape, or is empty. Reads only
    the safetensors headers."""
    from safetensors import safe_open

    folder = Path(folder)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (file, shape)
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != GATES_FILE:
            with safe_open(str(path), framework="pt") as handle:
                found.update({key: (path.name, tuple(handle.get_slice(key).get_shape()))
                              for key in handle.keys()})  # noqa: SIM118 (not a dict)
    gate_shapes = {f"gates.{n}": _full_shape(p) for n, p in gates.named_parameters()}
    if controller is not None:
        gate_shapes.update({f"sparsity.{n}": _full_shape(p) for n, p in controller.named_parameters()})
    saved_gates: dict[str, tuple[str, tuple[int, ...]]] = {}
    if (folder / GATES_FILE).is_file():
        with safe_open(str(folder / GATES_FILE), framework="pt") as handle:
            saved_gates = {key: (GATES_FILE, tuple(handle.get_slice(key).get_shape()))
                           for key in handle.keys()}  # noqa: SIM118 (not a dict)
    adapter = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model*.safetensors"
    problems = [f"{adapter}: {key} is missing" for key in sorted(set(expected) - set(found))]
    if (folder / GATES_FILE).is_file():
        problems += [f"{GATES_FILE}: {key} is missing" for key in sorted(set(gate_shapes) - set(saved_gates))]
    else:
        problems.append(f"{GATES_FILE} is missing")
    for want, have in ((expected, found), (gate_shapes, saved_gates)):
        problems += [f"{have[key][0]}: {key} has shape {have[key][1]}, expected {shape}" for key, shape in want.items()
                     if key in have and have[key][1] != shape]
        problems += [f"{file}: {key} is empty" for key, (file, shape) in have.items() if 0 in shape]
    return problems


def check_saved_tensors(folder: str | os.PathLike, expected: dict[str, tuple[int, ...]], gates: GateSet,
                        controller: SparsityController | None = None) -> None:
    """Re-open what a save wrote and check it: every expected adapter (or model) tensor and every gate
    tensor is present, non-empty and has its shape. The classic failure is an adapter saved empty
    under ZeRO-3."""
    problems = tensor_problems(folder, expected, gates, controller)
    if problems:
        raise RuntimeError(f"the checkpoint in {folder} is wrong ({len(problems)} problems): " + "; ".join(problems[:8]))


def check_resume_fits(checkpoint: str | os.PathLike, model: nn.Module, gates: GateSet,
                      controller: SparsityController) -> None:
    """Refuse to resume from a checkpoint whose adapter (or model) or gate tensors do not fit this run's model
    (another model, another `lora.rank` or `lora.targets`), before transformers or DeepSpeed load it.

    Raises:
        CheckpointError: naming the checkpoint, then each file and tensor that does not fit.
    """
    problems = tensor_problems(checkpoint, expected_tensor_shapes(model), gates, controller)
    if problems:
        raise ckpt.CheckpointError(f"--resume {checkpoint}: it does not fit this recipe's model ({len(problems)} "
                                   f"problem{'s' if len(problems) > 1 else ''}): " + "; ".join(problems[:3]))


# ---- the run folder -----------------------------------------------------------------------------------
TENSORBOARD_DIR = "tensorboard"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
# Recipe keys a run folder's runs may differ in: where the folder is, how often it saves, keeps and logs,
# data-loading processes, activation checkpointing (recomputed, same numbers), how many non-finite steps in a
# row stop it, and train.max_steps (to train longer; the learning-rate schedule follows the new value). Every
# other key changes what the run computes.
NON_RESULT_KEYS = frozenset({"output.dir", "output.save_steps", "output.save_total_limit", "output.heatmap_steps",
                             "train.logging_steps", "train.max_steps", "train.stop_after_nonfinite",
                             "train.gradient_checkpointing", "data.num_workers"})
PATH_KEYS = frozenset({"model.path", "data.path", "data.image_folder", "plan"})  # equal when they name one file


class RunFolderError(RecipeError):
    """A run folder this run must not write into (a run of another recipe, two runs mixed, files visprune did
    not write); the message names the folder and what to do instead."""


def recipe_differences(recorded: Any, current: Any, key: str = "") -> list[str]:
    """The dotted keys (with both values) in which two recipes (`recipe_to_dict`) differ, `NON_RESULT_KEYS`
    left out; two paths are equal when they name the same file."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        names = list(recorded) + [name for name in current if name not in recorded]
        return [diff for name in names
                for diff in recipe_differences(recorded.get(name), current.get(name), f"{key}.{name}" if key else name)]
    if key in NON_RESULT_KEYS or recorded == current:
        return []
    if key in PATH_KEYS and isinstance(recorded, str) and isinstance(current, str) and os.path.exists(current) \
            and os.path.realpath(recorded) == os.path.realpath(current):
        return []
    return [f"{key} ({_short(recorded)} -> {_short(current)})"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_recipe_file(path: Path) -> bool:
    """A YAML mapping with `model` and `output` sections: a recipe some visprune recorded (maybe an older one)."""
    try:
        raw = read_recipe_mapping(path)  # bounded: a hostile file in a run folder costs nothing
    except RecipeError:
        return False
    return {"model", "output"} <= set(raw)


def recorded_recipe(run_dir: Path) -> dict[str, Any] | None:
    """The recipe recorded in the run folder (`recipe.yaml`, as `recipe_to_dict` gives it); None without one.

    Raises:
        RunFolderError: `recipe.yaml` is not a recipe this visprune reads.
    """
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        return recipe_to_dict(load_recipe(path))
    except RecipeError as exc:
        if not _is_recipe_file(path):
            raise RunFolderError(f"output.dir {run_dir}: its {RECIPE_FILE} is not a visprune recipe, and a run would "
                                 "write over it; use another output.dir") from exc
        raise RunFolderError(f"output.dir {run_dir}: its {RECIPE_FILE} is a recipe this visprune cannot read "
                             f"({_first_line(exc)}); use another output.dir, or start it again with --resume never "
                             "--overwrite") from exc


def foreign_entries(run_dir: Path) -> list[str]:
    """The entries of a run folder that visprune did not write, which `--overwrite` never deletes: anything but
    checkpoint-N/ and final/ folders holding a checkpoint marker, .staging/, tensorboard/ (event files only),
    recipe.yaml (a recipe), visprune_template.json and deepspeed_config.json."""
    from visprune.data_prep.templates import TEMPLATE_FILE

    ours = {TEMPLATE_FILE, DEEPSPEED_CONFIG_FILE, f"{TEMPLATE_FILE}.tmp"}
    foreign = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif entry.is_dir():
            is_checkpoint = ckpt.checkpoint_step(entry) is not None or name == FINAL_DIR
            if name == ckpt.STAGING_DIR or is_checkpoint and (entry / ckpt.MARKER_FILE).is_file():
                continue
            if name == TENSORBOARD_DIR and all(path.is_dir() or path.name.startswith("events.out.tfevents.")
                                               for path in entry.rglob("*")):
                continue
            foreign.append(f"{name}/" + (f" (no {ckpt.MARKER_FILE})" if is_checkpoint else ""))
        elif name not in ours and not (name == RECIPE_FILE and _is_recipe_file(entry)):
            foreign.append(name)
    return foreign


def _refuse_foreign_entries(run_dir: Path) -> None:
    foreign = foreign_entries(run_dir)
    if foreign:
        raise RunFolderError(f"output.dir {run_dir} holds files visprune did not write ({', '.join(foreign[:5])}"
                             f"{' ...' if len(foreign) > 5 else ''}): refusing to clear it, even with --overwrite; "
                             "use another output.dir")


def clear_run_folder(run_dir: Path) -> None:
    """Remove what visprune wrote in a run folder (`--resume never --overwrite`); refuses a folder holding
    anything else (`foreign_entries`)."""
    _refuse_foreign_entries(run_dir)
    entries = sorted(run_dir.iterdir())
    logger.warning("--resume never --overwrite: removing the previous run in %s (%s)", run_dir,
                   ", ".join(entry.name for entry in entries))
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    fsync_dir(run_dir)


def _inside_or_equal(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_run_folder(run_dir: Path, recipe: Recipe, resume: str, overwrite: bool) -> None:
    """Refuse a run folder (`output.dir`) this run would mix with another run or with user files (see `train`);
    reads only."""
    if overwrite and resume != "never":
        raise RunFolderError(f"--overwrite starts output.dir {run_dir} again: it needs --resume never (with "
                             f"--resume {resume} the run there would be continued)")
    out = run_dir.resolve()
    for key, value in (("model.path", recipe.model.path), ("data.path", recipe.data.path),
                       ("data.image_folder", recipe.data.image_folder)):
        if value is not None and os.path.isdir(value) and _inside_or_equal(out, Path(value).resolve()):
            raise RunFolderError(f"output.dir {run_dir} is inside {key} {value}: a run folder never goes in its "
                                 "inputs; use another output.dir")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunFolderError(f"output.dir {run_dir} is a file, not a folder")
    if overwrite:
        _refuse_foreign_entries(run_dir)
        return
    recorded = recorded_recipe(run_dir)
    results = [path.name for _, path in ckpt.checkpoints(run_dir)] + \
        ([FINAL_DIR] if (run_dir / FINAL_DIR).exists() else [])
    if not results:  # a run that never saved: nothing to mix with
        return
    if resume == "never":
        raise RunFolderError(f"output.dir {run_dir} already holds a run ({', '.join(results[:3])}): --resume never "
                             "would mix two runs in it; continue it (--resume auto), use another output.dir, or "
                             "start it again with --resume never --overwrite")
    differences = recipe_differences(recorded, recipe_to_dict(recipe)) if recorded is not None else []
    if differences:
        raise RunFolderError(f"output.dir {run_dir} holds a run of another recipe: {'; '.join(differences[:6])}"
                             f"{' ...' if len(differences) > 6 else ''}; use another output.dir, or start it again "
                             "with --resume never --overwrite")


def _wait_for_every_rank() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _decided_by_main_process(decide: Any) -> Any:
    """`decide()` run on the main process only and its result (or its error, as a CheckpointError) given to
    every rank: verifying a checkpoint reads every file, once per command rather than once per rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    outcome: list[Any] = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", decide())]
        except Exception as exc:  # noqa: BLE001 (re-raised below, after every rank has been told)
            error, outcome = exc, [("error", str(exc))]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    kind, value = outcome[0]
    if kind == "error":
        raise ckpt.CheckpointError(value)
    return value


# ---- one run ----------------------------------------------------------------------------------------
def find_resume_checkpoint(run_dir: str | os.PathLike, resume: str) -> str | None:
    """`resume`: "auto" (the newest checkpoint-N of the run folder that verifies, if any; newer ones that do not
    are logged and skipped), "never", or a checkpoint path (which must verify).

    Raises:
        CheckpointError: a given checkpoint is missing, incomplete, corrupted or not a training checkpoint.
    """
    if resume == "never":
        return None
    if resume != "auto":
        if not os.path.isdir(resume):
            raise ckpt.CheckpointError(f"--resume {resume}: no such checkpoint folder")
        reason = ckpt.incomplete_reason(resume)
        if reason:
            raise ckpt.CheckpointError(f"--resume {resume}: not a complete checkpoint: {reason}")
        if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
            raise ckpt.CheckpointError(f"--resume {resume}: not a training checkpoint (no trainer_state.json; final/ "
                                       "and exported folders hold weights only)")
        return resume
    latest = ckpt.latest_complete(run_dir)
    if latest is None and ckpt.checkpoints(run_dir):
        logger.warning("no checkpoint of %s verifies: training starts from step 0", run_dir)
    return str(latest) if latest is not None else None


def check_steps_applied(skipped_steps: int, global_step: int) -> None:
    """Refuse to publish a run in which every optimizer step was skipped as non-finite: its weights are the
    initial ones, whatever `train.stop_after_nonfinite` allowed in a row.

    Raises:
        NonFiniteError: with the reason.
    """
    if global_step > 0 and skipped_steps >= global_step:
        raise NonFiniteError(f"every optimizer step ({global_step} of {global_step}) had a non-finite loss, gradient "
                             "or gradient norm and was skipped: nothing was trained, so no final/ was written. Check "
                             "the recipe (lora.alpha, optim.lr, optim.gate_lr, distill) and the data, or train in "
                             "fp32.")


def _skipped_steps(checkpoint: str | os.PathLike) -> int:
    state = Path(checkpoint) / STATE_FILE
    return int(json.loads(state.read_text())["skipped_steps"]) if state.is_file() else 0


def build_collator(recipe: Recipe, model: nn.Module, processor: Any) -> LlavaCollator:
    """The run's collator: its chat template resolved from `data.template` for the model's family (the
    choice is logged), images inside `data.image_folder`."""
    template = resolve_template(processor, recipe.data.template, recipe.model.family, model.generation_config)
    logger.info("chat template: %s (data.template %s%s)", template.name, recipe.data.template,
                f": {template.reason}" if recipe.data.template == "auto" else "")
    return LlavaCollator(processor, template, image_folder=recipe.data.image_folder,
                         max_length=recipe.data.max_length, drop_overlong=recipe.data.drop_overlong,
                         max_image_pixels=recipe.data.max_image_pixels)


def train(recipe: Recipe, resume: str = "auto", overwrite: bool = False) -> Path:
    """Run a recipe: build, train, checkpoint; returns the run folder (`output.dir`).

    A run folder holds one run: its recipe is recorded in `recipe.yaml`, and a folder that already holds
    checkpoints or final/ is continued only by the same recipe (up to `NON_RESULT_KEYS`).

    Args:
        recipe: what to run; `model.trust_remote_code` is honoured from it.
        resume: "auto" (continue from the newest checkpoint of the run folder that verifies), "never" (start
            at step 0; refused in a folder holding checkpoints or final/ unless `overwrite`), or a checkpoint
            folder.
        overwrite: with resume="never", first remove what visprune wrote in the run folder (checkpoints,
            final/, .staging/, tensorboard/, recipe.yaml, visprune_template.json, deepspeed_config.json);
            refused when the folder holds anything else.

    Raises:
        RunFolderError: the run folder holds another recipe's run, or would mix two runs, or holds files
            visprune did not write (with `overwrite`), or is inside an input.
        CheckpointError: the checkpoint to resume from is incomplete, corrupted or does not fit the model.
        NonFiniteError: too many non-finite steps in a row, or every step was non-finite (no final/ then).
    """
    run_dir = Path(recipe.output.dir)
    args = build_training_args(recipe, render_deepspeed_config(recipe))
    check_run_folder(run_dir, recipe, resume, overwrite)
    checkpoint = _decided_by_main_process(lambda: find_resume_checkpoint(run_dir, resume))  # verified first
    _wait_for_every_rank()  # every rank has read the run folder before the main one clears or writes it
    if args.should_save:
        if overwrite and run_dir.is_dir():
            clear_run_folder(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clear_staging(run_dir)  # a save that a crash interrupted
        save_recipe(recipe, run_dir / RECIPE_FILE)
        if args.deepspeed:
            (run_dir / DEEPSPEED_CONFIG_FILE).write_text(json.dumps(render_deepspeed_config(recipe), indent=1))
    dataset = build_dataset(recipe.data.path)
    model, processor = build_model(recipe)
    collator = build_collator(recipe, model, processor)
    if "input_ids" in dataset.column_names:  # a `visprune data prepare` folder: made with this processor?
        check_prepared_matches(recipe.data.path, processor, collator.template, recipe.data.max_length,
                               recipe.data.image_folder, drop_overlong=recipe.data.drop_overlong,
                               max_image_pixels=recipe.data.max_image_pixels)
    elif recipe.train.group_by_length:
        raise DataError(f"train.group_by_length needs a prepared dataset: data.path {recipe.data.path} is a JSON "
                        "file; run `visprune data prepare` and point data.path at its folder")
    if args.should_save:
        collator.template.save(run_dir)
    processor.chat_template = collator.template.source  # checkpoints' processor files prompt as training did
    model, gates, controller = prepare_model(model, recipe)
    trainer = VispruneTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                              processing_class=processor, recipe=recipe, gates=gates, controller=controller,
                              template=collator.template)
    final, staging = run_dir / FINAL_DIR, run_dir / ckpt.STAGING_DIR / FINAL_DIR
    if checkpoint:
        done = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0)
        if done >= recipe.train.max_steps:  # transformers would still run one more step
            logger.info("%s is at step %d of %d: nothing left to train", checkpoint, done, recipe.train.max_steps)
            check_steps_applied(_skipped_steps(checkpoint), done)
            if args.should_save and ckpt.incomplete_reason(final) is not None:  # a crash while final/ was written
                logger.info("writing %s from %s", final, checkpoint)
                ckpt.copy_model_files(checkpoint, staging)
                ckpt.publish(staging, final, done)
            return run_dir
        check_resume_fits(checkpoint, model, gates, controller)
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    check_steps_applied(trainer.skipped_steps, trainer.state.global_step)
    trainer.save_model(str(staging))  # final/ is complete or invisible too
    if args.should_save:
        ckpt.publish(staging, final, trainer.state.global_step)
    if collator.num_dropped:
        logger.warning("%d over-long samples were dropped (data.drop_overlong)", collator.num_dropped)
    return run_dir


__all__ = ["GATES_FILE", "NON_RESULT_KEYS", "RECIPE_FILE", "STATE_FILE", "NonFiniteError", "RunFolderError",
           "VispruneTrainer", "build_collator", "build_model", "build_training_args", "check_lora_targets",
           "check_model_path", "check_resume_fits", "check_run_folder", "check_saved_tensors", "check_steps_applied",
           "clear_run_folder", "expected_tensor_shapes", "find_resume_checkpoint", "foreign_entries",
           "gate_state_dict", "load_gate_state", "prepare_model", "recipe_differences", "recorded_recipe",
           "render_deepspeed_config", "tensor_problems", "train"]
