"""The family protocol: the only place that knows attribute paths inside a transformers model,
plus the layer wrappers (original module kept as a child) that gate the visual MLP rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..gated_attention import CTX_KWARG, VisualContext
from ..layout import VisualLayout


@dataclass(frozen=True)
class TextDims:
    """Language-model dimensions the gates and the FLOPs model need."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


class Family(Protocol):
    name: str

    def matches(self, model: nn.Module) -> bool: ...
    def text_dims(self, config: Any) -> TextDims: ...
    def image_grid(self, config: Any) -> tuple[int, int]: ...
    def multimodal_core(self, model: nn.Module) -> nn.Module: ...
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList: ...
    def build_layout(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualLayout: ...


class LayerSlot:
    """Hands the visual context from a layer's attention wrapper to its MLP wrapper.

    The attention wrapper runs inside the layer's forward (also when gradient checkpointing re-runs
    that forward in backward), so the MLP always reads the context of the forward it belongs to.
    """

    def __init__(self) -> None:
        self.ctx: VisualContext | None = None


class VisualAttentionWrapper(nn.Module):
    """Wraps a decoder layer's self-attention: publishes the context to the MLP wrapper and scales
    the output-projection bias of visual rows by r[l] (DESIGN.md rule 3)."""

    def __init__(self, attn: nn.Module, layer_idx: int, slot: LayerSlot, out_bias: nn.Parameter | None) -> None:
        super().__init__()
        self.attn = attn
        self.layer_idx = layer_idx
        self._slot = slot
        self._has_out_bias = out_bias is not None

    def forward(self, *args, **kwargs):
        ctx = kwargs.get(CTX_KWARG)
        self._slot.ctx = ctx
        out, weights = self.attn(*args, **kwargs)
        if self._has_out_bias and ctx is not None:
            bias = self.out_bias()
            keep = ctx.gates.router[self.layer_idx].to(out.dtype)
            vis = ctx.layout.query_visual_mask[..., None]
            out = torch.where(vis, out - (1 - keep) * bias.to(out.dtype), out)
        return out, weights

    def out_bias(self) -> torch.Tensor:
        return self.attn.o_proj.bias


class VisualMLPWrapper(nn.Module):
    """Wraps a gated-MLP (gate/up/down) module: visual rows add u[l]*MLP(x), optionally restricted
    to the plan's channels: down(act(gate(x)) * up(x) * channel_mask)."""

    def __init__(self, mlp: nn.Module, layer_idx: int, slot: LayerSlot) -> None:
        super().__init__()
        self.mlp = mlp
        self.layer_idx = layer_idx
        self._slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, self._slot.ctx = self._slot.ctx, None
        if ctx is None:
            raise RuntimeError(f"layer {self.layer_idx}: visual MLP called without a visual context")
        vis = ctx.layout.query_visual_mask[..., None]  # (B, Q, 1)
        channels = ctx.mlp_channel_masks.get(self.layer_idx)
        if channels is None:
            out = self.mlp(x)
            visual_out = out
        else:
            hidden = self.mlp.act_fn(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)  # (B, Q, I)
            out = self.mlp.down_proj(hidden)
            visual_out = self.mlp.down_proj(hidden * channels.to(hidden.dtype))
        u = ctx.gates.mlp[self.layer_idx].to(out.dtype)
        return torch.where(vis, u * visual_out, out)
