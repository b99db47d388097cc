"""Learned MLP channels (`GateConfig.mlp_channel_block`): channel gates c[l, b] over blocks of the visual MLP's
intermediate channels, costed in the expected FLOPs, ranked with heads by `to_plan` (plans keep whole blocks as
`mlp_channels`), run straight through by `plan_forward`, committed like every gate, and a model whose gates are
committed to a plan computes what the hardened plan computes, in every family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_llava
from tiny_families import TINY_FAMILIES
from visprune.modeling import GateConfig, GateProbs, GateSet, apply_plan, attach_gates, visual_flops
from visprune.modeling.families import TextDims
from visprune.modeling.flops import default_layout

DIMS = TextDims(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=500)


def channel_gates(seed: int, block: int = 64) -> GateSet:
    """The see-task base's shape with an MLP width (500) that 64-channel blocks do not divide."""
    gates = GateSet(DIMS, GateConfig(window=3, mlp_channel_block=block), "llava", (6, 6))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in gates.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 3)
    return gates


def fraction(gates: GateSet, plan) -> float:
    dims = gates.model_dims()
    layout = default_layout(dims)
    probs = GateProbs.from_plan(plan, dims.intermediate_size)
    return float(visual_flops(dims, layout, probs, plan.window) / visual_flops(dims, layout))


def whole_blocks(plan, block: int = 64, size: int = 500) -> bool:
    for layer in plan.layers:
        if layer.mlp_channels is None:
            continue
        kept = set(layer.mlp_channels)
        for start in range(0, size, block):
            inside = set(range(start, min(start + block, size)))
            if inside & kept and not inside <= kept:
                return False
    return True


@pytest.mark.parametrize("block", [0, -64, True, 1.5, "64"])
def test_a_bad_block_size_is_refused(block):
    with pytest.raises(ValueError, match="mlp_channel_block must be null or a positive integer"):
        GateConfig(mlp_channel_block=block)


def test_blocks_cover_the_channels_the_last_one_partly():
    gates = channel_gates(0)
    assert gates.channels.shape == (4, 8) and gates.channel_block == 64
    assert gates.block_sizes().tolist() == [64.0] * 7 + [52.0]
    assert sorted(name for name, _ in gates.named_parameters()) == [
        "channels.log_alpha", "head.log_alpha", "mlp.log_alpha", "router.log_alpha"]
    assert GateSet(DIMS, GateConfig(mlp_channel_block=4096), "llava", (6, 6)).channels.shape == (4, 1)
    assert GateSet(DIMS, GateConfig(), "llava", (6, 6)).channels is None  # off by default: no new parameter


def test_expected_flops_count_the_kept_channels_with_gradients():
    gates = channel_gates(1)
    probs = gates.prob_open()
    p_c = gates.channels.prob_open().detach()
    expected = (p_c * gates.block_sizes()).sum(dim=1) / 500
    torch.testing.assert_close(probs.mlp_channels.detach(), expected)
    dims = gates.model_dims()
    visual_flops(dims, default_layout(dims), probs, 3).backward()
    assert gates.channels.log_alpha.grad.abs().sum() > 0
    closed = channel_gates(1)
    with torch.no_grad():
        closed.channels.log_alpha.fill_(-10.0)
    with torch.no_grad():
        assert float(visual_flops(dims, default_layout(dims), closed.prob_open(), 3)) < float(
            visual_flops(dims, default_layout(dims), gates.prob_open(), 3))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [0.12, 0.25, 0.5])
def test_to_plan_keeps_whole_blocks_within_the_budget(seed, budget):
    gates = channel_gates(seed)
    for fill in (False, True):
        plan = gates.to_plan(budget, fill=fill)
        assert fraction(gates, plan) <= budget + 1e-6 and whole_blocks(plan)
        assert all(layer.mlp or layer.mlp_channels is None for layer in plan.layers)
    prefix, filled = gates.to_plan(budget), gates.to_plan(budget, fill=True)
    assert fraction(gates, filled) >= fraction(gates, prefix) - 1e-9
    assert gates.to_plan(0.12) == gates.to_plan(0.12)  # deterministic


def test_channel_units_let_a_small_budget_keep_part_of_an_mlp():
    """On a model where one visual MLP is a large share of the visual FLOPs, whole-MLP gates at a small budget
    can only keep heads; with channel units the plan keeps the best blocks of an MLP beside its heads."""
    gates = channel_gates(2)
    with torch.no_grad():  # heads open, MLP blocks of layer 0 the most certain units
        gates.head.log_alpha.fill_(2.0)
        gates.router.log_alpha.fill_(5.0)
        gates.mlp.log_alpha.fill_(5.0)
        gates.channels.log_alpha.fill_(-5.0)
        gates.channels.log_alpha[0, :3] = 5.0
    plan = gates.to_plan(0.25, fill=True)
    assert plan.layers[0].mlp and plan.layers[0].mlp_channels == tuple(range(192))
    assert fraction(gates, plan) <= 0.25 + 1e-6


