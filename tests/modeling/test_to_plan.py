"""GateSet.to_plan: global top-k by log_alpha that meets a visual-FLOPs budget, monotone in the budget."""

import pytest
import torch
from conftest import tiny_batch, tiny_llava
from visprune.modeling import GateConfig, GateProbs, GateSet, apply_plan, attach_gates, visual_flops
from visprune.modeling.families import TextDims
from visprune.modeling.flops import default_layout


def llava7b_gates(seed=0, window=5):
    dims = TextDims(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                    intermediate_size=11008)
    gates = GateSet(dims, GateConfig(window=window), "llava", (24, 24))
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in gates.parameters():
            param.copy_(torch.randn_like(param) * 3)
    return gates


def plan_fraction(gates, plan):
    dims = gates.model_dims()
    layout = default_layout(dims)
    probs = GateProbs.from_plan(plan, dims.intermediate_size)
    return float(visual_flops(dims, layout, probs, plan.window) / visual_flops(dims, layout))


@pytest.mark.parametrize("budget", [0.05, 0.12, 0.25, 0.5])
def test_meets_budget_and_next_unit_would_not_fit(budget):
    gates = llava7b_gates()
    plan = gates.to_plan(budget)
    fraction = plan_fraction(gates, plan)
    assert fraction <= budget
    assert budget - fraction < 0.025  # the slack is at most one MLP unit (6ndm / dense = 2%)
    assert plan.window == 5 and plan.num_layers == 32


def test_monotone_in_the_budget():
    gates = llava7b_gates(seed=1)
    previous = None
    for budget in (0.03, 0.08, 0.12, 0.25, 0.4, 0.7, 1.0):
        plan = gates.to_plan(budget)
        kept = {(l, h) for l, layer in enumerate(plan.layers) for h in layer.heads}
        kept |= {(l, "mlp") for l, layer in enumerate(plan.layers) if layer.mlp}
        if previous is not None:
            assert previous <= kept, budget
        previous = kept
    assert len(previous) == 32 * 33  # budget 1.0 keeps everything (the window alone costs less than dense)


def test_ranking_follows_log_alpha_and_router_hierarchy():
    gates = llava7b_gates(seed=2)
    with torch.no_grad():
        gates.router.log_alpha[3] = -10.0  # layer 3's router is weakest: nothing kept there
        gates.head.log_alpha[5, 7] = 10.0
        gates.router.log_alpha[5] = 10.0
    plan = gates.to_plan(0.12)
    assert plan.layers[3].skipped
    assert 7 in plan.layers[5].heads


def test_plan_of_attached_gates_applies():
    model = tiny_llava()
    gates = attach_gates(model, GateConfig(window=3, init_log_alpha=0.0))
    with torch.no_grad():
        gates.head.log_alpha.copy_(torch.randn(3, 4))
    plan = gates.to_plan(0.3)
    assert plan_fraction(gates, plan) <= 0.3
    apply_plan(model, plan)
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_batch()).logits).all()


def test_bad_budget():
    with pytest.raises(ValueError, match="budget"):
        llava7b_gates().to_plan(0.0)


def test_score_is_the_probability_the_effective_gate_was_open():
    """A strong head in a half-open layer outranks a weak head in a slightly stronger layer:
    P(r)P(g) = 0.40 * 0.99 against 0.45 * 0.65 (the smaller log_alpha alone would pick the latter)."""
    from visprune.modeling import LayerPlan, Plan

    gates = llava7b_gates()
    with torch.no_grad():
        for param in gates.parameters():
            param.fill_(-10.0)
        gates.router.log_alpha[4], gates.head.log_alpha[4, 2] = -2.0, 3.0
        gates.router.log_alpha[9], gates.head.log_alpha[9, 5] = -1.8, -1.0
    one_head = Plan(family="llava", window=5, num_layers=32, num_heads=32,
                    layers=tuple(LayerPlan(heads=(2,) if l == 4 else (), mlp=False) for l in range(32)))
    plan = gates.to_plan(plan_fraction(gates, one_head) * 1.5)  # room for one head only
    assert [(l, layer.heads) for l, layer in enumerate(plan.layers) if layer.heads] == [(4, (2,))]


def small_model_gates(seed):
    """A small model where one visual MLP costs a large share of the visual FLOPs (as on the see-task base)."""
    dims = TextDims(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=512)
    gates = GateSet(dims, GateConfig(window=3), "llava", (6, 6))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in gates.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 3)
    return gates


def kept_units(plan):
    return ({(l, h) for l, layer in enumerate(plan.layers) for h in layer.heads}
            | {(l, "mlp") for l, layer in enumerate(plan.layers) if layer.mlp})


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [0.12, 0.25, 0.5])
def test_fill_uses_the_budget_and_keeps_the_prefix(seed, budget):
    """The fill rule keeps the prefix rule's units, stays within the budget, and leaves no unit out that
    would still fit."""
    gates = small_model_gates(seed)
    prefix, filled = gates.to_plan(budget), gates.to_plan(budget, fill=True)
    assert kept_units(prefix) <= kept_units(filled)
    fraction = plan_fraction(gates, filled)
    assert plan_fraction(gates, prefix) <= fraction <= budget
    L, H = 4, 4
    for l in range(L):
        for unit in [*((l, h) for h in range(H)), (l, "mlp")]:
            if unit in kept_units(filled):
                continue
            layers = [(set(layer.heads), layer.mlp) for layer in filled.layers]
            if unit[1] == "mlp":
                layers[l] = (layers[l][0], True)
            else:
                layers[l][0].add(unit[1])
            from visprune.modeling import LayerPlan, Plan

            trial = Plan("llava", 3, L, H, tuple(LayerPlan(heads=tuple(sorted(h)), mlp=m) for h, m in layers))
            assert plan_fraction(gates, trial) > budget, (unit, budget)


