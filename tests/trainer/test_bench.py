"""`visprune bench` on a tiny config: the JSON contract and sane values (timings are not asserted)."""

import json

import pytest
from conftest import tiny_llava
from visprune.trainer.bench import spread_layers
from visprune.trainer.cli import main

KEYS = {"dense_ms", "hardened_ms", "measured_speedup", "predicted_speedup", "efficiency", "dense_kv_bytes",
        "hardened_kv_bytes"}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llava().config.save_pretrained(folder)
    return folder


def test_bench_json_contract(config_dir, capsys):
    assert main(["bench", "--model", str(config_dir), "--layers", "2", "--budget", "0.5", "--repeats", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert result["dense_ms"] > 0 and result["hardened_ms"] > 0
    assert result["predicted_speedup"] >= 1.0
    assert result["efficiency"] == pytest.approx(result["measured_speedup"] / result["predicted_speedup"])
    assert 0 < result["hardened_kv_bytes"] <= result["dense_kv_bytes"]
    assert result["visual_flops_ratio"] <= 1.0 and result["plan_layers"] == [0, 2]


def test_bench_with_a_plan_file_and_text_output(config_dir, tmp_path, capsys):
    from visprune.modeling import LayerPlan, Plan

    plan = Plan(family="llava", window=3, num_layers=3, num_heads=4,
                layers=(LayerPlan(heads=(0, 1), mlp=True), LayerPlan(heads=(), mlp=False), LayerPlan(heads=(2,), mlp=False)))
    plan.to_json(tmp_path / "plan.json")
    assert main(["bench", "--model", str(config_dir), "--layers", "3", "--plan", str(tmp_path / "plan.json"),
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "speed-up measured" in out and "predicted (FLOPs)" in out and "KV cache" in out


def test_bench_errors(config_dir, capsys):
    assert main(["bench", "--model", str(config_dir), "--layers", "9"]) == 2
    assert "--layers must be in [1, 3]" in capsys.readouterr().err
    assert main(["bench", "--model", str(config_dir), "--budget", "0.5", "--plan", "x.json"]) == 2


def test_spread_layers():
    assert spread_layers(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert spread_layers(3, 3) == [0, 1, 2]
