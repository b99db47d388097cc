import math

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
