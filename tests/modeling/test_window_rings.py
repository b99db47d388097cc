"""Learned window radius (`GateConfig.window_rings`): nested hard-concrete gates on the rings of the neighbour
window, costed as each layer's expected window, ranked with heads and MLPs by `to_plan` (plans carry per-layer
windows), committed and drawn like every gate, and gates committed to a plan compute what the hardened plan
computes, in every family."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_batch, tiny_llava
from tiny_families import TINY_FAMILIES
from visprune.modeling import GateConfig, GateProbs, GateSet, LayerPlan, Plan, apply_plan, attach_gates, visual_flops
from visprune.modeling.families import TextDims
from visprune.modeling.flops import default_layout
from visprune.modeling.hard_concrete import LOG_ALPHA_LIMIT

DIMS = TextDims(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=344)


def ring_gates(seed: int, window: int = 5) -> GateSet:
    gates = GateSet(DIMS, GateConfig(window=window, window_rings=True), "llava", (9, 9))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in gates.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 3)
    return gates


def fraction(gates: GateSet, plan: Plan) -> float:
    dims = gates.model_dims()
    layout = default_layout(dims)
    probs = GateProbs.from_plan(plan, dims.intermediate_size)
    return float(visual_flops(dims, layout, probs, plan.windows()) / visual_flops(dims, layout))


@pytest.mark.parametrize("window, message", [(None, "needs a window of 3 or more"), (1, "needs a window of 3"),
                                             (5, None)])
def test_ring_gates_need_a_window_to_shrink(window, message):
    if message is None:
        assert GateSet(DIMS, GateConfig(window=window, window_rings=True), "llava", (9, 9)).rings.shape == (4, 2)
        return
    with pytest.raises(ValueError, match=message):
        GateConfig(window=window, window_rings=True)


def test_expected_pairs_follow_the_nested_rings():
    gates = ring_gates(0)
    dims, layout = gates.model_dims(), default_layout(gates.model_dims())
    dense = GateProbs.dense(4, 4)
    for radius, window in ((0, 1), (1, 3), (2, 5)):
        rings = torch.zeros(4, 2)
        rings[:, :radius] = 1.0
        probs = GateProbs(dense.head, dense.layer, dense.mlp, rings=rings)
        assert float(visual_flops(dims, layout, probs, 5)) == pytest.approx(float(visual_flops(dims, layout, dense,
                                                                                                 window)))
    nested = GateProbs(dense.head, dense.layer, dense.mlp, rings=torch.tensor([[0.0, 1.0]] * 4))  # ring 2 needs ring 1
    assert float(visual_flops(dims, layout, nested, 5)) == pytest.approx(float(visual_flops(dims, layout, dense, 1)))


def test_expected_flops_fall_as_rings_close_with_gradients():
    gates = ring_gates(1).train()
    values = gates(batch_size=2)
    assert values.rings.shape == (2, 4, 2) and bool((values.rings[..., 1] <= values.rings[..., 0] + 1e-6).all())
    dims, layout = gates.model_dims(), default_layout(gates.model_dims())
    visual_flops(dims, layout, gates.prob_open(), 5).backward()
    grad = gates.rings.log_alpha.grad  # (a log_alpha past the +-10 clamp has none)
    assert grad is not None and bool((grad >= 0).all()) and float(grad.sum()) > 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [0.12, 0.25, 0.5])
@pytest.mark.parametrize("fill", [False, True])
def test_to_plan_learns_per_layer_windows_within_the_budget(seed, budget, fill):
    gates = ring_gates(seed)
    plan = gates.to_plan(budget, fill=fill)
    assert fraction(gates, plan) <= budget + 1e-9
    assert plan.window == 5 and all(plan.layer_window(i) in (1, 3, 5) for i in range(4))


def test_closed_outer_rings_give_smaller_windows():
    gates = ring_gates(0)
    with torch.no_grad():
        for gate in (gates.head, gates.router, gates.mlp):
            gate.log_alpha.fill_(5.0)
        gates.rings.log_alpha.copy_(torch.tensor([[5.0, 5.0], [5.0, -5.0], [-5.0, 5.0], [5.0, 5.0]]))
    target = Plan(family="llava", window=5, num_layers=4, num_heads=4, layers=tuple(
        LayerPlan(heads=(0, 1, 2, 3), mlp=True, window=w) for w in (None, 3, 1, None)))
    plan = gates.to_plan(fraction(gates, target) + 1e-6)  # the closed rings rank last and do not fit
    assert plan == target and [plan.layer_window(i) for i in range(4)] == [5, 3, 1, 5]


@pytest.mark.parametrize("seed", range(3))
def test_committed_ring_gates_harden_to_the_plan(seed):
    gates = ring_gates(seed)
    for plan, _ in gates.candidate_plans(0.3, 4, fill=True, seed=seed):
        committed = ring_gates(seed + 10)
        committed.commit_to(plan)
        assert committed.to_plan(0.3, fill=True) == plan
        rings = committed.committed_log_alpha(plan)["rings.log_alpha"]
        for i in range(4):
            radius = plan.layer_window(i) // 2
            assert rings[i].tolist() == [LOG_ALPHA_LIMIT] * radius + [-LOG_ALPHA_LIMIT] * (2 - radius)


def test_plan_forward_runs_the_plans_windows_straight_through():
    gates = ring_gates(2).train()
    with gates.plan_forward(0.25):
        values = gates(batch_size=3)
    plan = gates.last_plan
    assert values.rings.shape == (1, 4, 2)
    for i in range(4):
        radius = plan.layer_window(i) // 2
        assert values.rings[0, i].tolist() == [1.0] * radius + [0.0] * (2 - radius)
    values.rings.sum().backward()
    assert gates.rings.log_alpha.grad.abs().sum() > 0


def test_training_ring_values_reach_the_attention_with_gradients():
    model, batch = tiny_llava(), tiny_batch()
    gates = attach_gates(model, GateConfig(window=3, window_rings=True, init_log_alpha=0.0))
    model.train()
    out = model(**batch).logits
    out[batch["attention_mask"].bool()].float().pow(2).mean().backward()
    assert gates.rings.log_alpha.grad is not None and gates.rings.log_alpha.grad.abs().sum() > 0


def _ring_plan(family: str, num_layers: int, num_heads: int) -> Plan:
    windows = (5, 3, 1, 5, 3, 1)
    layers = tuple(LayerPlan(heads=tuple(range(num_heads))[: 1 + i % num_heads], mlp=i % 2 == 0,
                             window=None if windows[i % 6] == 5 else windows[i % 6]) for i in range(num_layers))
    return Plan(family=family, window=5, num_layers=num_layers, num_heads=num_heads, layers=layers)


@pytest.mark.parametrize("name", ["llava", *sorted(TINY_FAMILIES)])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_gates_committed_to_a_ring_plan_compute_the_hardened_plan(name, backend):
    """Eval with learned ring gates committed to a plan (the deterministic gates exactly 0/1, the rings a log-0
    bias on far keys) == the plan's per-layer windows, gated and hardened."""
    if name == "llava":
        model, batch, num_layers, num_heads = tiny_llava(seed=1), tiny_batch(padding="right"), 3, 4
    else:
        tiny = TINY_FAMILIES[name](seed=1)
        model, (batch, _), num_layers, num_heads = tiny.model, tiny.batch(padding="right", seed=1), tiny.num_layers, \
            tiny.num_heads
    plan = _ring_plan(name, num_layers, num_heads)
    hardened = copy.deepcopy(model)
    apply_plan(hardened, plan, mode="hardened")
    gates = attach_gates(model, GateConfig(window=5, window_rings=True, backend=backend))
    gates.commit_to(plan)
    mask = batch["attention_mask"].bool()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        expected, got = hardened.eval()(**batch).logits[mask], model.eval()(**batch).logits[mask]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_every_optional_gate_together_hardens_and_commits(seed):
    """Channel blocks, freeze gates and ring gates in one GateSet: plans within the budget, candidates commit back
    to themselves, and the model with the committed gates computes the hardened plan."""
    cfg = GateConfig(window=5, window_rings=True, visual_freeze=True, mlp_channel_block=16)
    dims = TextDims(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
    gates = GateSet(dims, cfg, "llava", (4, 4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in gates.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 3)
    for budget in (0.25, 0.5):
        for plan, _ in gates.candidate_plans(budget, 3, fill=True, seed=seed):
            assert fraction(gates, plan) <= budget + 1e-9
            committed = GateSet(dims, cfg, "llava", (4, 4))
            committed.commit_to(plan)
            assert committed.to_plan(budget, fill=True) == plan
    model, batch = tiny_llava(num_kv_heads=2, seed=seed), tiny_batch(padding="left")
    plan = gates.to_plan(0.5, fill=True)
    hardened = copy.deepcopy(model)
    apply_plan(hardened, plan, mode="hardened")
    attach_gates(model, cfg).commit_to(plan)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits[mask], hardened.eval()(**batch).logits[mask],
                                   atol=1e-4, rtol=0)
