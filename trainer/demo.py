"""`visprune demo`: the accuracy-vs-FLOPs experiment on the synthetic see-task, end to end on CPU.

Stages: generate data -> train the dense base -> prune-train once (visprune: LoRA + gates +
Lagrangian + distillation) -> harden at every budget -> the baselines at the same budgets (VTW,
YOPO heuristic, random plan: each fine-tuned with the same LoRA budget and its plan fixed; FastV:
training-free) -> evaluate all on the test split -> `report.md`, `pareto.png`, `results.json`.
Every stage writes its own folder and is skipped when its result exists (a crashed demo resumes).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.collator import LlavaCollator
from visprune.data_prep.records import build_dataset
from visprune.data_prep.seetask import SeeTaskConfig, write_seetask
from visprune.data_prep.templates import resolve_for_model
from visprune.modeling import PLAN_FILE, default_layout
from visprune.modeling.flops import dims_from_config

from .base import BASE_REPORT, BaseModelConfig, train_base
from .baselines import attach_fastv, calibrate, fastv_batch_kwargs, fastv_settings, random_plan, vtw_plan, yopo_plan
from .config import load_recipe
from .evaluate import evaluate, load_for_eval, plan_flops
from .export import harden
from .trainer import train

logger = logging.getLogger(__name__)

METHODS = ("visprune", "yopo", "vtw", "fastv", "random")
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "seetask"


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
    "full": DemoSize(num_train=4000, num_test=400, base_steps=300, prune_steps=120, recovery_steps=120,
                     batch_size=16, speed_repeats=5),
    "quick": DemoSize(num_train=1500, num_test=200, base_steps=150, prune_steps=30, recovery_steps=10,
                      batch_size=16, speed_repeats=3),
    "ci": DemoSize(num_train=200, num_test=40, base_steps=12, prune_steps=4, recovery_steps=2, batch_size=8,
                   speed_repeats=1),
}


@dataclass
class DemoConfig:
    out: Path
    size: str = "full"
    budgets: tuple[float, ...] = (0.5, 0.25, 0.12)
    window: int = 3
    seed: int = 0


def _stage(name: str) -> None:
    logger.info("==== %s ====", name)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _train_run(recipe_file: Path, out_dir: Path, cfg: DemoConfig, size: DemoSize, extra: list[str],
               steps: int | None = None) -> Path:
    """Train one recipe (resumable); returns its final checkpoint folder."""
    steps = steps or size.prune_steps
    overrides = [f"model.path={cfg.out / 'base'}", f"data.path={cfg.out / 'data' / 'train.json'}",
                 f"data.image_folder={cfg.out / 'data' / 'images'}", f"output.dir={out_dir}",
                 f"train.max_steps={steps}", f"output.save_steps={steps}",
                 f"train.micro_batch_size={size.batch_size}", f"train.seed={cfg.seed + 17}", *extra]
    recipe = load_recipe(recipe_file, overrides)
    run_dir = train(recipe, resume="auto")
    return run_dir / f"checkpoint-{steps}"


def _prefill_speedup(dense_model, pruned, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """Median dense / hardened prefill time on one test batch, alternating, same process."""
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    with torch.no_grad():
        for model in (dense_model, pruned):
            model(**batch)  # warm-up
        for rep in range(repeats):
            order = [("dense", dense_model), ("pruned", pruned)]
            for name, model in order if rep % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["dense"]) / statistics.median(times["pruned"])


def run_demo(out: str | Path = "runs/demo", size: str = "full", progress: bool = True,
             budgets: tuple[float, ...] = (0.5, 0.25, 0.12)) -> dict[str, Any]:
    """Run every stage; returns the results (also in `out/results.json`)."""
    from tqdm.auto import tqdm

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = DemoConfig(out=Path(out), size=size, budgets=tuple(budgets))
    sz = SIZES[size]
    cfg.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stages = tqdm(total=7, desc="demo", disable=not progress, position=0)

    # 1. data
    _stage("data")
    data_dir = cfg.out / "data"
    if not (data_dir / "scenes.json").is_file():
        write_seetask(data_dir, SeeTaskConfig(num_train=sz.num_train, num_val=100, num_test=sz.num_test,
                                              seed=cfg.seed), progress=progress)
    test_json, images = data_dir / "test.json", data_dir / "images"
    stages.update(1)

    # 2. dense base
    _stage("dense base")
    base_dir = cfg.out / "base"
    if not (base_dir / BASE_REPORT).is_file():
        train_base(data_dir, base_dir, BaseModelConfig(steps=sz.base_steps, seed=cfg.seed), progress=progress)
    base_model, processor = load_for_eval(base_dir)
    dims = dims_from_config(base_model.config)
    first = json.loads(test_json.read_text())[0]
    test_rows = build_dataset(test_json)
    collator = LlavaCollator(processor, resolve_for_model(base_model, processor), image_folder=images, max_length=512)
    sample = collator([test_rows[0]])
    image_pos = (sample["input_ids"][0] == base_model.config.image_token_id).nonzero().squeeze(1)
    layout = default_layout(dims, system=int(image_pos[0]), text=int(sample["input_ids"].shape[1] - image_pos[-1] - 1))
    logger.info("token layout of %s: %d system, %d visual, %d text", first["id"], layout.system, layout.visual,
                layout.text)
    results_path = cfg.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    done = {(r["method"], r["budget"]) for r in results["rows"]}

    def record(method: str, budget: float, scores: dict[str, Any], ratio: float, speedup: float | None,
               note: str = "") -> None:
        results["rows"] = [r for r in results["rows"] if (r["method"], r["budget"]) != (method, budget)]
        results["rows"].append({"method": method, "budget": budget, "visual_flops_ratio": ratio,
                                "describe_token_accuracy": scores.get("describe_token_accuracy"),
                                "ask_exact_match": scores.get("ask_exact_match"), "by_type": scores.get("by_type"),
                                "prefill_speedup": speedup, "note": note})
        results.update({"size": size, "layout": layout.to_dict(), "dims": asdict(dims)})
        _write_json(results_path, results)
        done.add((method, budget))

    if ("dense", 1.0) not in done:
        record("dense", 1.0, evaluate(base_model, processor, test_json, images, progress=False), 1.0, 1.0)
    speed_batch = {k: v for k, v in collator([test_rows[i] for i in range(min(16, len(test_rows)))]).items()
                   if k != "labels"}
    stages.update(1)

    def finish(method: str, budget: float, model_dir: Path, note: str = "") -> None:
        model, proc = load_for_eval(model_dir)  # hardened: the folder has a plan
        scores = evaluate(model, proc, test_json, images, progress=False)
        speed = _prefill_speedup(base_model, model, speed_batch, sz.speed_repeats)
        record(method, budget, scores, plan_flops(model)["ratio"], speed, note)

    # 3. visprune: one prune-training run, hardened at every budget
    _stage("visprune")
    lowest = min(cfg.budgets)
    todo = [b for b in cfg.budgets if ("visprune", b) not in done]
    if todo:
        warmup = max(1, int(0.5 * sz.prune_steps))
        ckpt = _train_run(RECIPES / "visprune.yaml", cfg.out / "runs" / "visprune", cfg, sz,
                          [f"budget.visual_flops={lowest}", f"budget.warmup_steps={warmup}",
                           f"budget.system_tokens={layout.system}", f"budget.text_tokens={layout.text}",
                           f"window={cfg.window}"])
        for budget in tqdm(todo, desc="visprune harden + recover + eval", disable=not progress, leave=False):
            hardened = cfg.out / "models" / f"visprune-{budget}-prerecovery"
            harden(ckpt, hardened, budget=budget, overwrite=True)  # a rerun replaces its own export
            # recovery: LoRA fine-tuning of the hardened (merged) model with its plan fixed, as CoFi does
            recovered = _train_run(RECIPES / "finetune.yaml", cfg.out / "runs" / f"visprune-{budget}-recovery", cfg,
                                   sz, [f"model.path={hardened}", f"plan={hardened / PLAN_FILE}",
                                        f"window={cfg.window}"], steps=sz.recovery_steps)
            target = cfg.out / "models" / f"visprune-{budget}"
            harden(recovered, target, budget=budget, plan_path=str(hardened / PLAN_FILE), overwrite=True)
            finish("visprune", budget, target, f"{sz.prune_steps} shared + {sz.recovery_steps} recovery steps")
    stages.update(1)

    # 4. plan baselines, each fine-tuned with its plan fixed
    calib = None
    for method in ("yopo", "vtw", "random"):
        _stage(method)
        for budget in tqdm([b for b in cfg.budgets if (method, b) not in done], desc=method,
                           disable=not progress, leave=False):
            note = ""
            if method == "vtw":
                plan, k = vtw_plan(dims, layout, budget)
                note = f"visual tokens withdrawn after layer {k}"
            elif method == "random":
                plan = random_plan(dims, layout, budget, cfg.window, seed=cfg.seed)
            else:
                if calib is None:
                    val_rows = build_dataset(data_dir / "val.json")
                    calib_batch = collator([val_rows[i] for i in range(min(32, len(val_rows)))])
                    calib = calibrate(base_model, [calib_batch])
                plan = yopo_plan(dims, layout, budget, calib, window=5)  # the paper's window
            plan_dir = cfg.out / "plans"
            plan_dir.mkdir(parents=True, exist_ok=True)
            plan_path = plan_dir / f"{method}-{budget}.json"
            plan.to_json(plan_path)
            ckpt = _train_run(RECIPES / "finetune.yaml", cfg.out / "runs" / f"{method}-{budget}", cfg, sz,
                              [f"plan={plan_path}", f"window={plan.window if plan.window else 'null'}"])
            target = cfg.out / "models" / f"{method}-{budget}"
            harden(ckpt, target, budget=budget, plan_path=str(plan_path), overwrite=True)
            finish(method, budget, target, note)
        stages.update(1)

    # 5. FastV: training-free, on the dense base
    _stage("fastv")
    todo = [b for b in cfg.budgets if ("fastv", b) not in done]
    for budget in todo:
        settings = fastv_settings(dims, layout, budget)
        if settings is None:
            record("fastv", budget, {}, float("nan"), None,
                   f"cannot reach {budget:.0%}: layer {max(1, round(2 * dims.num_layers / 32))} alone costs more")
            continue
        model, proc = load_for_eval(base_dir)
        attach_fastv(model, settings)
        scores = evaluate(model, proc, test_json, images, progress=False, batch_kwargs=fastv_batch_kwargs)
        record("fastv", budget, scores, settings.ratio, None,
               f"K={settings.layer}, {settings.keep} of {layout.visual} visual tokens kept (masked: FLOPs analytic)")
    stages.update(1)

    results["minutes"] = (time.time() - start) / 60
    _write_json(results_path, results)
    write_report(cfg.out, results)
    stages.close()
    return results


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.1%}" if pct else f"{value:.2f}x"


def write_report(out: Path, results: dict[str, Any]) -> None:
    """`report.md` (table: method x budget) and `pareto.png` (describe accuracy vs visual FLOPs)."""
    rows = sorted(results["rows"], key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else -1,
                                                  -r["budget"]))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = ["# visprune see-task demo", "",
             (f"Size `{results.get('size')}`; token layout {results.get('layout')}; "
             f"{results.get('minutes', 0):.1f} minutes on this machine."), "",
             "| method | budget | visual FLOPs | describe token acc. | ask exact match | prefill speed-up | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']:.0%} | {_fmt(r['visual_flops_ratio'])} | "
                     f"{_fmt(r['describe_token_accuracy'])} | {_fmt(r['ask_exact_match'])} | "
                     f"{_fmt(r['prefill_speedup'], pct=False)} | {r.get('note', '')} |")
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


__all__ = ["METHODS", "SIZES", "run_demo", "write_report"]
