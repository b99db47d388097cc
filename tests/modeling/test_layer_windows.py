"""Per-layer neighbour windows: a plan layer's optional `window` over the plan's `window`, validated, costed per
layer by the FLOPs model, honoured by the gated attention (SDPA and flex) and by hardened execution, equal to
the eager reference in every family."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_batch, tiny_llava
from test_families import assert_reference_gated_hardened
from test_gated_equivalence import assert_gated_matches_reference, random_plan, valid_logits
from test_hardened import gated_and_hardened, logits
from tiny_families import TINY_FAMILIES
from visprune.modeling import GateProbs, LayerPlan, Plan, PlanError, apply_plan, visual_flops
from visprune.modeling.flops import BUILTIN_MODELS, default_layout, plan_report, window_pairs


def windowed(plan_window=3, windows=(1, None, 5), family="llava", num_heads=4) -> Plan:
    layers = tuple(LayerPlan(heads=tuple(range(num_heads)), mlp=True, window=w) for w in windows)
    return Plan(family=family, window=plan_window, num_layers=len(windows), num_heads=num_heads, layers=layers)


def test_a_layer_window_round_trips_and_falls_back_to_the_plans(tmp_path):
    plan = windowed()
    assert [plan.layer_window(i) for i in range(3)] == [1, 3, 5] and plan.windows() == (1, 3, 5)
    assert "window" not in plan.to_dict()["layers"][1] and plan.to_dict()["layers"][2]["window"] == 5
    plan.to_json(tmp_path / "plan.json")
    assert Plan.from_json(tmp_path / "plan.json") == plan
    assert windowed(windows=(None, None, None)).windows() == 3
    assert windowed(plan_window=None, windows=(None, 3, None)).windows() == (None, 3, None)


@pytest.mark.parametrize("value", [0, 2, -1, True, 3.0, "5", [3]])
def test_a_bad_layer_window_is_refused_by_name(value):
    data = windowed().to_dict()
    data["layers"][0]["window"] = value
    with pytest.raises(PlanError, match=r"layers\[0\].window must be an odd positive integer"):
        Plan.from_json(data)


def test_flops_count_each_layers_window():
    dims = BUILTIN_MODELS["llava-1.5-7b"]
    layout = default_layout(dims)
    plan = Plan(family="llava", window=5, num_layers=32, num_heads=32,
                layers=tuple(LayerPlan(heads=tuple(range(32)), mlp=True, window=3 if i < 16 else None)
                             for i in range(32)))
    probs = GateProbs.from_plan(plan, dims.intermediate_size)
    half = lambda w: float(visual_flops(dims, layout, probs, w)) / 2
    assert float(visual_flops(dims, layout, probs, plan.windows())) == pytest.approx(half(3) + half(5), rel=1e-6)
    report = plan_report(dims, layout, plan)
    assert report["plan"]["visual_flops"] == pytest.approx(half(3) + half(5), rel=1e-6)
    d, n = 4096, 576
    per_layer_3 = 8 * n * d * d + 4 * window_pairs(24, 24, 3) * d + 6 * n * d * 11008
    assert half(3) == pytest.approx(16 * per_layer_3, rel=1e-6)


@pytest.mark.parametrize("seed, num_kv_heads, bias, padding, window", [
    (0, 4, False, "left", 3), (1, 2, True, "right", None), (2, 1, False, "left", 5)])
def test_gated_layer_windows_match_the_reference(seed, num_kv_heads, bias, padding, window):
    model = tiny_llava(num_kv_heads=num_kv_heads, attention_bias=bias, seed=seed)
    batch = tiny_batch(padding=padding, seed=seed)
    for plan in (windowed(window), random_plan(seed + 40, window=window, layer_windows=True, frozen=seed == 1)):
        assert_gated_matches_reference(model, batch, plan)


def test_layer_windows_change_the_output_and_flex_agrees_with_sdpa():
    batch = tiny_batch(padding="left")
    outputs = {}
    for name, plan, backend in (("plan", windowed(3, (None, None, None)), "sdpa"), ("own", windowed(), "sdpa"),
                                ("flex", windowed(), "flex")):
        model = tiny_llava(num_kv_heads=2)
        apply_plan(model, plan, backend=backend)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # eager flex warns that it is unfused
            outputs[name] = valid_logits(model(**batch).logits, batch)
    assert (outputs["own"] - outputs["plan"]).abs().max() > 1e-3
    torch.testing.assert_close(outputs["flex"], outputs["own"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernel", ["merged", "sdpa"])
@pytest.mark.parametrize("num_kv_heads, bias, window, padding", [(4, False, 3, "left"), (2, True, None, "right")])
def test_hardened_layer_windows_equal_gated(kernel, num_kv_heads, bias, window, padding, monkeypatch):
    from visprune.modeling import hardened as hardened_module

    monkeypatch.setattr(hardened_module, "attention_kernel", kernel)
    batch = tiny_batch(images_per_sample=(1, 2, 0), padding=padding)
    for plan in (windowed(window), random_plan(41, window=window, layer_windows=True, frozen=True)):
        gated, hardened = gated_and_hardened(plan, num_kv_heads, bias)
        torch.testing.assert_close(valid_logits(logits(hardened, batch), batch),
                                   valid_logits(logits(gated, batch), batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_every_family_gated_matches_reference_and_hardened(name):
    tiny = TINY_FAMILIES[name](seed=3)
    batch, grids = tiny.batch(padding="right", seed=3)
    windows = tuple((1, None, 5)[i % 3] for i in range(tiny.num_layers))
    plan = windowed(3, windows, family=name, num_heads=tiny.num_heads)
    assert_reference_gated_hardened(tiny, batch, grids, plan)
