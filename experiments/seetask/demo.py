"""`visprune demo`: the accuracy-vs-FLOPs experiment on the synthetic see-task, end to end on CPU.

Stages: generate data -> train the dense base -> per budget, prune-train (visprune: LoRA + gates +
Lagrangian + distillation, then the plan chosen on the val split trained fixed) and harden -> the
baselines at the same budgets (VTW, YOPO heuristic, random plan: each fine-tuned with the same LoRA
budget and its plan fixed; FastV and ShortV: training-free) -> evaluate all on the test split -> `report.md`, `pareto.png`, `results.json`.
Every stage writes its own folder and is skipped when its result exists (a crashed demo resumes).
The two training recipes ship with this package (`recipes/`); the demo fills in paths and steps.

Equal training: every plan baseline fine-tunes for as many steps as visprune trains in all (its
prune-training run plus one recovery run), with the same batch size, learning rate and LoRA.
`--seed S` moves everything seeded (data, base, gates, baselines); `run_seeds` runs the pipeline per
seed and reports the mean, min and max of every row.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.files import write_atomic
from visprune.data_prep.records import build_dataset
from visprune.data_prep.seetask import SeeTaskConfig, write_seetask
from visprune.data_prep.templates import resolve_for_model
from visprune.modeling import PLAN_FILE, ModelDims, Plan, TokenLayout, apply_plan, default_layout
from visprune.modeling.flops import dims_from_config
from visprune.trainer.config import Recipe, load_recipe
from visprune.trainer.eval.loading import load_for_eval, plan_flops
from visprune.trainer.eval.teacher_forced import evaluate
from visprune.trainer.eval.timing import time_alternating
from visprune.trainer.export import harden
from visprune.trainer.trainer import train

from .base_model import BASE_REPORT, BaseModelConfig, train_base
from .baselines import (
    Calibration,
    attach_fastv,
    calibrate,
    fastv_batch_kwargs,
    fastv_settings,
    layer_contributions,
    random_plan,
    shortv_plan,
    vtw_plan,
    yopo_plan,
)
from .tasks import DEFAULT_TASK, TASK_OPTIONS, TASKS, SeeTaskPreset

if TYPE_CHECKING:
    from datasets import Dataset
    from torch import nn

logger = logging.getLogger(__name__)

METHODS = ("visprune", "visprune-pre", "yopo", "vtw", "fastv", "shortv", "random")  # visprune-pre: before recovery
PLAN_BASELINES = ("yopo", "vtw", "random")  # fine-tuned with their plan fixed, in this order
RECIPE_NAMES = ("visprune.yaml", "finetune.yaml")  # package data in `recipes/`


@dataclass
class DemoSize:
    num_train: int
    num_test: int
    base_steps: int
    prune_steps: int  # visprune's prune-training = every plan baseline's fine-tuning budget
    recovery_steps: int  # visprune's LoRA recovery per budget after hardening (plan fixed)
    batch_size: int
    speed_repeats: int


SIZES = {
    "full": DemoSize(num_train=4000, num_test=400, base_steps=300, prune_steps=80, recovery_steps=40,
                     batch_size=16, speed_repeats=5),
    "quick": DemoSize(num_train=1500, num_test=200, base_steps=150, prune_steps=30, recovery_steps=10,
                      batch_size=16, speed_repeats=3),
    "ci": DemoSize(num_train=200, num_test=40, base_steps=12, prune_steps=4, recovery_steps=2, batch_size=8,
                   speed_repeats=1),
}


class DemoError(ValueError):
    """A demo that cannot run as asked (an output folder holding another configuration's demo)."""


@dataclass
class DemoConfig:
    out: Path
    size: str = "full"  # a key of SIZES
    budgets: tuple[float, ...] = (0.5, 0.25, 0.12)
    window: int = 3
    fill: bool = True  # plans use their budget (`GateSet.to_plan(fill=True)`); False: the prefix rule
    select: int = 8  # visprune: the plan chosen in prune training among this many candidates on the val split (the
    # best few trained in turn first), then trained fixed (the recipe's plan_select); 0 or 1: off (the gates learn
    # to the end, hardening ranks them)
    seed: int = 0  # data, base, gate training and baselines all follow it
    task: str = DEFAULT_TASK  # a key of TASKS
    task_options: dict[str, Any] = field(default_factory=dict)  # SeeTaskConfig fields over the task's own

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        unknown = sorted(set(self.task_options) - set(TASK_OPTIONS))
        if unknown:
            raise ValueError(f"unknown see-task options {unknown}; known: {list(TASK_OPTIONS)}")
        self.seetask_config()  # a bad combination (image size not a multiple of the grid, ...) fails here

    @property
    def scale(self) -> DemoSize:
        """The sample, step and batch counts of `size`."""
        return SIZES[self.size]

    @property
    def baseline_steps(self) -> int:
        """Every plan baseline's fine-tuning steps: as many as visprune trains in all (prune + recovery)."""
        return self.scale.prune_steps + self.scale.recovery_steps

    def seetask_config(self) -> SeeTaskConfig:
        """The generator settings: the task's, then the explicit options, then the size's counts and the seed."""
        scale = self.scale
        return SeeTaskConfig(**{**TASKS[self.task].data, **self.task_options}, num_train=scale.num_train,
                             num_val=100, num_test=scale.num_test, seed=self.seed)

    def base_config(self) -> BaseModelConfig:
        return BaseModelConfig(**TASKS[self.task].base, steps=self.scale.base_steps, seed=self.seed)

    def identity(self) -> dict[str, Any]:
        """What makes two demos' results comparable row by row (stored in `results.json`)."""
        return {"task": self.task, "task_options": dict(sorted(self.task_options.items())), "seed": self.seed,
                "size": self.size, "window": self.window, "fill": self.fill, "select": self.select}

    @property
    def plan_rule(self) -> str:
        return "fill" if self.fill else "prefix"

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def base_dir(self) -> Path:
        return self.out / "base"

    @property
    def results_path(self) -> Path:
        return self.out / "results.json"


@dataclass
class DemoState:
    """What the stages after the dense base share: the base model and its test inputs, and the results so far
    (`results.json`, rewritten after every row, so a rerun skips the rows in `done`)."""

    cfg: DemoConfig
    progress: bool
    base_model: nn.Module
    processor: Any
    dims: ModelDims
    layout: TokenLayout
    collator: ChatCollator
    speed_batch: dict[str, torch.Tensor]  # test samples (no labels) for the prefill timing
    results: dict[str, Any]
    done: set[tuple[str, float]] = field(default_factory=set)  # (method, budget) rows already recorded
    calibration: Calibration | None = None  # YOPO's, computed on first use

    def calibration_batch(self) -> dict[str, torch.Tensor]:
        """The first 32 val samples, collated: what YOPO and ShortV calibrate on."""
        val_rows = build_dataset(self.cfg.data_dir / "val.json")
        return self.collator([val_rows[i] for i in range(min(32, len(val_rows)))])

    def todo(self, method: str) -> list[float]:
        """The budgets `method` has no row for yet."""
        return [b for b in self.cfg.budgets if (method, b) not in self.done]

    def record(self, method: str, budget: float, scores: dict[str, Any], ratio: float, speedup: float | None,
               note: str = "", steps: int = 0, rule: str = "") -> None:
        """Add (or replace) one row and rewrite `results.json`. `steps`: training steps after the dense base;
        `rule`: how the row's plan was chosen."""
        rows = [r for r in self.results["rows"] if (r["method"], r["budget"]) != (method, budget)]
        rows.append({"method": method, "budget": budget, "visual_flops_ratio": ratio,
                     "describe_token_accuracy": scores.get("describe_token_accuracy"),
                     "ask_exact_match": scores.get("ask_exact_match"), "by_type": scores.get("by_type"),
                     "prefill_speedup": speedup, "steps": steps, "rule": rule, "note": note})
        self.results["rows"] = rows
        self.results.update({"size": self.cfg.size, "config": self.cfg.identity(), "layout": self.layout.to_dict(),
                             "dims": asdict(self.dims)})
        _write_json(self.cfg.results_path, self.results)
        self.done.add((method, budget))

    def record_hardened(self, method: str, budget: float, model_dir: Path, note: str = "", steps: int = 0,
                        rule: str = "") -> None:
        """Evaluate a hardened model folder (it has a plan), time its prefill against the base, record the row."""
        model, processor = load_for_eval(model_dir)
        data_dir = self.cfg.data_dir
        scores = evaluate(model, processor, data_dir / "test.json", data_dir / "images", progress=False)
        speedup = _prefill_speedup(self.base_model, model, self.speed_batch, self.cfg.scale.speed_repeats)
        self.record(method, budget, scores, plan_flops(model)["ratio"], speedup, note, steps, rule)


CONFIG_FILE = "demo_config.json"  # the settings a demo folder was made with (`DemoConfig.identity`)


def claim_output(cfg: DemoConfig) -> None:
    """Make `cfg.out` this demo's folder: refuse one that holds a demo made with other settings, or that holds
    other files and no demo, so a rerun only ever resumes its own stages."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / CONFIG_FILE
    mine = cfg.identity()
    if path.is_file():
        theirs = json.loads(path.read_text())
        changed = [k for k in mine if theirs.get(k) != mine[k]]
        if changed:
            raise DemoError(f"{cfg.out} holds a demo made with other settings ("
                            + ", ".join(f"{k} {theirs.get(k)!r} here, {mine[k]!r} asked" for k in changed)
                            + "): choose another --out")
        return
    if any(cfg.out.iterdir()):
        raise DemoError(f"{cfg.out} is not empty and holds no {CONFIG_FILE}: choose another --out")
    _write_json(path, mine)


def _stage(name: str) -> None:
    logger.info("==== %s ====", name)


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def load_demo_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load one of RECIPE_NAMES from this package's data (works from a wheel as from a checkout)."""
    with resources.as_file(resources.files(__package__) / "recipes" / name) as path:
        return load_recipe(path, list(overrides))


def _train_run(cfg: DemoConfig, recipe_name: str, out_dir: Path, extra: list[str], steps: int | None = None) -> Path:
    """Train one packaged recipe on the demo's base and data (resumable); returns its final checkpoint folder."""
    scale = cfg.scale
    steps = steps or scale.prune_steps
    overrides = [f"model.path={cfg.base_dir}", f"data.path={cfg.data_dir / 'train.json'}",
                 f"data.image_folder={cfg.data_dir / 'images'}", f"output.dir={out_dir}",
                 f"train.max_steps={steps}", f"output.save_steps={steps}",
                 f"train.micro_batch_size={scale.batch_size}", f"train.seed={cfg.seed + 17}", *extra]
    run_dir = train(load_demo_recipe(recipe_name, overrides), resume="auto")
    return run_dir / f"checkpoint-{steps}"


def _prefill_speedup(dense_model, pruned, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """Median dense / hardened prefill time on one test batch, alternating, same process."""
    times = time_alternating({"dense": lambda: dense_model(**batch), "pruned": lambda: pruned(**batch)}, repeats,
                             "cpu")
    return statistics.median(times["dense"]) / statistics.median(times["pruned"])


def _measure_layout(model: nn.Module, dims: ModelDims, sample: dict[str, torch.Tensor]) -> TokenLayout:
    """The token layout of one collated test sample: system tokens before its image, text tokens after it."""
    image_pos = (sample["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    return default_layout(dims, system=int(image_pos[0]), text=int(sample["input_ids"].shape[1] - image_pos[-1] - 1))


# ---- stages ---------------------------------------------------------------------------------------
def prepare_data(cfg: DemoConfig, progress: bool = True) -> None:
    """Stage 1: the see-task train / val / test split and images in `out/data` (once)."""
    _stage("data")
    claim_output(cfg)
    if not (cfg.data_dir / "scenes.json").is_file():
        write_seetask(cfg.data_dir, cfg.seetask_config(), progress=progress)


def prepare_base(cfg: DemoConfig, progress: bool = True) -> DemoState:
    """Stage 2: the dense base in `out/base` (trained once), loaded with the test inputs every later stage
    uses; the results recorded so far; the dense row."""
    _stage("dense base")
    if not (cfg.base_dir / BASE_REPORT).is_file():
        train_base(cfg.data_dir, cfg.base_dir, cfg.base_config(), progress=progress)
    base_model, processor = load_for_eval(cfg.base_dir)
    dims = dims_from_config(base_model.config)
    test_json, images = cfg.data_dir / "test.json", cfg.data_dir / "images"
    first = json.loads(test_json.read_text())[0]
    test_rows: Dataset = build_dataset(test_json)
    collator = ChatCollator(processor, resolve_for_model(base_model, processor), image_folder=images, max_length=512)
    layout = _measure_layout(base_model, dims, collator([test_rows[0]]))
    logger.info("token layout of %s: %d system, %d visual, %d text", first["id"], layout.system, layout.visual,
                layout.text)
    results = json.loads(cfg.results_path.read_text()) if cfg.results_path.is_file() else {"rows": []}
    speed_batch = {k: v for k, v in collator([test_rows[i] for i in range(min(16, len(test_rows)))]).items()
                   if k != "labels"}
    state = DemoState(cfg=cfg, progress=progress, base_model=base_model, processor=processor, dims=dims,
                      layout=layout, collator=collator, speed_batch=speed_batch, results=results,
                      done={(r["method"], r["budget"]) for r in results["rows"]})
    if ("dense", 1.0) not in state.done:
        state.record("dense", 1.0, evaluate(base_model, processor, test_json, images, progress=False), 1.0, 1.0,
                     rule="every unit")
    return state


def visprune_overrides(cfg: DemoConfig, layout: TokenLayout, budget: float) -> list[str]:
    """The prune-training recipe's settings for one budget: the budget reached a quarter of the way in; with
    `cfg.select` > 1, the plan chosen in the run among that many candidates on the val split (the best few of
    them trained in turn first, when the run is long enough) and trained fixed to the end (`plan_select`),
    else the gates learn to the end and hardening ranks them."""
    steps = cfg.scale.prune_steps
    extra = [f"budget.visual_flops={budget}", f"budget.warmup_steps={max(1, steps // 4)}",
             f"budget.system_tokens={layout.system}", f"budget.text_tokens={layout.text}", f"window={cfg.window}"]
    if cfg.select <= 1:
        return [*extra, "plan_select.at=null"]
    extra += [f"plan_select.candidates={cfg.select}", f"plan_select.data={cfg.data_dir / 'val.json'}"]
    select = load_demo_recipe("visprune.yaml").plan_select
    finalists = min(select.finalists, cfg.select)
    fix_at = select.step(steps)
    if fix_at is not None and finalists > 1 and not finalists <= select.trial_steps(steps) < steps - fix_at:
        return [*extra, "plan_select.finalists=1", "plan_select.trial=0"]  # a run too short to try finalists (ci)
    return [*extra, f"plan_select.finalists={finalists}"]


def run_visprune(state: DemoState) -> None:
    """Stage 3: per budget, one prune-training run (gates learned, then the chosen plan trained fixed), hardened;
    LoRA recovery with the plan fixed, hardened again with the same plan; both recorded."""
    _stage("visprune")
    cfg, scale, layout = state.cfg, state.cfg.scale, state.layout
    todo = state.todo("visprune")
    if not todo:
        return
    select = load_demo_recipe("visprune.yaml", [*visprune_overrides(cfg, layout, min(todo)),
                                                f"train.max_steps={scale.prune_steps}"]).plan_select
    fix_at = select.step(scale.prune_steps)
    trial = select.trial_steps(scale.prune_steps) if fix_at is not None else 0
    fixed = 0 if fix_at is None else scale.prune_steps - fix_at - trial
    finalists = f", the best {select.finalists} trained {trial} steps in turn and scored again" if trial else ""
    rule = f"learned, {cfg.plan_rule}" + (f", best of {cfg.select} on val at step {fix_at}{finalists}, then trained "
                                          "fixed" if fix_at is not None else "")
    trained = f"{trial} training the best {select.finalists} candidates in turn, " if trial else ""
    phases = (f"{scale.prune_steps} prune-training steps ({fix_at} learning the gates, {trained}"
              f"{fixed} with the chosen plan)" if fix_at is not None else f"{scale.prune_steps} prune-training steps")
    for budget in tqdm(todo, desc="visprune prune + harden + recover + eval", disable=not state.progress,
                       leave=False):
        ckpt = _train_run(cfg, "visprune.yaml", cfg.out / "runs" / f"visprune-{budget}",
                          visprune_overrides(cfg, layout, budget))
        hardened = cfg.out / "models" / f"visprune-{budget}-prerecovery"
        harden(ckpt, hardened, budget=budget, overwrite=True, fill=cfg.fill)  # replaces its own export
        state.record_hardened("visprune-pre", budget, hardened, f"before recovery; {phases}", steps=scale.prune_steps,
                              rule=rule)
        # recovery: LoRA fine-tuning of the hardened (merged) model with its plan fixed, as CoFi does
        recovered = _train_run(cfg, "finetune.yaml", cfg.out / "runs" / f"visprune-{budget}-recovery",
                               [f"model.path={hardened}", f"plan={hardened / PLAN_FILE}", f"window={cfg.window}"],
                               steps=scale.recovery_steps)
        target = cfg.out / "models" / f"visprune-{budget}"
        harden(recovered, target, budget=budget, plan_path=str(hardened / PLAN_FILE), overwrite=True)
        state.record_hardened("visprune", budget, target, f"{phases} + {scale.recovery_steps} recovery",
                              steps=scale.prune_steps + scale.recovery_steps, rule=rule)


def _baseline_plan(state: DemoState, method: str, budget: float) -> tuple[Plan, str, str]:
    """The plan of one plan baseline at `budget`, the note its row carries and its rule."""
    cfg = state.cfg
    if method == "vtw":
        plan, layer, extra = vtw_plan(state.dims, state.layout, budget, fill=cfg.fill)
        note = f"visual tokens withdrawn after layer {layer}" + (f", {extra} heads of layer {layer} kept" if extra else "")
        return plan, note, "layer cut" + (", fill" if cfg.fill else "")
    if method == "random":
        plan = random_plan(state.dims, state.layout, budget, cfg.window, seed=cfg.seed, fill=cfg.fill)
        return plan, f"plan seed {cfg.seed}", f"random, {cfg.plan_rule}"
    if state.calibration is None:
        state.calibration = calibrate(state.base_model, [state.calibration_batch()])
    plan = yopo_plan(state.dims, state.layout, budget, state.calibration, window=5)  # the paper's window
    return plan, "", "heuristic, closest below"


def run_plan_baseline(state: DemoState, method: str) -> None:
    """Stage 4 (per method of PLAN_BASELINES): its plan at every budget, fine-tuned with the plan fixed for as
    many steps as visprune trains in all (same LoRA, batch size and learning rate), hardened and recorded."""
    _stage(method)
    cfg = state.cfg
    for budget in tqdm(state.todo(method), desc=method, disable=not state.progress, leave=False):
        plan, note, rule = _baseline_plan(state, method, budget)
        plan_dir = cfg.out / "plans"
        plan_dir.mkdir(parents=True, exist_ok=True)
        plan_path = plan_dir / f"{method}-{budget}.json"
        plan.to_json(plan_path)
        ckpt = _train_run(cfg, "finetune.yaml", cfg.out / "runs" / f"{method}-{budget}",
                          [f"plan={plan_path}", f"window={plan.window if plan.window else 'null'}"],
                          steps=cfg.baseline_steps)
        target = cfg.out / "models" / f"{method}-{budget}"
        harden(ckpt, target, budget=budget, plan_path=str(plan_path), overwrite=True)
        state.record_hardened(method, budget, target, note, steps=cfg.baseline_steps, rule=rule)


def run_fastv(state: DemoState) -> None:
    """Stage 5: FastV on the dense base, training-free; its FLOPs are analytic (tokens are masked, not removed)."""
    _stage("fastv")
    dims, layout = state.dims, state.layout
    data_dir = state.cfg.data_dir
    for budget in state.todo("fastv"):
        settings = fastv_settings(dims, layout, budget)
        if settings is None:
            state.record("fastv", budget, {}, float("nan"), None,
                         f"cannot reach {budget:.0%}: layer {max(1, round(2 * dims.num_layers / 32))} alone costs more",
                         rule="training-free")
            continue
        model, processor = load_for_eval(state.cfg.base_dir)
        attach_fastv(model, settings)
        scores = evaluate(model, processor, data_dir / "test.json", data_dir / "images", progress=False,
                          batch_kwargs=fastv_batch_kwargs)
        state.record("fastv", budget, scores, settings.ratio, None,
                     f"K={settings.layer}, {settings.keep} of {layout.visual} visual tokens kept (masked: FLOPs analytic)",
                     rule="training-free")


def run_shortv(state: DemoState) -> None:
    """Stage 6: ShortV on the dense base, training-free: Layer Contribution of every layer on the val samples YOPO
    calibrates on, then per budget the least contributing layers frozen (skipped where freezing all is not
    enough), executed hardened."""
    _stage("shortv")
    todo = state.todo("shortv")
    if not todo:
        return
    contributions = layer_contributions(state.base_model, [state.calibration_batch()])
    data_dir, plan_dir = state.cfg.data_dir, state.cfg.out / "plans"
    plan_dir.mkdir(parents=True, exist_ok=True)
    for budget in todo:
        plan, frozen, skipped = shortv_plan(state.dims, state.layout, budget, contributions)
        plan.to_json(plan_dir / f"shortv-{budget}.json")
        model, processor = load_for_eval(state.cfg.base_dir)
        apply_plan(model, plan, mode="hardened")
        scores = evaluate(model, processor, data_dir / "test.json", data_dir / "images", progress=False)
        speedup = _prefill_speedup(state.base_model, model, state.speed_batch, state.cfg.scale.speed_repeats)
        layers = [i for i, layer in enumerate(plan.layers) if layer.frozen]
        note = f"{frozen} of {state.dims.num_layers} layers frozen {layers}" + (f", {skipped} skipped" if skipped else "")
        state.record("shortv", budget, scores, plan_flops(model)["ratio"], speedup, note,
                     rule="training-free, layer contribution")


def finish_report(state: DemoState, minutes: float) -> None:
    """Stage 7: the run time into `results.json` (added to the time of earlier calls: a resumed demo reports all
    the time it took), then `report.md` and `pareto.png`."""
    state.results["minutes"] = state.results.get("minutes", 0.0) + minutes
    _write_json(state.cfg.results_path, state.results)
    write_report(state.cfg.out, state.results)


def run_demo(out: str | Path = "runs/demo", size: str = "full", progress: bool = True,
             budgets: tuple[float, ...] = (0.5, 0.25, 0.12), *, seed: int = 0, task: str = DEFAULT_TASK,
             task_options: dict[str, Any] | None = None, fill: bool = True, select: int = 8) -> dict[str, Any]:
    """Run every stage for one seed; returns the results (also in `out/results.json`)."""
    cfg = DemoConfig(out=Path(out), size=size, budgets=tuple(budgets), seed=seed, task=task,
                     task_options=dict(task_options or {}), fill=fill, select=select)
    claim_output(cfg)  # before any progress bar: a refused folder is one line
    start = time.time()
    stages = tqdm(total=3 + len(PLAN_BASELINES) + 2, desc="demo", disable=not progress, position=0)
    prepare_data(cfg, progress)
    stages.update(1)
    state = prepare_base(cfg, progress)
    stages.update(1)
    run_visprune(state)
    stages.update(1)
    for method in PLAN_BASELINES:
        run_plan_baseline(state, method)
        stages.update(1)
    run_fastv(state)
    stages.update(1)
    run_shortv(state)
    stages.update(1)
    finish_report(state, (time.time() - start) / 60)
    stages.close()
    return state.results


SEED_METRICS = ("describe_token_accuracy", "ask_exact_match", "visual_flops_ratio", "prefill_speedup")


def run_seeds(out: str | Path, seeds: list[int] | tuple[int, ...], size: str = "full", progress: bool = True,
              budgets: tuple[float, ...] = (0.5, 0.25, 0.12), *, task: str = DEFAULT_TASK,
              task_options: dict[str, Any] | None = None, fill: bool = True, select: int = 8) -> dict[str, Any]:
    """The whole pipeline once per seed (`out/seed-S`, each resumable; nothing is shared between seeds), then
    one report over the seeds: `out/report.md`, `out/pareto.png` (min-max bars), `out/results.json`."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    out = Path(out)
    for seed in seeds:  # every seed's folder is checked before anything runs
        claim_output(DemoConfig(out=out / f"seed-{seed}", size=size, budgets=tuple(budgets), seed=seed, task=task,
                                task_options=dict(task_options or {}), fill=fill, select=select))
    per_seed = {}
    for seed in tqdm(list(seeds), desc="seeds", disable=not progress, position=1):
        per_seed[seed] = run_demo(out / f"seed-{seed}", size, progress, budgets, seed=seed, task=task,
                                  task_options=task_options, fill=fill, select=select)
    results = aggregate_seeds(per_seed)
    results["minutes"] = sum(v.get("minutes", 0.0) for v in per_seed.values())  # every call's time, every seed
    results["seed_minutes"] = {str(k): v.get("minutes") for k, v in per_seed.items()}
    _write_json(out / "results.json", results)
    write_seeds_report(out, results)
    return results


def aggregate_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per (method, budget): every metric's mean, min, max and per-seed values over the seeds that have the row."""
    keys = sorted({(r["method"], r["budget"]) for res in per_seed.values() for r in res["rows"]},
                  key=lambda k: (METHODS.index(k[0]) if k[0] in METHODS else -1, -k[1]))
    rows = []
    for method, budget in keys:
        found = {seed: next(r for r in res["rows"] if (r["method"], r["budget"]) == (method, budget))
                 for seed, res in per_seed.items()
                 if any((r["method"], r["budget"]) == (method, budget) for r in res["rows"])}
        row: dict[str, Any] = {"method": method, "budget": budget, "seeds": sorted(found)}
        for metric in SEED_METRICS:
            values = {seed: r.get(metric) for seed, r in found.items()}
            clean = [v for v in values.values() if v is not None and not math.isnan(v)]
            row[metric] = ({"mean": statistics.fmean(clean), "min": min(clean), "max": max(clean),
                            "per_seed": {str(k): v for k, v in values.items()}} if clean else None)
        first = next(iter(found.values()))
        row.update({"steps": first.get("steps"), "rule": first.get("rule", "")})
        rows.append(row)
    any_result = next(iter(per_seed.values()))
    config = {k: v for k, v in any_result.get("config", {}).items() if k != "seed"}
    return {"seeds": sorted(per_seed), "config": config, "size": any_result.get("size"),
            "layout": any_result.get("layout"), "rows": rows}


def _span(stat: dict[str, Any] | None, pct: bool = True) -> str:
    if stat is None:
        return "—"
    return f"{_fmt(stat['mean'], pct)} ({_fmt(stat['min'], pct)}–{_fmt(stat['max'], pct)})"


def write_seeds_report(out: Path, results: dict[str, Any]) -> None:
    """`report.md` (mean (min–max) over seeds per method and budget, then every seed's describe accuracy) and
    `pareto.png` (means with min-max bars)."""
    seeds = results["seeds"]
    config = results.get("config", {})
    lines = ["# visprune see-task demo over seeds", "",
             (f"Task `{config.get('task')}` {config.get('task_options') or ''}, size `{results.get('size')}`, "
              f"seeds {', '.join(map(str, seeds))} (each seed: its own data, dense base, gate training and "
              f"baselines); {results.get('minutes', 0):.1f} minutes on this machine. Cells: mean (min–max) over "
              "seeds."), "",
             ("| method | budget | visual FLOPs | describe token acc. | ask exact match | prefill speed-up | steps | "
             "plan rule |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['budget']:.0%} | {_span(r['visual_flops_ratio'])} | "
                     f"{_span(r['describe_token_accuracy'])} | {_span(r['ask_exact_match'])} | "
                     f"{_span(r['prefill_speedup'], pct=False)} | {r.get('steps', '')} | {r.get('rule', '')} |")
    lines += ["", "Describe token accuracy per seed:", "",
              "| method | budget | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
    for r in results["rows"]:
        per = (r["describe_token_accuracy"] or {}).get("per_seed", {})
        lines.append(f"| {r['method']} | {r['budget']:.0%} | "
                     + " | ".join(_fmt(per.get(str(s))) for s in seeds) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _pareto_seeds(out / "pareto.png", results["rows"], len(seeds))


def _pareto_seeds(path: Path, rows: list[dict[str, Any]], num_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=120)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in METHODS:
        pts = sorted((r["visual_flops_ratio"]["mean"], r["describe_token_accuracy"]) for r in rows
                     if r["method"] == method and r["describe_token_accuracy"] and r["visual_flops_ratio"])
        if not pts:
            continue
        xs = [100 * x for x, _ in pts]
        ys = [100 * a["mean"] for _, a in pts]
        err = [[100 * (a["mean"] - a["min"]) for _, a in pts], [100 * (a["max"] - a["mean"]) for _, a in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
    if dense is not None and dense["describe_token_accuracy"]:
        ax.axhline(100 * dense["describe_token_accuracy"]["mean"], color="grey", linestyle="--", label="dense")
    ax.set_xlabel("visual FLOPs kept (% of dense, mean over seeds)")
    ax.set_ylabel("describe token accuracy (%)")
    ax.set_title(f"see-task over {num_seeds} seeds: mean, bars min-max")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.1%}" if pct else f"{value:.2f}x"


def write_report(out: Path, results: dict[str, Any]) -> None:
    """`report.md` (table: method x budget) and `pareto.png` (describe accuracy vs visual FLOPs)."""
    rows = sorted(results["rows"], key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else -1,
                                                  -r["budget"]))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    config = results.get("config", {})
    lines = ["# visprune see-task demo", "",
             (f"Task `{config.get('task')}` {config.get('task_options') or ''}, seed {config.get('seed')}, size "
              f"`{results.get('size')}`; token layout {results.get('layout')}; "
              f"{results.get('minutes', 0):.1f} minutes on this machine. Steps: training steps after the dense "
              "base (visprune: its prune-training run + one recovery run; every plan baseline fine-tunes as many)."),
             "",
             ("| method | budget | visual FLOPs | describe token acc. | ask exact match | prefill speed-up | steps | "
             "plan rule | note |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']:.0%} | {_fmt(r['visual_flops_ratio'])} | "
                     f"{_fmt(r['describe_token_accuracy'])} | {_fmt(r['ask_exact_match'])} | "
                     f"{_fmt(r['prefill_speedup'], pct=False)} | {r.get('steps', '')} | {r.get('rule', '')} | "
                     f"{r.get('note', '')} |")
    if dense is not None:
        lines += ["", (f"Dense describe token accuracy {_fmt(dense['describe_token_accuracy'])}; a method keeps "
                      "`describe / dense` of it.")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _pareto(out / "pareto.png", rows)


def _pareto(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=120)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in METHODS:
        pts = sorted((r["visual_flops_ratio"], r["describe_token_accuracy"]) for r in rows
                     if r["method"] == method and r["describe_token_accuracy"] is not None
                     and not math.isnan(r["visual_flops_ratio"]))
        if pts:
            ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=method)
    if dense is not None:
        ax.axhline(100 * dense["describe_token_accuracy"], color="grey", linestyle="--", label="dense")
    ax.set_xlabel("visual FLOPs kept (% of dense)")
    ax.set_ylabel("describe token accuracy (%)")
    ax.set_title("see-task: accuracy vs visual FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never hides a point
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["CONFIG_FILE", "DEFAULT_TASK", "METHODS", "PLAN_BASELINES", "RECIPE_NAMES", "SIZES", "TASKS", "TASK_OPTIONS",
           "DemoConfig", "DemoError", "DemoSize", "DemoState", "SeeTaskPreset", "aggregate_seeds", "claim_output",
           "finish_report", "load_demo_recipe", "prepare_base", "prepare_data", "run_demo", "run_fastv",
           "run_plan_baseline", "run_seeds", "run_shortv", "run_visprune", "write_report", "write_seeds_report"]
