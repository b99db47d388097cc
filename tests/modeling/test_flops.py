import json
import random
from dataclasses import replace

import pytest
import torch
from conftest import GRID, tiny_llava
from visprune.modeling import (
    BUILTIN_MODELS,
    GateConfig,
    GateProbs,
    LayerPlan,
    Plan,
    attach_gates,
    default_layout,
    flops_report,
    prefill_flops,
    resolve_model_dims,
    visual_flops,
    visual_kv_bytes,
)
from visprune.modeling.flops import window_pairs
from visprune.trainer.cli import main


def test_paper_dense_figures():
    """arXiv 2410.06169's accounting: 576 visual tokens, L*(8nd^2 + 4n^2d + 6ndm)."""
    for name, expected in (("llava-1.5-7b", 7.63e12), ("llava-1.5-13b", 14.89e12)):
        dims = BUILTIN_MODELS[name]
        layout = default_layout(dims)
        n, d, m, L = 576, dims.hidden_size, dims.intermediate_size, dims.num_layers
        formula = L * (8 * n * d**2 + 4 * n**2 * d + 6 * n * d * m)
        assert float(visual_flops(dims, layout)) == pytest.approx(formula, rel=1e-6)
        assert round(float(visual_flops(dims, layout)) / 1e12, 2) == pytest.approx(expected / 1e12)


def test_every_layer_skipped_gives_zero():
    dims = BUILTIN_MODELS["qwen2-vl-7b"]
    plan = Plan(family="qwen2_vl", window=5, num_layers=28, num_heads=28,
                layers=tuple(LayerPlan(heads=(), mlp=False) for _ in range(28)))
    probs = GateProbs.from_plan(plan, dims.intermediate_size)
    layout = default_layout(dims)
    assert float(visual_flops(dims, layout, probs, window=5)) == 0.0
    assert float(visual_kv_bytes(dims, layout, probs)) == 0.0
    assert float(prefill_flops(dims, layout, probs, window=5)) > 0  # text still runs


def test_grouped_query_kv_counted_per_group():
    """Qwen2-VL-7B: 28 query heads in 4 KV groups; closing 6 of 7 heads of a group keeps its K/V."""
    dims = BUILTIN_MODELS["qwen2-vl-7b"]
    layout = default_layout(dims)
    L, n, d, Dh = dims.num_layers, layout.visual, dims.hidden_size, dims.head_dim
    head = torch.ones(L, 28)
    head[:, 1:7] = 0  # group 0 keeps head 0 only
    probs = GateProbs(head, torch.ones(L), torch.ones(L))
    dense = float(visual_flops(dims, layout))
    pruned = float(visual_flops(dims, layout, probs))
    per_head = 2 * (2 * n * d * Dh) + 4 * n * n * Dh  # Q, O, attention; K/V unchanged
    assert dense - pruned == pytest.approx(L * 6 * per_head, rel=1e-9)
    head[:, 0] = 0  # now group 0 is closed: its K/V go too
    pruned2 = float(visual_flops(dims, layout, GateProbs(head, torch.ones(L), torch.ones(L))))
    assert pruned - pruned2 == pytest.approx(L * (per_head + 2 * (2 * n * d * Dh)), rel=1e-9)


def test_expected_equals_plan_for_zero_one_probabilities():
    dims = BUILTIN_MODELS["internvl2-8b"]
    rng = random.Random(0)
    layers = tuple(LayerPlan(heads=tuple(sorted(rng.sample(range(32), rng.randint(0, 32)))), mlp=rng.random() < .5)
                   for _ in range(32))
    plan = Plan(family="internvl", window=5, num_layers=32, num_heads=32, layers=layers)
    layout = default_layout(dims)
    from_plan = flops_report(dims, layout, GateProbs.from_plan(plan, dims.intermediate_size), window=5)
    # gate probabilities at 0/1, as a trained GateSet would give them
    head = torch.tensor(plan.head_mask(), dtype=torch.float32)
    router = (head.sum(1) > 0) | torch.tensor([lp.mlp for lp in layers])
    probs = GateProbs(head, router.float(), torch.tensor([float(lp.mlp) for lp in layers]))
    assert flops_report(dims, layout, probs, window=5) == from_plan


