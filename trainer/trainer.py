"""The Trainer subclass (loss: LM + optional self-distillation + Lagrangian FLOPs constraint; parameter groups;
complete-or-invisible checkpoints; skipped non-finite steps) and `train`, which runs one recipe in its run
folder (builders in build.py, gate state in gate_state.py, the run folder's rules in run_folder.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Trainer, get_scheduler
from transformers.trainer_callback import TrainerCallback
from visprune.data_prep.prepared import check_prepared_matches
from visprune.data_prep.records import DataError, build_dataset
from visprune.data_prep.templates import ChatTemplate
from visprune.modeling import GateSet, Plan
from visprune.modeling.families import family_for
from visprune.modeling.flops import plan_report
from visprune.modeling.plan import read_json_file

from . import checkpoints as ckpt
from .build import (
    build_collator,
    build_model,
    build_training_args,
    prepare_model,
    render_deepspeed_config,
)
from .config import Recipe, save_recipe
from .gate_state import (
    GATES_FILE,
    _gathered,
    base_model_of,
    check_resume_fits,
    check_saved_tensors,
    expected_tensor_shapes,
    gate_metadata,
    gate_state_dict,
    load_gate_state,
    unwrap_model,
)
from .plan_select import held_out_loss
from .run_folder import (
    DEEPSPEED_CONFIG_FILE,
    FINAL_DIR,
    PLAN_CHOICE_FILE,
    PLAN_CHOICE_MAX_BYTES,
    RECIPE_FILE,
    STATE_FILE,
    check_run_folder,
    clear_run_folder,
    decided_by_main_process,
    wait_for_every_rank,
)
from .sparsity import ExpectedFlops, SparsityController

logger = logging.getLogger(__name__)



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
        self.layout = recipe.budget.layout(dims)  # the token layout the budget is costed on
        self.expected_flops = ExpectedFlops(dims, self.layout, recipe.gates.window, recipe.gates.temporal_window)
        self.loss_is_scaled_for_ga = False  # every term is a per-micro-batch mean: the Trainer divides by GA
        self._metrics: dict[str, float] = {}
        self._metric_count = 0
        self.last_plan_source: str | None = None  # the candidate the latest plan-loss step trained (choose_plan)
        self.fixed_plan: Plan | None = None  # plan_select: the plan trained fixed from plan_select.at on
        self.fixed_budget = 1.0
        self._plan_metric_cache: dict[Plan, dict[str, float]] = {}  # what a fixed plan logs (`_plan_metrics`)
        self.plan_choice: dict | None = None  # what fix_plan tried and chose (plan_select.json)
        self.trial_plans: list[tuple[Plan, str]] | None = None  # plan_select.finalists, trained in turn until one is fixed
        self.selection_rows = None  # plan_select.data, read when training starts (`train`)
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
        learning rate so the constraint can act until the last step (as in CoFi), and 0 once `plan_select`
        fixed the plan."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is None or len(lambdas) != len(scheduler.optimizer.param_groups):
            raise RuntimeError(f"cannot give gates a constant learning rate with {type(scheduler).__name__}")
        def gate_lr_factor(step: int) -> float:  # a function: LambdaLR's state_dict stores no trainer
            return 0.0 if self.plans_fixed() else 1.0

        for idx in self._constant_lr_groups:
            lambdas[idx] = gate_lr_factor
            scheduler.optimizer.param_groups[idx]["lr"] = scheduler.base_lrs[idx]
        select = self.recipe.plan_select
        fix_step = select.step(num_training_steps)
        if fix_step is not None and select.restart_lr:  # the fixed-plan phase gets the schedule again, from its start
            remaining = num_training_steps - fix_step
            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            restart = get_scheduler(self.args.lr_scheduler_type, dummy, num_training_steps=remaining,
                                    num_warmup_steps=self.args.get_warmup_steps(remaining)).lr_lambdas[0]
            for idx, before in enumerate(lambdas):
                if idx not in self._constant_lr_groups:
                    lambdas[idx] = (lambda step, before=before:
                                    restart(step - fix_step) if self.plans_fixed() else before(step))
        return scheduler

    # -- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        temperature = None
        progress = self.state.global_step / max(1, self.state.max_steps)
        if model.training and self.gates.cfg.temperature_start is not None:  # annealed: set before the draw
            temperature = self.gates.temperature_at(progress)
            self.gates.set_temperature(temperature)
        fix_step = self.recipe.plan_select.step(self.state.max_steps)
        if model.training and not self.plans_fixed() and fix_step is not None and self.state.global_step >= fix_step:
            self.fix_plan(model)
        if (model.training and self.trial_plans is not None
                and self.state.global_step >= fix_step + self.recipe.plan_select.trial_steps(self.state.max_steps)):
            self.end_trial(model)
        vision_anchor = self._vision_anchor(model, inputs)
        with self._fixed_plan_forward():
            outputs = model(**inputs)
        lm_loss = outputs.loss
        loss = lm_loss + vision_anchor
        metrics: dict[str, float] = {"loss_lm": float(lm_loss.detach())}

        teacher_logits = self.teacher_logits(model, inputs) if self.recipe.distill.enabled else None
        if teacher_logits is not None:
            kl = self.distillation_loss(inputs, outputs.logits, teacher_logits)
            loss = loss + self.recipe.distill.weight * kl
            metrics["loss_distill"] = float(kl.detach())

        probs = self.gates.last_probs
        if probs is not None and self.gates.learnable():
            expected = self.expected_flops(probs)
            penalty = self.controller(expected, self.state.global_step)
            if self.plans_fixed():  # the plan is chosen: the constraint rests (kept in the graph, no effect)
                penalty = penalty * 0.0
            loss = loss + penalty
            effective = probs.layer[:, None] * probs.head
            metrics.update({
                "loss_lagrangian": float(penalty.detach()), "expected_visual_flops": float(expected.detach()),
                "target_visual_flops": self.controller.target_at(self.state.global_step),
                "lambda_1": self.controller.last_lambdas[0], "lambda_2": self.controller.last_lambdas[1],
                "open_heads": float((effective > 0.5).sum()), "open_layers": float((probs.layer > 0.5).sum()),
            })
            if probs.rings is not None:  # ring gates: the expected window radius, averaged over the layers
                metrics["window_radius"] = float(torch.cumprod(probs.rings.detach().float(), dim=1).sum(dim=1).mean())
            if probs.update is not None:  # freeze gates: layers whose visual rows are mostly kept but not updated
                metrics["frozen_layers"] = float(((probs.layer > 0.5) & (probs.update <= 0.5)).sum())
            if temperature is not None:
                metrics["gate_temperature"] = temperature
            plan_cfg = self.recipe.plan_loss
            if self.plans_fixed():  # what runs is the plan (under DeepSpeed the frozen gates keep their
                metrics.update(self._plan_metrics(self._running_plan()))  # values from before the fix: the plan, not they, is logged)
            elif model.training and plan_cfg.weight > 0 and progress >= plan_cfg.start:
                plan_loss = self.plan_loss(model, inputs, teacher_logits)
                loss = loss + plan_cfg.weight * plan_loss
                metrics["loss_plan"] = float(plan_loss.detach())
                if plan_cfg.candidates > 1:  # share of plan-loss steps that trained a drawn plan, not the gates' own
                    metrics["plan_drawn"] = float(self.last_plan_source != "scores")
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

    def plan_loss(self, model, inputs, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """The loss of the plan that hardening at the current target would keep (`GateSet.plan_forward`):
        LM loss, plus the distillation term when it is on. Trains the adapters for the deterministic plan
        that sampled gates only approximate, and (straight through) the gates towards a plan that works."""
        cfg = self.recipe.plan_loss
        budget = self.controller.target_at(self.state.global_step)
        plan = self.choose_plan(model, inputs, teacher_logits, budget) if cfg.candidates > 1 else None
        with self.gates.plan_forward(budget, self.layout, cfg.fill, plan=plan):
            outputs = model(**inputs)
        return self._plan_objective(inputs, outputs, teacher_logits)

    def _plan_objective(self, inputs, outputs, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        loss = outputs.loss
        if teacher_logits is not None:
            loss = loss + self.recipe.distill.weight * self.distillation_loss(inputs, outputs.logits, teacher_logits)
        return loss

    def choose_plan(self, model, inputs, teacher_logits: torch.Tensor | None, budget: float) -> Plan:
        """`plan_loss.candidates` > 1: the candidate plan at `budget` (`GateSet.candidate_plans`: the gates'
        own plan, then plans drawn from the gates, seeded by the step) with the lowest plan objective on this
        batch, scored without gradients. Under data parallelism the losses are averaged over ranks first, so
        every rank trains the same plan. Sets `last_plan_source` ("scores" or "draw N")."""
        cfg = self.recipe.plan_loss
        candidates = self._candidates(budget, cfg.candidates, cfg.fill, seed=self.state.global_step)
        losses = self._score_plans(candidates, budget, cfg.fill, inputs["input_ids"].device,
                                   lambda: self._plan_objective(inputs, model(**inputs), teacher_logits))
        best = int(torch.argmin(losses))
        self.last_plan_source = candidates[best][1]
        return candidates[best][0]

    def _candidates(self, budget: float, count: int, fill: bool, seed: int) -> list[tuple[Plan, str]]:
        with _gathered(list(self.gates.parameters())):
            return self.gates.candidate_plans(budget, count, self.layout, fill=fill, seed=seed)

    def _score_plans(self, candidates: list[tuple[Plan, str]], budget: float, fill: bool, device: torch.device,
                     loss_of) -> torch.Tensor:
        """`loss_of()` (no gradients) with each candidate run as exact 0/1 gates; averaged over ranks so every rank
        picks the same plan; a non-finite loss counts as +inf."""
        losses = torch.zeros(len(candidates), device=device)
        with torch.no_grad():
            for idx, (plan, _) in enumerate(candidates):
                with self.gates.plan_forward(budget, self.layout, fill, plan=plan):
                    losses[idx] = loss_of().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(losses)
            losses = losses / torch.distributed.get_world_size()
        return torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))

    # -- plan_select: choose the plan by a validation pass, then train it fixed ------------------------
    def plans_fixed(self) -> bool:
        """From `plan_select.at` on: the gates are frozen and every forward runs one plan (a finalist in its
        trial, then the chosen plan)."""
        return self.fixed_plan is not None or self.trial_plans is not None

    def _running_plan(self) -> Plan | None:
        """The plan this optimizer step trains: the chosen one, or in the trial the finalists in turn."""
        if self.trial_plans is None:
            return self.fixed_plan
        turn = self.state.global_step - self.plan_choice["step"]
        return self.trial_plans[turn % len(self.trial_plans)][0]

    def _plan_metrics(self, plan: Plan) -> dict[str, float]:
        """What a step logs once the plan runs fixed: the plan's FLOPs and units, and whether it is a finalist
        on trial (`plan_trial`) or the chosen plan (`plan_fixed`)."""
        if plan not in self._plan_metric_cache:
            self._plan_metric_cache[plan] = {
                "expected_visual_flops": plan_report(self.gates.model_dims(), self.layout, plan)["visual_flops_ratio"],
                "open_heads": float(sum(len(layer.heads) for layer in plan.layers)),
                "open_layers": float(sum(not layer.skipped for layer in plan.layers)),
                **({"frozen_layers": float(sum(layer.frozen for layer in plan.layers))}
                   if self.gates.update is not None else {})}
        phase = "plan_trial" if self.trial_plans is not None else "plan_fixed"
        return {**self._plan_metric_cache[plan], phase: 1.0}

    def _fixed_plan_forward(self):
        """From `plan_select.at` on: forwards run the plan of this step (`_running_plan`) as exact 0/1 gates
        (recording P(open) as a sampled forward does); before: nothing changes."""
        plan = self._running_plan()
        if plan is None:
            return contextlib.nullcontext()
        return self.gates.plan_forward(self.fixed_budget, self.layout, True, plan=plan, record_probs=True)

    def fix_plan(self, model) -> None:
        """`plan_select` at its step: score the candidate plans at the current target (`GateSet.candidate_plans`,
        fill rule: the gates' own plan and plans drawn from them) by their LM loss on the first
        `plan_select.samples` samples of `plan_select.data` (default: the training data), without gradients,
        averaged over ranks, and freeze the gates (learning rate 0). With `finalists` 1 the lowest is fixed at
        once (`_commit`); otherwise the best `finalists` are trained in turn for `trial_steps` steps and then
        scored again (`end_trial`). The choice is saved in every checkpoint (`plan_select.json`) and restored
        on resume."""
        cfg = self.recipe.plan_select
        budget = self.controller.target_at(self.state.global_step)
        candidates = self._candidates(budget, cfg.candidates, True, seed=self.args.seed)
        losses = self._held_out_losses(model, candidates, budget)
        dims = self.gates.model_dims()
        self.plan_choice = {
            "step": self.state.global_step, "budget": budget, "data": cfg.data or self.recipe.data.path,
            "samples": len(self._selection_samples()),
            "candidates": [{"source": source, "loss": loss if math.isfinite(loss) else None,
                            "visual_flops_ratio": plan_report(dims, self.layout, cand)["visual_flops_ratio"]}
                           for (cand, source), loss in zip(candidates, losses.tolist())]}
        order = [int(i) for i in torch.argsort(losses, stable=True)]
        finalists = [candidates[i] for i in order[:cfg.finalists]]
        if len(finalists) == 1:  # no finalists (or the gates draw no other plan at this budget): fixed at once
            plan, source = finalists[0]
            self.plan_choice.update({"chosen": source, "plan": plan.to_dict()})
            logger.info("step %d: plan fixed (%s of %d candidates, loss %.4f; %.1f%% of the visual FLOPs)",
                        self.state.global_step, source, len(candidates), float(losses[order[0]]),
                        100 * self.plan_choice["candidates"][order[0]]["visual_flops_ratio"])
            self._commit(plan, budget)
            return
        self.plan_choice["finalists"] = [{"source": source, "plan": plan.to_dict()} for plan, source in finalists]
        logger.info("step %d: %s of %d candidates trained in turn for %d steps (plan_select.finalists)",
                    self.state.global_step, ", ".join(source for _, source in finalists), len(candidates),
                    cfg.trial_steps(self.state.max_steps))
        self._start_trial(finalists, budget)

    def end_trial(self, model) -> None:
        """After `plan_select.trial_steps`: score the finalists again on the held-out samples and fix the best."""
        finalists, budget = self.trial_plans, self.fixed_budget
        losses = self._held_out_losses(model, finalists, budget)
        best = int(torch.argmin(losses))
        for entry, loss in zip(self.plan_choice["finalists"], losses.tolist()):
            entry["loss_after_trial"] = loss if math.isfinite(loss) else None
        self.plan_choice.update({"chosen": finalists[best][1], "trial_end": self.state.global_step,
                                 "plan": finalists[best][0].to_dict()})
        logger.info("step %d: plan fixed (%s of %d finalists, loss %.4f after %d trial steps)", self.state.global_step,
                    finalists[best][1], len(finalists), float(losses[best]),
                    self.recipe.plan_select.trial_steps(self.state.max_steps))
        self.trial_plans = None
        self._commit(finalists[best][0], budget)

    def _held_out_losses(self, model, candidates: list[tuple[Plan, str]], budget: float) -> torch.Tensor:
        """Each candidate's LM loss per scored token on the selection batches, in eval mode, averaged over ranks."""
        batches = self._selection_batches()
        was_training = model.training
        model.eval()
        try:
            return self._score_plans(candidates, budget, True, batches[0]["input_ids"].device,
                                     lambda: held_out_loss(model, batches))
        finally:
            model.train(was_training)

    def _start_trial(self, finalists: list[tuple[Plan, str]], budget: float) -> None:
        self.trial_plans, self.fixed_budget = finalists, budget
        self._apply_phase_rates()

    def _commit(self, plan: Plan, budget: float) -> None:
        with _gathered(list(self.gates.parameters())):
            self.gates.commit_to(plan)
            if self.gates.to_plan(budget, self.layout, fill=True) != plan:
                raise RuntimeError("plan_select: the committed gates do not harden to the chosen plan")
        self.fixed_plan, self.fixed_budget = plan, budget
        self._apply_phase_rates()

    def _apply_phase_rates(self) -> None:
        """This step already runs the fixed phase's rates: gates and multipliers 0, LoRA restarted."""
        scheduler = self.lr_scheduler
        if self.optimizer is not None and scheduler is not None:
            for idx, group in enumerate(self.optimizer.param_groups):
                group["lr"] = scheduler.base_lrs[idx] * scheduler.lr_lambdas[idx](self.state.global_step)

    def _selection_samples(self) -> list:
        """The first `plan_select.samples` samples of `plan_select.data` (or of the training data)."""
        cfg = self.recipe.plan_select
        rows = self.train_dataset if cfg.data is None else self.selection_rows or build_dataset(cfg.data)
        return [rows[i] for i in range(min(cfg.samples, len(rows)))]

    def _selection_batches(self) -> list[dict[str, torch.Tensor]]:
        rows, size = self._selection_samples(), self.args.per_device_train_batch_size
        return [self._prepare_inputs(self.data_collator(rows[start:start + size]))
                for start in range(0, len(rows), size)]

    def _vision_anchor(self, model, inputs) -> torch.Tensor:
        """A text-only batch still runs the vision tower (zero-weighted): ZeRO-3 hangs when ranks skip it."""
        if "pixel_values" in inputs:
            return torch.zeros((), device=inputs["input_ids"].device)
        base = base_model_of(model)
        family = family_for(base)
        dummy = family.vision_inputs(base, inputs["input_ids"].device)  # the family's smallest image
        features = family.image_features(base, dummy)
        return 0.0 * torch.cat(list(features)).float().sum()

    def teacher_logits(self, model, inputs) -> torch.Tensor:
        """The dense teacher's logits: this model with adapters disabled and every gate open (no second copy of
        the weights)."""
        peft_model = unwrap_model(model)  # the peft model, also inside a DeepSpeed engine
        if not hasattr(peft_model, "disable_adapter"):
            raise ValueError("distill.enabled needs LoRA (the teacher is the model with adapters disabled)")
        with torch.no_grad(), peft_model.disable_adapter(), self.gates.open_all():
            return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits

    def distillation_loss(self, inputs, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) on answer tokens."""
        temperature = self.recipe.distill.temperature
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
        if self.fixed_plan is not None:  # committed to the plan (under DeepSpeed the optimizer's master copy of
            # the frozen gates keeps their values at the fix; the forwards run the plan itself)
            tensors.update({f"gates.{name}": value for name, value in
                            self.gates.committed_log_alpha(self.fixed_plan).items()})
        if self.args.should_save:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_file(tensors, os.path.join(output_dir, GATES_FILE), metadata=gate_metadata(self.gates))
            save_recipe(self.recipe, os.path.join(output_dir, RECIPE_FILE))
            if self.plan_choice is not None:
                Path(output_dir, PLAN_CHOICE_FILE).write_text(json.dumps(self.plan_choice, indent=1) + "\n")
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
        path = Path(resume_from_checkpoint) / PLAN_CHOICE_FILE
        if path.is_file():  # the plan was fixed (or its finalists chosen) before this checkpoint: keep training it
            choice = read_json_file(path, PLAN_CHOICE_MAX_BYTES, "plan choice", ckpt.CheckpointError)
            try:
                budget = float(choice["budget"])
                plans = ([(Plan.from_json(choice["plan"]), str(choice["chosen"]))] if "plan" in choice else
                         [(Plan.from_json(entry["plan"]), str(entry["source"])) for entry in choice["finalists"]])
                dims = self.gates.model_dims()
                for plan, _ in plans:
                    plan.validate_for(dims.num_layers, dims.num_heads, dims.intermediate_size, family=dims.family)
            except (TypeError, KeyError, ValueError) as err:
                raise ckpt.CheckpointError(f"{path}: not a plan choice visprune wrote ({type(err).__name__}: "
                                           f"{err})") from None
            if not plans or not 0.0 < budget <= 1.0:
                raise ckpt.CheckpointError(f"{path}: not a plan choice visprune wrote (no plan, or a budget "
                                           "outside (0, 1])")
            self.plan_choice = choice
            if "plan" in choice:
                self._commit(plans[0][0], budget)
            else:
                self._start_trial(plans, budget)

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


class RecipeWriter(TrainerCallback):
    """Writes the run folder's recipe.yaml when training begins: after the checkpoint a run resumes from was read
    and checked, so a resume refused on its checkpoint leaves the folder as it was (a copied run folder's
    recipe.yaml names the old output.dir until then)."""

    def __init__(self, path: Path, recipe: Recipe) -> None:
        self.path, self.recipe = path, recipe

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            save_recipe(self.recipe, self.path)


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
    checkpoint = decided_by_main_process(lambda: find_resume_checkpoint(run_dir, resume))  # verified first
    wait_for_every_rank()  # every rank has read the run folder before the main one clears or writes it
    if args.should_save:
        if overwrite and run_dir.is_dir():
            clear_run_folder(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clear_staging(run_dir)  # a save that a crash interrupted
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
    selection_rows = None
    if recipe.plan_select.at is not None and recipe.plan_select.data is not None:
        selection_rows = build_dataset(recipe.plan_select.data)  # a bad file fails now, not half-way through the run
        if len(selection_rows) == 0:
            raise DataError(f"plan_select.data {recipe.plan_select.data} holds no samples")
    model, gates, controller = prepare_model(model, recipe)
    trainer = VispruneTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                              processing_class=processor, recipe=recipe, gates=gates, controller=controller,
                              template=collator.template)
    trainer.selection_rows = selection_rows
    trainer.add_callback(RecipeWriter(run_dir / RECIPE_FILE, recipe))
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
            wait_for_every_rank()
            return run_dir
        check_resume_fits(checkpoint, model, gates, controller)
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    check_steps_applied(trainer.skipped_steps, trainer.state.global_step)
    trainer.save_model(str(staging))  # final/ is complete or invisible too
    if args.should_save:
        ckpt.publish(staging, final, trainer.state.global_step)
    # no rank leaves (and tears down its process group) while the main one still hashes and publishes final/:
    # a peer gone mid-flight aborts gloo's threads at exit
    wait_for_every_rank()
    if collator.num_dropped:
        logger.warning("%d over-long samples were dropped (data.drop_overlong)", collator.num_dropped)
    return run_dir


__all__ = ["NonFiniteError", "VispruneTrainer", "check_steps_applied", "find_resume_checkpoint", "train"]
