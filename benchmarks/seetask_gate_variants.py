"""Gate-training variants on the see-task, per train seed: one demo's data and dense base, then for every
variant and seed a visprune prune-training run (the demo's recipe and steps plus the variant's recipe
overrides; one per budget when the variant fixes its plan half-way, `plan_select`), hardened at each budget by
the gates' own ranking and by `--select` candidates on the val split (a run that fixed its plan exports it),
scored on the test split before any recovery. Prints one Markdown table (per-seed describe token accuracy,
then mean and min) and writes `OUT/variants.json`.

Run: python benchmarks/seetask_gate_variants.py --out runs/variants [--task T] [--size quick]
     [--seeds 0,1,2,3,4] [--variants default,slow-warmup] [--budgets 0.25,0.12]
Every (variant, seed, budget) run keeps its own folder, so an interrupted run resumes; budgets a (variant, seed)
already has in `variants.json` are kept and only the others are run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from visprune.experiments.seetask import demo
from visprune.trainer.eval.loading import load_for_eval, plan_flops
from visprune.trainer.eval.teacher_forced import evaluate
from visprune.trainer.export import harden
from visprune.trainer.plan_select import PlanSelection

# name -> (recipe overrides, what it changes); steps and paths are the demo's (`demo.visprune_overrides`). The
# demo's recipe anneals the temperature, adds the plan loss from a quarter of the run and, at 37.5% of it, scores
# 8 candidate plans on the val split, trains the best 3 in turn for 15% of the run and fixes the best of them
# (plan_select). "trial-half" scores the candidates half-way instead, the base of the trial-* variants;
# "no-trial-half" fixes the best candidate at once, half-way, the base of the select-* variants; "no-select" is
# the recipe before plan_select, the base of the variants below it; "previous" the one before annealing and the
# plan loss, the base of the oldest.
NO_TRIAL = ["plan_select.finalists=1", "plan_select.trial=0"]
HALF = ["plan_select.at=0.5"]
NO_SELECT = ["plan_select.at=null", "budget.warmup_steps={half}", "plan_loss.start=0.5"]
PREVIOUS = [*NO_SELECT, "gates.temperature_start=null", "gates.temperature=0.667", "plan_loss.weight=0"]
VARIANTS = {
    "default": ([], ("the demo's visprune recipe: at step 30 of 80, the best 3 of 8 candidate plans on val trained "
                     "in turn for 12 steps, the best of them on val trained fixed to the end (plan_select)")),
    "mlp-channels-64": (["gates.mlp_channel_block=64"],
                        "default with learned MLP channels: gates over blocks of 64 of the 512 MLP channels"),
    "freeze": (["gates.visual_freeze=true"],
               "default with freeze gates: a layer may freeze its visual rows (text still reads their K/V, rule 7)"),
    "rings": (["gates.window_rings=true"],
              "default with a learned window radius per layer: a ring gate on the 3 x 3 window's ring (radius 0 or 1)"),
    "rings-5": (["window=5", "gates.window_rings=true"],
                "default with a 5 x 5 window whose two rings are learned per layer (radius 0, 1 or 2)"),
    "window-5": (["window=5"], "default with a fixed 5 x 5 window (the base of rings-5)"),
    "no-trial": (NO_TRIAL, "default without finalists: the best candidate on val fixed at once, at step 30"),
    "trial-half": (HALF, "default, the candidates scored half-way (step 40)"),
    "trial-3-short": ([*HALF, "plan_select.trial=0.075"], "trial-half, the finalists trained 6 steps instead of 12"),
    "trial-2": ([*HALF, "plan_select.finalists=2", "plan_select.trial=0.1"],
                "trial-half, the best 2 candidates for 8 steps"),
    "trial-4": ([*HALF, "plan_select.finalists=4", "plan_select.trial=0.2"],
                "trial-half, the best 4 candidates for 16 steps"),
    "trial-8-8": ([*HALF, "plan_select.finalists=8", "plan_select.trial=0.3"],
                  "trial-half, all 8 candidates for 24 steps"),
    "trial-16-4": ([*HALF, "plan_select.candidates=16", "plan_select.finalists=4", "plan_select.trial=0.2"],
                   "trial-half, the best 4 of 16 candidates for 16 steps"),
    "trial-16-6": ([*HALF, "plan_select.candidates=16", "plan_select.finalists=6", "plan_select.trial=0.3"],
                   "trial-half, the best 6 of 16 candidates for 24 steps"),
    "no-trial-half": ([*NO_TRIAL, *HALF], "the best candidate on val fixed at once, half-way (the previous default)"),
    "select-no-restart": ([*NO_TRIAL, *HALF, "plan_select.restart_lr=false"],
                          "no-trial-half, one learning-rate schedule over the whole run (no restart at the fix)"),
    "select-no-plan-loss": ([*NO_TRIAL, *HALF, "plan_loss.weight=0"], "no-trial-half without the plan loss"),
    "select-16": ([*NO_TRIAL, *HALF, "plan_select.candidates=16", "plan_select.samples=100"],
                  "no-trial-half, choosing among 16 candidates on 100 val samples"),
    "no-select": (NO_SELECT, ("no plan_select: the gates learn to the end, hardening takes their plan (or the best "
                              "of 8 on val); budget reached and plan loss from half-way")),
    "no-plan-loss": ([*NO_SELECT, "plan_loss.weight=0"], "no-select, annealing only"),
    "constant-temperature": ([*NO_SELECT, "gates.temperature_start=null", "gates.temperature=0.667"],
                             "no-select, the plan loss only"),
    "plan-early": ([*NO_SELECT, "plan_loss.start=0.25"], "no-select, plan loss from a quarter of the run on"),
    "plan-heavy": ([*NO_SELECT, "plan_loss.weight=3"], "no-select, plan loss weighted 3 instead of 1"),
    "plan-choice-4": ([*NO_SELECT, "plan_loss.candidates=4"],
                      "no-select, each plan-loss step trains the best of 4 candidate plans on its own batch"),
    "plan-choice-8": ([*NO_SELECT, "plan_loss.candidates=8"], "the same with 8 candidates"),
    "previous": (PREVIOUS, "neither annealing nor the plan loss: constant temperature 2/3"),
    "lambda-lr-0.1": ([*PREVIOUS, "optim.lambda_lr=0.1"], "previous, multiplier learning rate 0.1 instead of 0.5"),
    "slow-warmup": ([*PREVIOUS, "budget.warmup_steps={steps}"],
                    "previous, the budget reaches its target at the last step, not half-way"),
    "one-draw": ([*PREVIOUS, "gates.per_sample=false"], "previous, one gate draw per batch instead of one per sample"),
    "gate-lr-0.03": ([*PREVIOUS, "optim.gate_lr=0.03"], "previous, gate learning rate 0.03 instead of 0.1"),
    "no-distill": ([*PREVIOUS, "distill.enabled=false"], "previous, no self-distillation from the dense model"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default=demo.DEFAULT_TASK, choices=sorted(demo.TASKS))
    parser.add_argument("--size", default="full", choices=sorted(demo.SIZES))
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data and the dense base")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="train seeds of the gate runs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--budgets", default="0.25,0.12")
    parser.add_argument("--select", type=int, default=8, help="candidates of the selected plan")
    parser.add_argument("--prune-steps", type=int, help="prune-training steps (default: the demo size's)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    if args.prune_steps:
        demo.SIZES[args.size] = replace(demo.SIZES[args.size], prune_steps=args.prune_steps)
    cfg = demo.DemoConfig(out=out / "shared", size=args.size, seed=args.data_seed, task=args.task)
    demo.prepare_data(cfg, progress=False)
    state = demo.prepare_base(cfg, progress=False)
    dense = next(r for r in state.results["rows"] if r["method"] == "dense")["describe_token_accuracy"]
    results_path = out / "variants.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    results.update({"task": args.task, "size": args.size, "data_seed": args.data_seed, "dense": dense})
    data_dir, layout, scale = cfg.data_dir, state.layout, cfg.scale
    for variant in variants:
        overrides, _ = VARIANTS[variant]
        for seed in seeds:
            key = f"{variant}/seed-{seed}"
            run = dict(results["runs"].get(key, {}))  # budgets already measured are kept; the others are added
            todo = [budget for budget in sorted(budgets) if f"{budget}/ranking" not in run]
            if not todo:
                continue
            start = time.time()
            run_cfg = demo.DemoConfig(out=cfg.out, size=args.size, seed=seed, task=args.task)
            extra = [o.format(steps=scale.prune_steps, half=max(1, int(0.5 * scale.prune_steps))) for o in overrides]
            base = [*demo.visprune_overrides(cfg, layout, min(budgets)), *extra]
            # a run that fixes its plan (plan_select) trains one budget: one run per budget then, else one in all
            per_budget = demo.load_demo_recipe("visprune.yaml", base).plan_select.at is not None
            ckpt = None
            for budget in todo:
                if ckpt is None or per_budget:
                    folder, trained = (f"seed-{seed}-{budget}", budget) if per_budget else (f"seed-{seed}", min(budgets))
                    ckpt = demo._train_run(run_cfg, "visprune.yaml", out / "runs" / variant / folder,
                                           [*base, f"budget.visual_flops={trained}"])
                for how, select in (("ranking", None), (f"best of {args.select}",
                                                         PlanSelection(data_dir / "val.json", data_dir / "images",
                                                                       candidates=args.select, seed=seed))):
                    target = out / "models" / variant / f"seed-{seed}-{budget}-{how.replace(' ', '')}"
                    harden(ckpt, target, budget=budget, overwrite=True, fill=True, select=select)
                    model, processor = load_for_eval(target)
                    scores = evaluate(model, processor, data_dir / "test.json", data_dir / "images", progress=False)
                    run[f"{budget}/{how}"] = {"describe": scores["describe_token_accuracy"],
                                              "ratio": plan_flops(model)["ratio"]}
            run["minutes"] = run.get("minutes", 0.0) + (time.time() - start) / 60
            results["runs"][key] = run
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(key, {k: round(v["describe"], 4) for k, v in run.items() if k != "minutes"}, flush=True)
    print_table(results, variants, seeds, budgets, args.select)


def print_table(results: dict, variants: list[str], seeds: list[int], budgets: list[float], select: int) -> None:
    dense = results["dense"]
    print(f"\nTask `{results['task']}`, size `{results['size']}`, data seed {results['data_seed']}; dense describe "
          f"token accuracy {dense:.1%}. Cells: describe token accuracy before recovery (share of dense).\n")
    print("| variant | budget | plan | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |")
    for variant in variants:
        for budget in budgets:
            for how in ("ranking", f"best of {select}"):
                values = [results["runs"].get(f"{variant}/seed-{s}", {}).get(f"{budget}/{how}", {}).get("describe")
                          for s in seeds]
                shown = [f"{v:.1%}" if v is not None else "—" for v in values]
                clean = [v for v in values if v is not None]
                tail = (f"{statistics.fmean(clean):.1%} | {min(clean):.1%}" if clean else "— | —")
                print(f"| {variant} | {budget:.0%} | {how} | " + " | ".join(shown) + f" | {tail} |")


if __name__ == "__main__":
    main()