def test_fill_keeps_more_than_the_prefix_when_an_mlp_blocks_it():
    """Ranked first after two heads, an MLP that does not fit ends the prefix plan; fill goes on with the heads."""
    gates = small_model_gates(0)
    with torch.no_grad():
        for param in gates.parameters():
            param.fill_(-5.0)
        gates.router.log_alpha.fill_(5.0)
        gates.head.log_alpha[0, :2] = 5.0
        gates.mlp.log_alpha[0] = 4.0  # ranked third; one MLP is ~19% of this model's visual FLOPs
        gates.head.log_alpha[1:, :] = 3.0
    prefix, filled = gates.to_plan(0.12), gates.to_plan(0.12, fill=True)
    assert kept_units(prefix) == {(0, 0), (0, 1)}
    assert (0, "mlp") not in kept_units(filled) and len(kept_units(filled)) > 2
    assert plan_fraction(gates, filled) > plan_fraction(gates, prefix)


def test_candidate_plans_start_with_to_plan_are_distinct_and_within_budget():
    gates = small_model_gates(3)
    with torch.no_grad():
        for param in gates.parameters():
            param.mul_(0.3)  # uncertain gates: draws disagree with the ranking
    plans = gates.candidate_plans(0.25, 6, fill=True, seed=1)
    assert plans[0] == (gates.to_plan(0.25, fill=True), "scores")
    assert len(plans) == 6 and len({p for p, _ in plans}) == 6
    assert [s for _, s in plans[1:]] == sorted((s for _, s in plans[1:]), key=lambda s: int(s.split()[1]))
    assert all(plan_fraction(gates, p) <= 0.25 for p, _ in plans)
    assert gates.candidate_plans(0.25, 6, fill=True, seed=1) == plans  # seeded


def test_candidate_plans_of_certain_gates_are_the_one_plan():
    gates = small_model_gates(0)
    with torch.no_grad():
        for param in gates.parameters():
            param.copy_(torch.sign(param) * 10.0)  # every gate surely open or surely closed
    plans = gates.candidate_plans(1.0, 5)
    assert len(plans) == 1


def test_plan_forward_runs_to_plans_plan_with_gradients_straight_through():
    gates = small_model_gates(3)
    gates.train()
    gates(batch_size=2)
    sampled_probs = gates.last_probs
    with gates.plan_forward(0.3, fill=True):
        values = gates(batch_size=2)
    plan = gates.to_plan(0.3, fill=True)
    assert gates.last_plan == plan and gates.last_probs is sampled_probs
    hard = GateProbs.from_plan(plan, gates.dims.intermediate_size)
    assert values.head.shape == (1, 4, 4)  # one plan shared by the batch
    assert torch.equal(values.head[0].detach(), hard.head) and torch.equal(values.router[0].detach(), hard.layer)
    assert torch.equal(values.mlp[0].detach(), hard.mlp)
    (values.head.sum() + values.mlp.sum()).backward()
    assert gates.head.log_alpha.grad.abs().sum() > 0 and gates.router.log_alpha.grad.abs().sum() > 0
    gates.zero_grad()
    assert gates(batch_size=2).head.shape == (2, 4, 4)  # outside the context: sampled again


def test_plan_forward_runs_a_given_plan_with_gradients_straight_through():
    gates = small_model_gates(3)
    gates.train()
    plan = gates.candidate_plans(0.3, 4, fill=True, seed=2)[-1][0]
    assert plan != gates.to_plan(0.3, fill=True)
    with gates.plan_forward(0.3, fill=True, plan=plan, record_probs=True):
        values = gates(batch_size=2)
    assert gates.last_plan == plan and gates.last_probs is not None
    hard = GateProbs.from_plan(plan, gates.dims.intermediate_size)
    assert torch.equal(values.head[0].detach(), hard.head) and torch.equal(values.mlp[0].detach(), hard.mlp)
    values.head.sum().backward()
    assert gates.head.log_alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gates_committed_to_a_fill_plan_harden_to_it_by_either_rule(seed):
    gates = small_model_gates(seed)
    plan = gates.candidate_plans(0.3, 6, fill=True, seed=seed)[-1][0]
    gates.commit_to(plan)
    assert gates.to_plan(0.3, fill=True) == plan and gates.to_plan(0.3, fill=False) == plan
    assert gates.candidate_plans(0.3, 6, fill=True, seed=seed) == [(plan, "scores")]  # the draws agree
    hard = GateProbs.from_plan(plan, gates.dims.intermediate_size)
    probs = gates.prob_open()
    effective = probs.layer[:, None] * probs.head  # P(open) is the plan's 0/1 to within 1e-3
    assert torch.allclose(effective, hard.head, atol=1e-3) and torch.allclose(probs.mlp * probs.layer, hard.mlp, atol=1e-3)