def test_plan_forward_runs_the_plans_blocks_straight_through():
    gates = channel_gates(3)
    gates.train()
    plan = gates.to_plan(0.3, fill=True)
    with gates.plan_forward(0.3, fill=True):
        values = gates(batch_size=2)
    assert gates.last_plan == plan and values.channels.shape == (1, 4, 8)
    assert torch.equal(values.channels[0].detach(), gates.plan_blocks(plan))
    values.channels.sum().backward()
    assert gates.channels.log_alpha.grad.abs().sum() > 0
    sampled = gates(batch_size=3)
    assert sampled.channels.shape == (3, 4, 8) and 0.0 <= float(sampled.channels.min()) <= 1.0


def test_candidates_are_distinct_whole_block_plans_within_the_budget():
    gates = channel_gates(4)
    candidates = gates.candidate_plans(0.25, 6, fill=True, seed=1)
    plans = [plan for plan, _ in candidates]
    assert plans[0] == gates.to_plan(0.25, fill=True) and len(set(plans)) == len(plans) > 1
    assert all(fraction(gates, plan) <= 0.25 + 1e-6 and whole_blocks(plan) for plan in plans)


@pytest.mark.parametrize("seed", range(3))
def test_committed_gates_harden_to_the_plan(seed):
    gates = channel_gates(seed)
    plan = gates.candidate_plans(0.3, 6, fill=True, seed=seed)[-1][0]
    gates.commit_to(plan)
    assert gates.to_plan(0.3, fill=True) == plan and gates.to_plan(0.3) == plan
    assert torch.equal((gates.channels.log_alpha > 0).float(), gates.plan_blocks(plan))


def test_a_plan_that_keeps_part_of_a_block_is_refused():
    gates = channel_gates(0)
    plan = gates.to_plan(1.0)
    layers = list(plan.layers)
    layers[1] = type(layers[1])(heads=layers[1].heads, mlp=True, mlp_channels=tuple(range(10)))
    partial = type(plan)(family=plan.family, window=plan.window, num_layers=4, num_heads=4, layers=tuple(layers))
    with pytest.raises(ValueError, match="keeps part of channel block 0"):
        gates.plan_blocks(partial)


def _committed_channel_model(model, plan, block):
    gates = attach_gates(model, GateConfig(window=plan.window, mlp_channel_block=block))
    gates.commit_to(plan)
    return model.eval()


def _channel_plan(num_layers, num_heads, family, seed, block, size, window=3):
    from visprune.modeling import LayerPlan, Plan

    gen = torch.Generator().manual_seed(seed)
    blocks = list(range(0, size, block))
    layers = []
    for _ in range(num_layers):
        heads = tuple(h for h in range(num_heads) if torch.rand((), generator=gen) > 0.4)
        kept = [b for b in blocks if torch.rand((), generator=gen) > 0.5] or [blocks[0]]
        channels = tuple(c for b in kept for c in range(b, min(b + block, size)))
        layers.append(LayerPlan(heads=heads, mlp=True, mlp_channels=None if len(kept) == len(blocks) else channels))
    return Plan(family=family, window=window, num_layers=num_layers, num_heads=num_heads, layers=tuple(layers))


@pytest.mark.parametrize("name", ["llava", *sorted(TINY_FAMILIES)])
def test_gates_committed_to_a_channel_plan_compute_the_hardened_plan(name):
    """Gated mode with learned channel gates committed to a plan (eval: the deterministic gates are exactly
    0/1) == the hardened plan, which drops the closed channels' rows and columns."""
    if name == "llava":
        model, batch = tiny_llava(seed=1), tiny_batch(padding="right")
        num_layers, num_heads = 3, 4
        size = model.config.text_config.intermediate_size
    else:
        tiny = TINY_FAMILIES[name](seed=1)
        model, (batch, _) = tiny.model, tiny.batch(padding="right", seed=1)
        num_layers, num_heads = tiny.num_layers, tiny.num_heads
        size = model.config.text_config.intermediate_size
    block = max(1, size // 3 + 1)  # three blocks, the last partial
    plan = _channel_plan(num_layers, num_heads, name, seed=5, block=block, size=size)
    assert any(layer.mlp_channels is not None for layer in plan.layers)
    hardened = copy.deepcopy(model)
    apply_plan(hardened, plan, mode="hardened")
    gated = _committed_channel_model(model, plan, block)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, got = hardened(**batch).logits[mask], gated(**batch).logits[mask]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
