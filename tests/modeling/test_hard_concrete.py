import math

import pytest
import torch
from visprune.modeling import HardConcreteGate
from visprune.modeling.hard_concrete import LOG_ALPHA_LIMIT


def test_sample_in_unit_interval_with_exact_zeros_and_ones():
    torch.manual_seed(0)
    gate = HardConcreteGate((20000,), init_log_alpha=0.0).train()
    z, _ = gate()
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()


def test_prob_open_matches_monte_carlo():
    torch.manual_seed(0)
    for log_alpha in (-2.0, 0.0, 1.5):
        gate = HardConcreteGate((200000,), init_log_alpha=log_alpha).train()
        empirical = (gate.sample() != 0).float().mean().item()
        assert abs(empirical - gate.prob_open()[0].item()) < 0.01


def test_eval_is_deterministic_and_train_is_not():
    gate = HardConcreteGate((64,), init_log_alpha=0.5)
    gate.eval()
    assert torch.equal(gate()[0], gate()[0])
    expected = min(1.0, max(0.0, 1 / (1 + math.exp(-0.5)) * 1.2 - 0.1))
    assert torch.allclose(gate()[0], torch.full((64,), expected))
    gate.train()
    assert not torch.equal(gate()[0], gate()[0])


def test_limits_give_exact_zero_and_one_and_clamp():
    gate = HardConcreteGate((2,))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([50.0, -50.0]))
    assert gate.eval()()[0].tolist() == [1.0, 0.0]
    gate.constrain_()
    assert gate.log_alpha.tolist() == [LOG_ALPHA_LIMIT, -LOG_ALPHA_LIMIT]


def test_gradients_reach_log_alpha():
    torch.manual_seed(0)
    gate = HardConcreteGate((8,), init_log_alpha=0.0).train()
    z, prob = gate()
    (z.sum() + prob.sum()).backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.1, 2.0 / 3.0, 1.5])
def test_prob_open_matches_monte_carlo_at_any_temperature(temperature):
    gate = HardConcreteGate((3,), init_log_alpha=0.5, temperature=temperature)
    torch.manual_seed(0)
    draws = gate.sample(200_000)
    assert torch.allclose((draws > 0).float().mean(0), gate.prob_open().detach(), atol=5e-3)


def test_a_lower_temperature_draws_closer_to_zero_or_one():
    torch.manual_seed(0)
    u = torch.rand(50_000, 1)
    hot, cold = HardConcreteGate((1,), 1.0, temperature=2.0), HardConcreteGate((1,), 1.0, temperature=0.05)
    middle = lambda z: float(((z > 0) & (z < 1)).float().mean())
    assert middle(cold.draw(u)) < 0.1 < middle(hot.draw(u))


def test_gate_set_anneals_from_start_to_final_temperature():
    from visprune.modeling import GateConfig, GateSet
    from visprune.modeling.families import TextDims

    dims = TextDims(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32, intermediate_size=128)
    gates = GateSet(dims, GateConfig(temperature=0.2, temperature_start=1.0), "llava", (2, 2))
    assert gates.head.temperature == 0.2  # built (and hardened) at the final temperature
    assert [gates.temperature_at(p) for p in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    gates.set_temperature(0.6)
    assert gates.head.temperature == gates.router.temperature == gates.mlp.temperature == 0.6
    assert GateSet(dims, GateConfig(), "llava", (2, 2)).temperature_at(0.3) == pytest.approx(2.0 / 3.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            GateConfig(temperature=bad)
        with pytest.raises(ValueError, match="temperature_start"):
            GateConfig(temperature_start=bad)