def test_expected_flops_differentiable_from_gate_set():
    model = tiny_llava()
    gates = attach_gates(model, GateConfig(window=3, init_log_alpha=0.0))
    from visprune.modeling.flops import dims_from_config

    dims = dims_from_config(model.config)
    assert dims.image_grid == (GRID, GRID)
    layout = default_layout(dims, system=4, text=6)
    expected = visual_flops(dims, layout, gates.prob_open(), window=3)
    expected.backward()
    assert all(p.grad is not None and (p.grad != 0).all() for p in gates.parameters())
    dense = visual_flops(dims, layout, window=3)
    assert 0 < float(expected.detach()) < float(dense)


def test_window_pairs():
    assert window_pairs(24, 24, None) == 576**2
    assert window_pairs(3, 3, 3) == 7 * 7  # 3+2+2 per axis
    assert window_pairs(24, 24, 1) == 576


def test_cli_json(capsys, tmp_path):
    plan = Plan(family="llava", window=5, num_layers=32, num_heads=32,
                layers=tuple(LayerPlan(heads=tuple(range(4)), mlp=i < 4) if i < 16 else LayerPlan(heads=(), mlp=False)
                             for i in range(32)))
    plan.to_json(tmp_path / "plan.json")
    assert main(["flops", "llava-1.5-7b", "--plan", str(tmp_path / "plan.json"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"model", "layout", "dense", "plan", "visual_flops_ratio"}
    assert result["dense"]["visual_flops"] == pytest.approx(7.633e12, rel=1e-3)
    assert set(result["plan"]) == {"visual_flops", "prefill_flops", "visual_kv_bytes"}
    assert result["visual_flops_ratio"] == pytest.approx(result["plan"]["visual_flops"] /
                                                         result["dense"]["visual_flops"])
    assert 0 < result["visual_flops_ratio"] < 0.2
    assert main(["flops", "llava-1.5-13b", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plan"] is None and result["visual_flops_ratio"] is None


def test_cli_local_config_folder_and_errors(capsys, tmp_path):
    tiny_llava().save_pretrained(tmp_path / "tiny")
    assert main(["flops", str(tmp_path / "tiny")]) == 0
    assert "visual FLOPs" in capsys.readouterr().out
    assert resolve_model_dims(str(tmp_path / "tiny")).num_layers == 3
    assert main(["flops", "no-such-model"]) == 2
    assert "neither a built-in model" in capsys.readouterr().err
    bad = Plan.dense(3, 4)
    bad.to_json(tmp_path / "bad.json")
    assert main(["flops", "llava-1.5-7b", "--plan", str(tmp_path / "bad.json")]) == 2
    assert "3 layers x 4 heads" in capsys.readouterr().err


def test_llava_next_image_is_base_plus_high_resolution_grid_plus_newlines():
    """LLaVA-NeXT-7B at 672 px: 576 + 2304 visual tokens (the paper's formula with n = 2880); the window
    is counted per grid; the 48 newline tokens are costed as text rows (prefill only)."""
    dims = BUILTIN_MODELS["llava-next-7b"]
    layout = default_layout(dims)
    n, d, m, L = 2880, dims.hidden_size, dims.intermediate_size, dims.num_layers
    assert layout.visual == n and layout.text_rows == 60 + 48
    assert float(visual_flops(dims, layout)) == pytest.approx(L * (8 * n * d**2 + 4 * n**2 * d + 6 * n * d * m),
                                                              rel=1e-9)
    windowed = float(visual_flops(dims, layout, window=5)) - float(visual_flops(dims, layout, window=1))
    per_pair = L * 4 * dims.num_heads * dims.head_dim  # QK^T and AV per (query, key) pair, all heads
    pairs = lambda w: window_pairs(24, 24, w) + window_pairs(48, 48, w)
    assert windowed == pytest.approx(per_pair * (pairs(5) - pairs(1)), rel=1e-9)
    plain = default_layout(BUILTIN_MODELS["llava-1.5-7b"])
    assert float(prefill_flops(dims, layout)) > float(prefill_flops(dims, replace(layout, non_grid=0)))
    assert plain.text_rows == plain.text
