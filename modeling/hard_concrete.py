"""Hard-concrete (L0) gates of Louizos et al. 2018, "Learning Sparse Neural Networks through L0
Regularization": sampled in train(), deterministic in eval(). Knows nothing of attention or models."""

from __future__ import annotations

import math

import torch
from torch import nn

TEMPERATURE = 2.0 / 3.0
STRETCH_LOW = -0.1  # gamma
STRETCH_HIGH = 1.1  # zeta
LOG_ALPHA_LIMIT = 10.0  # |log_alpha| <= 10: sigmoid(+-10) stretched and clipped gives exact 0 / 1
_EPS = 1e-6


class HardConcreteGate(nn.Module):
    """A tensor of independent hard-concrete gates with learnable `log_alpha`.

    Args:
        shape: shape of the gate tensor, e.g. `(num_layers, num_heads)`.
        init_log_alpha: initial `log_alpha`; the default 3.0 opens every gate in eval (P(open) ~ 0.99).

    Calling the module returns `(z, prob_open)`: z is `sample()` in train mode and `deterministic()`
    in eval mode, float32. Both come out of one forward so that ZeRO-3, which gathers a module's
    parameters around its forward and backward, sees every use of `log_alpha`.
    """

    def __init__(self, shape: tuple[int, ...], init_log_alpha: float = 3.0, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.shape = tuple(shape)
        self.temperature = float(temperature)  # beta of Louizos et al.; a trainer may anneal it
        self.log_alpha = nn.Parameter(torch.full(self.shape, float(init_log_alpha), dtype=torch.float32))

    def clamped_log_alpha(self) -> torch.Tensor:
        return self.log_alpha.float().clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clamp the stored `log_alpha` in place (call after each optimizer step)."""
        self.log_alpha.clamp_(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    def sample(self, num_samples: int | None = None) -> torch.Tensor:
        """One reparameterised draw z in [0, 1] (shape `shape`), or `num_samples` independent draws
        (shape `(num_samples, *shape)`); exact 0 and 1 have non-zero probability."""
        size = self.shape if num_samples is None else (num_samples, *self.shape)
        return self.draw(torch.rand(size, dtype=torch.float32, device=self.log_alpha.device))

    def draw(self, u: torch.Tensor) -> torch.Tensor:
        """The gate value for uniform noise `u` in (0, 1) (broadcast against `shape`)."""
        u = u.to(self.log_alpha.device, torch.float32).clamp(_EPS, 1.0 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.clamped_log_alpha()) / self.temperature)
        # stretch, then clip: exact 0/1 get mass (Louizos et al. 2018, eq. 10)
        return (s * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The test-time gate: clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)."""
        s = torch.sigmoid(self.clamped_log_alpha())
        return (s * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)

    def prob_open(self) -> torch.Tensor:
        """P(z != 0) = sigmoid(log_alpha - T * log(-gamma / zeta)) (Louizos et al. 2018, eq. 12)."""
        return torch.sigmoid(self.clamped_log_alpha() - self.temperature * math.log(-STRETCH_LOW / STRETCH_HIGH))

    def forward(self, num_samples: int | None = None, probs_only: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(z, P(open)); in train mode `num_samples` draws z of shape (num_samples, *shape), in eval
        mode z is the deterministic gate (shape `shape`) whatever `num_samples` is. `probs_only`: (None,
        P(open)) without a draw; called through the module so ZeRO-3 gathers `log_alpha` first."""
        if probs_only:
            return None, self.prob_open()
        return (self.sample(num_samples) if self.training else self.deterministic()), self.prob_open()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, temperature={self.temperature:.3g}"


class FixedGate(nn.Module):
    """Constant 0/1 gates with the HardConcreteGate interface: a plan applied in gated mode."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(values.shape)
        self.register_buffer("values", values.detach().float().clone(), persistent=False)

    def sample(self, num_samples: int | None = None) -> torch.Tensor:
        return self.values

    def deterministic(self) -> torch.Tensor:
        return self.values

    def prob_open(self) -> torch.Tensor:
        return (self.values != 0).float()

    def constrain_(self) -> None:
        return None

    def forward(self, num_samples: int | None = None, probs_only: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        return (None if probs_only else self.values), self.prob_open()

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
