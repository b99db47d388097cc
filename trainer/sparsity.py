"""SparsityController: the FLOPs-budget target schedule and the Lagrange multipliers of the
constraint loss `λ1(ŝ−t) + λ2(ŝ−t)²` (CoFi / Sheared-LLaMA). λ are ordinary parameters stepped by
descent; a gradient-reversal function turns that into ascent on λ (no negative learning rates)."""

from __future__ import annotations

import torch
from torch import nn
from visprune.modeling import GateProbs, ModelDims, TokenLayout, visual_flops


class _GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    return _GradientReversal.apply(x)


class SparsityController(nn.Module):
    """Owns λ1, λ2 and the target schedule; `forward(expected_fraction, step)` gives the penalty.

    Args:
        target: final fraction of dense visual FLOPs (budget.visual_flops).
        warmup_steps: the target ramps linearly from 1.0 to `target` over this many steps.
    """

    def __init__(self, target: float, warmup_steps: int) -> None:
        super().__init__()
        self.target = float(target)
        self.warmup_steps = int(warmup_steps)
        # shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters
        self.lambda_1 = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.lambda_2 = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.last_lambdas: tuple[float, float] = (0.0, 0.0)  # read inside forward (ZeRO-3 has gathered them)

    def target_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.target
        progress = min(1.0, step / self.warmup_steps)
        return 1.0 - (1.0 - self.target) * progress

    def forward(self, expected_fraction: torch.Tensor, step: int) -> torch.Tensor:
        gap = expected_fraction.float() - self.target_at(step)
        self.last_lambdas = (float(self.lambda_1.detach()[0]), float(self.lambda_2.detach()[0]))
        lambda_1, lambda_2 = reverse_gradient(self.lambda_1), reverse_gradient(self.lambda_2)
        return (lambda_1 * gap + lambda_2 * gap * gap).squeeze(0)


class ExpectedFlops:
    """ŝ: expected visual FLOPs as a fraction of dense, from gate open-probabilities (differentiable).

    Uses the one cost model of `visprune.modeling.flops` with the run's window and token layout.
    """

    def __init__(self, dims: ModelDims, layout: TokenLayout, window: int | None, temporal: int = 1) -> None:
        self.dims, self.layout, self.window, self.temporal = dims, layout, window, temporal
        self.dense = float(visual_flops(dims, layout))  # the paper's dense unit (full attention)

    def __call__(self, probs: GateProbs) -> torch.Tensor:
        return visual_flops(self.dims, self.layout, probs, self.window, self.temporal) / self.dense
