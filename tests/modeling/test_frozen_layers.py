"""Frozen visual layers (docs/design.md rule 7, `GateConfig.visual_freeze`): a layer whose visual rows are not
updated while text still reads their keys and values. Plans carry it (`"frozen": true`), the FLOPs model costs
only the K/V of the kept groups, gated == the eager reference, hardened == gated (with cached decoding and the
pruned KV cache) in every family, and the freeze gates a[l] are learned, ranked, committed and drawn like the
other gates."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, tiny_batch, tiny_llava
from test_families import assert_reference_gated_hardened
from test_gated_equivalence import assert_gated_matches_reference, random_plan, valid_logits
from test_hardened import gated_and_hardened, logits
from tiny_families import IMAGE_TOKEN_ID as FAMILY_IMAGE_TOKEN_ID
from tiny_families import TINY_FAMILIES
from visprune.modeling import (
    GateConfig,
    GateProbs,
    GateSet,
    LayerPlan,
    Plan,
    PlanError,
    apply_plan,
    attach_gates,
    cache_nbytes,
    visual_flops,
)
from visprune.modeling.families import TextDims
from visprune.modeling.flops import ModelDims, TokenLayout, default_layout
from visprune.modeling.hard_concrete import LOG_ALPHA_LIMIT

DIMS = TextDims(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=344)


def frozen_plan(family="llava", window=3, num_layers=3, num_heads=4) -> Plan:
    layers = [LayerPlan(heads=(0, 2), mlp=False, frozen=True), LayerPlan(heads=(1,), mlp=True),
              LayerPlan(heads=tuple(range(num_heads)), mlp=False, frozen=True)]
    layers += [LayerPlan(heads=(0,), mlp=True)] * (num_layers - 3)
    return Plan(family=family, window=window, num_layers=num_layers, num_heads=num_heads, layers=tuple(layers))


# ---- the plan format ----------------------------------------------------------------------------------
def test_frozen_round_trips_and_is_written_only_where_true(tmp_path):
    plan = frozen_plan()
    data = plan.to_dict()
    assert data["layers"][0]["frozen"] is True and "frozen" not in data["layers"][1]
    plan.to_json(tmp_path / "plan.json")
    again = Plan.from_json(tmp_path / "plan.json")
    assert again == plan and again.layers[0].frozen and not again.layers[0].updated and again.layers[1].updated


@pytest.mark.parametrize("layer, message", [
    ({"heads": [0], "mlp": True, "frozen": True}, r"layers\[0\] is frozen and keeps the MLP"),
    ({"heads": [], "mlp": False, "frozen": True}, r"layers\[0\] is frozen and keeps no head"),
    ({"heads": [0], "mlp": False, "frozen": 1}, r"layers\[0\].frozen must be true or false, got 1"),
    ({"heads": [0], "mlp": False, "frozen": "yes"}, r"layers\[0\].frozen must be true or false"),
])
def test_a_bad_frozen_layer_is_refused_by_name(layer, message):
    data = frozen_plan().to_dict()
    data["layers"][0] = layer
    with pytest.raises(PlanError, match=message):
        Plan.from_json(data)


# ---- the FLOPs model ----------------------------------------------------------------------------------
def test_a_frozen_layer_costs_the_kv_of_its_kept_groups_only():
    dims = ModelDims(name="t", family="llava", image_grid=(6, 6), **DIMS.__dict__)
    layout = TokenLayout(system=10, num_images=1, image_grid=(6, 6), text=20)
    n, d, Dh = layout.visual, dims.hidden_size, dims.head_dim
    frozen = Plan(family="llava", window=3, num_layers=4, num_heads=4, layers=(
        LayerPlan(heads=(0, 1), mlp=False, frozen=True),  # one KV group (heads 0, 1 share group 0)
        LayerPlan(heads=(0, 3), mlp=False, frozen=True),  # two groups
        LayerPlan(heads=(), mlp=False), LayerPlan(heads=(), mlp=False)))
    probs = GateProbs.from_plan(frozen, dims.intermediate_size)
    kv_one_group = 2 * (2 * n * d * Dh)  # K and V projections of one group's head_dim columns
    assert float(visual_flops(dims, layout, probs, window=3)) == pytest.approx(3 * kv_one_group)
    updated = Plan(family="llava", window=3, num_layers=4, num_heads=4,
                   layers=tuple(LayerPlan(heads=lp.heads, mlp=lp.mlp) for lp in frozen.layers))
    assert float(visual_flops(dims, layout, GateProbs.from_plan(updated, 344), window=3)) > 3 * kv_one_group


def test_freezing_every_layer_of_llava_7b_keeps_a_sixth_of_the_visual_flops():
    from visprune.modeling.flops import BUILTIN_MODELS

    dims = BUILTIN_MODELS["llava-1.5-7b"]
    layout = default_layout(dims)
    plan = Plan(family="llava", window=None, num_layers=32, num_heads=32,
                layers=tuple(LayerPlan(heads=tuple(range(32)), mlp=False, frozen=True) for _ in range(32)))
    ratio = float(visual_flops(dims, layout, GateProbs.from_plan(plan, dims.intermediate_size))
                  / visual_flops(dims, layout))
    d, m, n = 4096, 11008, 576
    assert ratio == pytest.approx(4 * d * d / (8 * d * d + 4 * n * d + 6 * d * m), rel=1e-6)  # 16.2%


# ---- gated and hardened execution -----------------------------------------------------------------------
@pytest.mark.parametrize("seed, num_kv_heads, bias, padding, window", [
    (0, 4, False, "left", 3), (1, 2, True, "right", None), (2, 1, True, "left", 5)])
def test_gated_frozen_plans_match_the_reference(seed, num_kv_heads, bias, padding, window):
    model = tiny_llava(num_kv_heads=num_kv_heads, attention_bias=bias, seed=seed)
    batch = tiny_batch(padding=padding, seed=seed)
    for plan in (frozen_plan(window=window), random_plan(seed + 20, window=window, frozen=True)):
        assert_gated_matches_reference(model, batch, plan)


def test_freezing_changes_the_output_and_text_still_reads_frozen_keys():
    model, batch = tiny_llava(attention_bias=True), tiny_batch()
    outs = {}
    for name, frozen in (("frozen", True), ("updated", False)):
        layers = tuple(LayerPlan(heads=(0, 1), mlp=False, frozen=frozen) for _ in range(3))
        plan = Plan(family="llava", window=3, num_layers=3, num_heads=4, layers=layers)
        gated = copy.deepcopy(model)
        apply_plan(gated, plan)
        with torch.no_grad():
            outs[name] = valid_logits(gated(**batch).logits, batch)
    skipped = copy.deepcopy(model)
    apply_plan(skipped, Plan(family="llava", window=3, num_layers=3, num_heads=4,
                             layers=tuple(LayerPlan(heads=(), mlp=False) for _ in range(3))))
    with torch.no_grad():
        outs["skipped"] = valid_logits(skipped(**batch).logits, batch)
    assert (outs["frozen"] - outs["updated"]).abs().max() > 1e-3
    assert (outs["frozen"] - outs["skipped"]).abs().max() > 1e-3  # text read the frozen visual keys


@pytest.mark.parametrize("kernel", ["merged", "sdpa"])
@pytest.mark.parametrize("num_kv_heads, bias, window, padding", [(4, False, 3, "left"), (2, True, None, "right"),
                                                                 (1, True, 5, "right")])
def test_hardened_frozen_plans_equal_gated(kernel, num_kv_heads, bias, window, padding, monkeypatch):
    from visprune.modeling import hardened as hardened_module

    monkeypatch.setattr(hardened_module, "attention_kernel", kernel)
    batch = tiny_batch(images_per_sample=(1, 2, 0), padding=padding)
    for plan in (frozen_plan(window=window), random_plan(31, window=window, frozen=True)):
        gated, hardened = gated_and_hardened(plan, num_kv_heads, bias)
        torch.testing.assert_close(valid_logits(logits(hardened, batch), batch),
                                   valid_logits(logits(gated, batch), batch), atol=1e-4, rtol=0)


def _family_frozen_plan(name: str, num_layers: int, num_heads: int, window) -> Plan:
    rng = random.Random(3)
    layers = [LayerPlan(heads=tuple(sorted(rng.sample(range(num_heads), 2))), mlp=False, frozen=l % 2 == 0)
              if l % 3 != 2 else LayerPlan(heads=(0,), mlp=True) for l in range(num_layers)]
    return Plan(family=name, window=window, num_layers=num_layers, num_heads=num_heads, layers=tuple(layers))


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("window", [3, None])
def test_every_family_gated_matches_reference_and_hardened(name, window):
    tiny = TINY_FAMILIES[name](seed=2)
    batch, grids = tiny.batch(padding="left", seed=2)
    plan = _family_frozen_plan(name, tiny.num_layers, tiny.num_heads, window)
    assert any(layer.frozen for layer in plan.layers)
    assert_reference_gated_hardened(tiny, batch, grids, plan)


@pytest.mark.parametrize("name", ["llava", *sorted(TINY_FAMILIES)])
def test_cached_decoding_of_a_frozen_plan_equals_gated(name):
    if name == "llava":
        model, batch, num_layers, num_heads = tiny_llava(), tiny_batch(padding="left"), 3, 4
    else:
        tiny = TINY_FAMILIES[name]()
        model, (batch, _), num_layers, num_heads = tiny.model, tiny.batch(padding="left"), tiny.num_layers, tiny.num_heads
    plan = _family_frozen_plan(name, num_layers, num_heads, 3)
    gated, hardened = model, copy.deepcopy(model)
    apply_plan(gated, plan)
    apply_plan(hardened, plan, mode="hardened")
    outs = {}
    for label, m in (("gated", gated), ("hardened", hardened)):
        with torch.no_grad():
            outs[label] = m.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0,
                                     suppress_tokens=[IMAGE_TOKEN_ID, FAMILY_IMAGE_TOKEN_ID])
    assert torch.equal(outs["gated"].sequences, outs["hardened"].sequences)
    for i in range(4):
        torch.testing.assert_close(outs["hardened"].logits[i], outs["gated"].logits[i], atol=1e-4, rtol=0)


def test_the_pruned_cache_keeps_frozen_layers_visual_kv():
    batch = tiny_batch()
    sizes = {}
    for name, frozen in (("frozen", True), ("updated", False)):
        layers = tuple(LayerPlan(heads=(0, 1), mlp=False, frozen=frozen) for _ in range(3))
        model = tiny_llava()
        apply_plan(model, Plan(family="llava", window=3, num_layers=3, num_heads=4, layers=layers), mode="hardened")
        with torch.no_grad():
            sizes[name] = cache_nbytes(model(**batch, use_cache=True).past_key_values)
    assert sizes["frozen"] == sizes["updated"]  # the same visual K/V: what text reads


# ---- learned freeze gates -----------------------------------------------------------------------------------
def freeze_gates(seed: int, heads_open: bool = False) -> GateSet:
    gates = GateSet(DIMS, GateConfig(window=3, visual_freeze=True), "llava", (6, 6))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in gates.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 3)
        if heads_open:  # routers and heads open, freeze gates closed: freezing is the cheap way to keep heads
            gates.router.log_alpha.fill_(5.0)
            gates.head.log_alpha.fill_(5.0)
            gates.update.log_alpha.fill_(-5.0)
    return gates


def plan_fraction(gates: GateSet, plan: Plan) -> float:
    dims = gates.model_dims()
    layout = default_layout(dims)
    probs = GateProbs.from_plan(plan, dims.intermediate_size)
    return float(visual_flops(dims, layout, probs, plan.window) / visual_flops(dims, layout))


def test_freeze_gates_are_optional_parameters():
    plain = GateSet(DIMS, GateConfig(window=3), "llava", (6, 6))
    assert plain.update is None and "update.log_alpha" not in dict(plain.named_parameters())
    gates = freeze_gates(0)
    assert gates.update.shape == (4,) and "update.log_alpha" in dict(gates.named_parameters())
    with pytest.raises(ValueError, match="visual_freeze must be true or false"):
        GateConfig(visual_freeze="yes")


def test_expected_flops_fall_as_freeze_gates_close_with_gradients():
    gates = freeze_gates(1).train()
    values = gates(batch_size=2)
    assert values.update.shape == (2, 4)
    assert bool((values.mlp <= values.router * values.update + 1e-6).all())  # u = r*a*m
    dims, layout = gates.model_dims(), default_layout(gates.model_dims())
    cost = visual_flops(dims, layout, gates.prob_open(), window=3)
    cost.backward()
    assert gates.update.log_alpha.grad is not None and (gates.update.log_alpha.grad > 0).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [0.12, 0.25, 0.5])
@pytest.mark.parametrize("fill", [False, True])
def test_to_plan_freezes_layers_within_the_budget(seed, budget, fill):
    gates = freeze_gates(seed)
    plan = gates.to_plan(budget, fill=fill)
    assert plan_fraction(gates, plan) <= budget + 1e-9
    for layer in plan.layers:
        assert not (layer.frozen and (layer.mlp or not layer.heads))


def test_closed_freeze_gates_make_frozen_plans_that_keep_more_heads():
    gates = freeze_gates(0, heads_open=True)
    plan = gates.to_plan(0.15)
    assert sum(layer.frozen for layer in plan.layers) >= 3
    assert sum(len(layer.heads) for layer in plan.layers) == 16  # every head, for a third of one updated layer's cost
    assert plan_fraction(gates, plan) <= 0.15


@pytest.mark.parametrize("seed", range(3))
def test_committed_freeze_gates_harden_to_the_plan(seed):
    gates = freeze_gates(seed, heads_open=seed == 0)
    budget = 0.3
    for plan, _ in gates.candidate_plans(budget, 4, fill=True, seed=seed):  # what plan_select commits to
        committed = freeze_gates(seed + 10)
        committed.commit_to(plan)
        assert committed.to_plan(budget, fill=True) == plan
        update = committed.committed_log_alpha(plan)["update.log_alpha"]
        assert update.tolist() == [-LOG_ALPHA_LIMIT if layer.frozen else LOG_ALPHA_LIMIT for layer in plan.layers]


def test_a_frozen_plan_needs_freeze_gates_to_commit():
    gates = GateSet(DIMS, GateConfig(window=3), "llava", (6, 6))
    plan = Plan(family="llava", window=3, num_layers=4, num_heads=4,
                layers=tuple(LayerPlan(heads=(0,), mlp=False, frozen=True) for _ in range(4)))
    with pytest.raises(ValueError, match="the plan freezes layers but these gates have no freeze gates"):
        gates.committed_log_alpha(plan)


def test_plan_forward_runs_the_plans_frozen_layers_straight_through():
    gates = freeze_gates(0, heads_open=True).train()
    with gates.plan_forward(0.15):
        values = gates(batch_size=3)
    plan = gates.last_plan
    assert values.update.shape == (1, 4)
    assert values.update[0].tolist() == [0.0 if layer.frozen else 1.0 for layer in plan.layers]
    values.update.sum().backward()
    assert gates.update.log_alpha.grad is not None and gates.update.log_alpha.grad.abs().sum() > 0


def test_learned_gates_committed_to_a_frozen_plan_compute_the_hardened_plan():
    model, batch = tiny_llava(attention_bias=True, seed=1), tiny_batch(padding="right")
    plan = frozen_plan()
    hardened = copy.deepcopy(model)
    apply_plan(hardened, plan, mode="hardened")
    gates = attach_gates(model, GateConfig(window=3, visual_freeze=True))
    gates.commit_to(plan)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, got = hardened.eval()(**batch).logits[mask], model.eval()(**batch).logits[mask]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
