"""The demo's settings and seeds: a folder is refused for another configuration, several seeds make one
report (mean, min, max per row, every seed's value), the plan baselines use their budget at equal steps,
and the CLI's seed and task options reach the demo."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from visprune.experiments.seetask import demo
from visprune.experiments.seetask.baselines import vtw_plan
from visprune.modeling import LayerPlan, ModelDims, default_layout
from visprune.modeling.flops import plan_visual_ratio
from visprune.trainer.cli import main


def fake_results(seed: int, visprune_12: float) -> dict:
    rows = [{"method": "dense", "budget": 1.0, "visual_flops_ratio": 1.0, "describe_token_accuracy": 0.99,
             "ask_exact_match": 0.5, "prefill_speedup": 1.0, "steps": 0, "rule": "every unit"},
            {"method": "visprune", "budget": 0.12, "visual_flops_ratio": 0.11, "describe_token_accuracy": visprune_12,
             "ask_exact_match": 0.4, "prefill_speedup": 1.2, "steps": 240, "rule": "learned, fill"},
            {"method": "fastv", "budget": 0.12, "visual_flops_ratio": float("nan"), "describe_token_accuracy": None,
             "ask_exact_match": None, "prefill_speedup": None, "steps": 0, "rule": "training-free"}]
    return {"rows": rows, "size": "ci", "config": {"task": "basic", "seed": seed, "task_options": {}},
            "layout": {}, "minutes": 1.0}


def test_aggregate_gives_mean_min_max_and_every_seed():
    agg = demo.aggregate_seeds({0: fake_results(0, 0.9), 1: fake_results(1, 0.7), 2: fake_results(2, 0.8)})
    row = next(r for r in agg["rows"] if r["method"] == "visprune")
    acc = row["describe_token_accuracy"]
    assert acc["mean"] == pytest.approx(0.8) and acc["min"] == 0.7 and acc["max"] == 0.9
    assert acc["per_seed"] == {"0": 0.9, "1": 0.7, "2": 0.8}
    assert row["steps"] == 240 and row["rule"] == "learned, fill" and row["seeds"] == [0, 1, 2]
    assert next(r for r in agg["rows"] if r["method"] == "fastv")["describe_token_accuracy"] is None
    assert agg["seeds"] == [0, 1, 2] and "seed" not in agg["config"]


def test_seeds_report_and_plot(tmp_path):
    agg = demo.aggregate_seeds({3: fake_results(3, 0.95), 4: fake_results(4, 0.85)})
    demo.write_seeds_report(tmp_path, agg)
    report = (tmp_path / "report.md").read_text()
    assert "| visprune | 12% | 11.0% (11.0%–11.0%) | 90.0% (85.0%–95.0%) |" in report
    assert "| seed 3 | seed 4 |" in report and "| visprune | 12% | 95.0% | 85.0% |" in report
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_run_seeds_runs_each_seed_in_its_own_folder(tmp_path, monkeypatch):
    calls = []

    def fake_run_demo(out, size, progress, budgets, *, seed, task, task_options, fill, select):
        calls.append((out.name, seed, task, task_options, fill))
        return fake_results(seed, 0.5 + seed / 10)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    results = demo.run_seeds(tmp_path, [0, 2], size="ci", progress=False, task="basic", task_options={"grid": 2})
    assert calls == [("seed-0", 0, "basic", {"grid": 2}, True), ("seed-2", 2, "basic", {"grid": 2}, True)]
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 2]
    assert results["rows"][1]["describe_token_accuracy"]["max"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="distinct"):
        demo.run_seeds(tmp_path, [1, 1], progress=False)


def test_a_folder_of_another_configuration_is_refused(tmp_path):
    out = tmp_path / "demo"
    demo.claim_output(demo.DemoConfig(out=out, size="ci", seed=0))
    demo.claim_output(demo.DemoConfig(out=out, size="ci", seed=0))  # the same settings resume
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(demo.DemoError, match="seed 0 here, 1 asked"):
        demo.claim_output(demo.DemoConfig(out=out, size="ci", seed=1))
    with pytest.raises(demo.DemoError, match="grid"):
        demo.claim_output(demo.DemoConfig(out=out, size="ci", task_options={"grid": 2, "image_size": 36}))
    assert sorted(p.name for p in out.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(demo.DemoError, match="not empty"):
        demo.claim_output(demo.DemoConfig(out=other, size="ci"))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_task_options_and_seed_reach_the_generator_and_base():
    cfg = demo.DemoConfig(out=None, size="ci", seed=5, task="basic", task_options={"grid": 2, "num_colours": 3})
    data = cfg.seetask_config()
    assert (data.grid, data.num_colours, data.seed, data.num_train) == (2, 3, 5, demo.SIZES["ci"].num_train)
    assert cfg.base_config().seed == 5 and cfg.base_config().steps == demo.SIZES["ci"].base_steps
    assert cfg.baseline_steps == demo.SIZES["ci"].prune_steps + demo.SIZES["ci"].recovery_steps
    with pytest.raises(ValueError, match="unknown see-task options"):
        demo.DemoConfig(out=None, task_options={"colour": 1})
    with pytest.raises(ValueError, match="task must be one of"):
        demo.DemoConfig(out=None, task="nope")
    with pytest.raises(ValueError, match="multiple of grid"):
        demo.DemoConfig(out=None, task_options={"grid": 5})


@pytest.mark.parametrize("budget", [0.05, 0.12, 0.25, 0.5])
def test_vtw_fill_uses_the_budget(budget):
    dims = ModelDims(name="t", family="llava", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=4,
                     head_dim=32, intermediate_size=512, image_grid=(6, 6))
    layout = default_layout(dims, system=3, text=30)
    plain, k, extra = vtw_plan(dims, layout, budget)
    filled, k2, extra2 = vtw_plan(dims, layout, budget, fill=True)
    assert extra == 0 and k2 == k
    ratio = plan_visual_ratio(dims, layout, filled)
    assert plan_visual_ratio(dims, layout, plain) <= ratio <= budget + 1e-9
    if k < 4:
        assert filled.layers[k].heads == tuple(range(extra2)) and not filled.layers[k].mlp
        if extra2 < 4:  # one more head of layer K would not fit
            layers = list(filled.layers)
            layers[k] = LayerPlan(heads=tuple(range(extra2 + 1)), mlp=False)
            assert plan_visual_ratio(dims, layout, replace(filled, layers=tuple(layers))) > budget


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "expected comma-separated seeds"),
    (["--seeds", "1,1"], "seeds repeat"),
    (["--seed", "-1"], "must be >= 0"),
    (["--seed", "1", "--seeds", "1,2"], "not allowed with argument"),
    (["--task", "nope"], "invalid choice"),
    (["--grid", "0"], "must be >= 1"),
])
def test_cli_refuses_bad_demo_options(tmp_path, capsys, argv, message):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(out), "--size", "ci", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_an_impossible_task_in_one_line(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "ci", "--grid", "5"]) == 2
    err = capsys.readouterr().err
    assert "multiple of grid" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_basic_task_is_the_generator_and_base_defaults_and_fine_is_the_demo_default():
    from visprune.data_prep.seetask import SeeTaskConfig
    from visprune.experiments.seetask.base_model import BaseModelConfig

    basic = demo.DemoConfig(out=None, size="full", task="basic")
    assert basic.seetask_config() == SeeTaskConfig(num_train=4000, num_val=100, num_test=400, seed=0)
    assert basic.base_config() == BaseModelConfig(steps=demo.SIZES["full"].base_steps, seed=0)
    fine = demo.DemoConfig(out=None, size="full")
    assert fine.task == demo.DEFAULT_TASK == "fine"
    assert fine.seetask_config().patch_grid == 9 and fine.base_config().vision_feature_layer == -2


def test_cli_refuses_a_folder_of_another_demo_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    demo.claim_output(demo.DemoConfig(out=out, size="ci", seed=0))
    (out / "results.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["demo", "--out", str(out), "--size", "ci", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "choose another --out" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
