"""The gated visual attention of docs/design.md (neighbour window + head gates on visual keys and visual
query rows), registered with transformers' attention registry as `visprune_sdpa` (training on any
device: SDPA with an additive per-head float mask) and `visprune_flex` (FlexAttention: score_mod
for head log-gates, block mask for window + causal + padding). Gates and layout arrive per forward
through the `visprune_ctx` kwarg; the MLP side lives in the family wrappers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .layout import VisualLayout

SDPA_NAME = "visprune_sdpa"
FLEX_NAME = "visprune_flex"
CTX_KWARG = "visprune_ctx"
LOG_GATE_FLOOR = 1e-6  # training: log(max(e, eps)) keeps gradients finite where a sampled gate is 0


class GateValues(NamedTuple):
    """Effective gates of one forward, float32: `head` e = r*g (N, L, H), `router` r (N, L), `mlp`
    u = r*a*m (N, L), with channel gates `channels` c (N, L, B), the share of each block of the visual
    MLP's intermediate channels, and with freeze gates `update` a (N, L), whether a layer updates its visual
    rows (docs/design.md rule 7: the query side of head h is then e*a), and with ring gates `rings` rho (N, L, R),
    the nested gate of each ring k = 1..R of the window (rho[k] = z[1]...z[k], rule 1); N is the batch size when
    every sample has its own draw (training), else 1.

    A NamedTuple so that DeepSpeed ZeRO-3 finds the tensors in the GateSet's output."""

    head: torch.Tensor
    router: torch.Tensor
    mlp: torch.Tensor
    channels: torch.Tensor | None = None
    update: torch.Tensor | None = None
    rings: torch.Tensor | None = None

    def query_head(self, layer_idx: int) -> torch.Tensor:
        """(N, H) the query-side gate of layer `layer_idx`'s heads for visual rows: e = r*g, times a (rule 7)."""
        e = self.head[:, layer_idx]
        return e if self.update is None else e * self.update[:, layer_idx, None]

    def rows_updated(self, layer_idx: int) -> torch.Tensor:
        """(N,) r*a of layer `layer_idx`: how much of the layer's visual-row update (output bias) is kept."""
        r = self.router[:, layer_idx]
        return r if self.update is None else r * self.update[:, layer_idx]


@dataclass
class VisualContext:
    """Everything the gated layers need for one forward; reaches them through the forward kwargs."""

    layout: VisualLayout
    gates: GateValues
    window: int | None
    training: bool
    layer_windows: dict[int, int] = field(default_factory=dict)  # a plan's per-layer windows, over `window`
    temporal_window: int = 1  # slices of the same video a video token's window spans (t of `[t, h, w]`)
    mlp_channel_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (I,) bool
    channel_block: int | None = None  # channels per block of `gates.channels` (GateSet.channel_block)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # layer-independent masks

    def window_of(self, layer_idx: int) -> int | None:
        """Layer `layer_idx`'s neighbour window: the plan's own for that layer, else `window`."""
        return self.layer_windows.get(layer_idx, self.window)

    def log_head_gates(self, layer_idx: int, dtype: torch.dtype) -> torch.Tensor:
        """(N, H) log e[l, h]; closed gates give the dtype's lowest finite value (an exact 0 after softmax)."""
        e = self.gates.head[:, layer_idx]
        if self.training:
            return torch.log(e.clamp_min(LOG_GATE_FLOOR)).to(dtype)
        low = torch.finfo(dtype).min
        return torch.where(e > 0, torch.log(e.clamp_min(1e-30)), torch.full_like(e, low)).to(dtype)

    def log_ring_gates(self, layer_idx: int, dtype: torch.dtype) -> torch.Tensor:
        """(N, R + 1) log rho[l, k] for Chebyshev distance k = 0..R (k = 0, a token and itself: 0); closed rings give
        the dtype's lowest finite value, as closed heads do (`log_head_gates`)."""
        rho = self.gates.rings[:, layer_idx].float()
        if self.training:
            log = torch.log(rho.clamp_min(LOG_GATE_FLOOR))
        else:
            log = torch.where(rho > 0, torch.log(rho.clamp_min(1e-30)), torch.full_like(rho, torch.finfo(dtype).min))
        return torch.cat([torch.zeros_like(log[:, :1]), log], dim=1).to(dtype)

    def ring_distance(self, num_queries: int) -> torch.Tensor:
        """(B, Q, K) long: the Chebyshev distance of each visual query x visual key pair of the same grid, clamped
        to the rings' radius R (farther pairs are outside the window anyway); 0 for every other pair. Pairs on
        neighbouring slices of a video (a temporal window) count their distance on the grid."""
        key = ("ring_distance", num_queries)
        if key not in self._cache:
            lay = self.layout
            qpos = lay.query_positions()
            same = lay.visual_mask[:, qpos, None] & lay.visual_mask[:, None, :] & lay.same_span(self.temporal_window)
            dist = torch.maximum((lay.row[:, qpos, None] - lay.row[:, None, :]).abs(),
                                 (lay.col[:, qpos, None] - lay.col[:, None, :]).abs())
            self._cache[key] = torch.where(same, dist.clamp_max(self.gates.rings.shape[-1]), 0)
        return self._cache[key]

    def row_has_key(self, layer_idx: int) -> torch.Tensor:
        """(B, H, Q) bool: the query row sees at least one key (docs/design.md rule 6: otherwise zeros)."""
        if "row_base" not in self._cache:  # layer-independent part, once per forward
            lay = self.layout
            q_valid = lay.key_valid[:, lay.num_keys - lay.num_queries:]
            self._cache["row_base"] = (q_valid[:, None, :], (~lay.query_visual_mask | lay.has_text_before())[:, None, :])
        q_valid, sees_text = self._cache["row_base"]
        open_head = (self.gates.head[:, layer_idx] > 0)[:, :, None]  # (N, H, 1)
        return q_valid & (sees_text | open_head)


def _ctx_from(kwargs: dict[str, Any], module: torch.nn.Module) -> VisualContext:
    ctx = kwargs.get(CTX_KWARG)
    if ctx is None:
        raise RuntimeError(
            f"layer {getattr(module, 'layer_idx', '?')}: the visprune attention was called without a visual "
            "context; gates are attached to the multimodal model, call it (not its language model) directly")
    return ctx


def _window_allowed(ctx: VisualContext, base_allowed: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, Q, K) bool: base causal/padding mask with visual-query x visual-key pairs replaced by the window."""
    lay = ctx.layout
    if window is None:
        return base_allowed
    radius = window // 2
    qpos = lay.query_positions()
    q_vis, k_vis = lay.visual_mask[:, qpos], lay.visual_mask
    near = ((lay.row[:, qpos, None] - lay.row[:, None, :]).abs() <= radius) & (
        (lay.col[:, qpos, None] - lay.col[:, None, :]).abs() <= radius)
    both_visual = q_vis[:, :, None] & k_vis[:, None, :]
    return torch.where(both_visual, lay.same_span(ctx.temporal_window) & near, base_allowed)


def _finish(ctx: VisualContext, layer_idx: int, out: torch.Tensor) -> torch.Tensor:
    """(B, H, Q, D) -> (B, Q, H, D): zero rows with no key, scale visual query rows by e[l, h] (times the
    freeze gate a[l], rule 7)."""
    e = ctx.gates.query_head(layer_idx).to(out.dtype)[:, :, None]  # (N, H, 1)
    q_vis = ctx.layout.query_visual_mask  # (B, Q)
    scale = torch.where(q_vis[:, None, :], e, torch.ones_like(e))  # (B, H, Q)
    scale = scale * ctx.row_has_key(layer_idx).to(out.dtype)
    return (out * scale[..., None]).transpose(1, 2).contiguous()


def _check_lengths(ctx: VisualContext, query: torch.Tensor, key: torch.Tensor, layer_idx: int) -> None:
    lay = ctx.layout
    if key.shape[2] != lay.num_keys or query.shape[2] != lay.num_queries:
        raise RuntimeError(
            f"layer {layer_idx}: attention sees {query.shape[2]} queries x {key.shape[2]} keys but the visual "
            f"layout has {lay.num_queries} x {lay.num_keys}; was the KV cache modified outside the model?")


def visprune_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Gated attention with SDPA; CPU/GPU, forward and backward.

    query (B, H, Q, D), key/value (B, Hkv, K, D), attention_mask (B, 1, Q, K) bool from `visprune_mask`.
    Returns (B, Q, H, D) and no weights.

    The window/causal/padding mask is one additive (B, 1, Q, K) tensor shared by every head and by every layer
    of the forward with the same window. The head's log-gate reaches the scores as one extra query/key channel: every query gets 1, a visual
    key log e[b, h] / scale (a text key 0), so score = scale * q.k + log e on visual keys, exactly the additive
    rule of docs/design.md, without a per-head (B, H, Q, K) mask. The channel is padded to a multiple of 8 (fused
    kernels' head sizes) with zeros, which add nothing.
    """
    ctx = _ctx_from(kwargs, module)
    layer_idx = module.layer_idx
    _check_lengths(ctx, query, key, layer_idx)
    H, Q, D = query.shape[1], query.shape[2], query.shape[3]
    groups = H // key.shape[1]
    if groups > 1:  # grouped-query attention: every query head reads its group's K/V (the gate is per query head)
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)

    low = torch.finfo(query.dtype).min
    window = ctx.window_of(layer_idx)
    cache_key = ("base", Q, query.dtype, window)
    if cache_key not in ctx._cache:
        if attention_mask is None:
            raise RuntimeError("visprune_sdpa needs the boolean mask from its registered mask function")
        allowed = _window_allowed(ctx, attention_mask[:, 0].bool(), window)  # (B, Q, K)
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # a row without keys is zeroed in _finish
        ctx._cache[cache_key] = torch.where(allowed, 0.0, low).to(query.dtype)[:, None]  # (B, 1, Q, K)
    base = ctx._cache[cache_key]
    if ctx.gates.rings is not None:  # rule 1 with ring gates: + log rho[l, k] on visual pairs at distance k
        table = ctx.log_ring_gates(layer_idx, query.dtype)  # (N, R + 1)
        dist = ctx.ring_distance(Q)  # (B, Q, K)
        ring_bias = (table[0][dist] if table.shape[0] == 1 else
                     torch.gather(table[:, None, :].expand(-1, Q, -1), 2, dist))  # (B, Q, K)
        base = (base + ring_bias[:, None]).clamp_min(low)

    scale = scaling if scaling is not None else D**-0.5
    log_gate = ctx.log_head_gates(layer_idx, query.dtype)  # (N, H); closed gates: the dtype's lowest value
    channel = (log_gate / scale).clamp_min(low)[:, :, None, None]  # finite, so a closed head scores ~low
    B, K = key.shape[0], key.shape[2]
    key_gate = torch.where(ctx.layout.visual_mask[:, None, :, None], channel,
                           torch.zeros((), dtype=query.dtype, device=query.device))  # (B, H, K, 1)
    pad = 8 - D % 8  # the gate channel and zeros up to the next multiple of 8
    zeros = query.new_zeros(1, 1, 1, 1).expand(B, H, max(Q, K), pad - 1)
    query = torch.cat([query, query.new_ones(1, 1, 1, 1).expand(B, H, Q, 1), zeros[:, :, :Q]], dim=-1)
    key = torch.cat([key, key_gate.expand(B, H, K, 1), zeros[:, :, :K]], dim=-1)
    value = torch.cat([value, query.new_zeros(1, 1, 1, 1).expand(B, H, K, pad)], dim=-1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=base, dropout_p=dropout, scale=scale)
    return _finish(ctx, layer_idx, out[..., :D]), None


def _flex_block_mask(ctx: VisualContext, Q: int, device: torch.device, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    lay = ctx.layout
    B, K = lay.visual_mask.shape
    offset = K - Q
    radius = -1 if window is None else window // 2
    vis, row, col, valid = lay.visual_mask, lay.row, lay.col, lay.key_valid
    same_span = lay.span_rule(ctx.temporal_window)

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        causal = (kv_idx <= q_pos) & valid[b, kv_idx] & valid[b, q_pos]
        if radius < 0:
            return causal
        window = (same_span(b, q_pos, kv_idx) & ((row[b, q_pos] - row[b, kv_idx]).abs() <= radius)
                  & ((col[b, q_pos] - col[b, kv_idx]).abs() <= radius))
        return torch.where(vis[b, q_pos] & vis[b, kv_idx], window, causal)

    return create_block_mask(mask_mod, B, None, Q, K, device=device)


_compiled_flex = None


def _flex_kernel(on_cuda: bool):
    """Compiled FlexAttention on CUDA (the fused kernel); the eager reference elsewhere (CPU tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not on_cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def visprune_flex_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Gated attention with FlexAttention (same semantics as `visprune_sdpa_attention`).

    FlexAttention has no CPU backward in torch 2.13; on CPU this path is for inference and tests.
    """
    ctx = _ctx_from(kwargs, module)
    layer_idx = module.layer_idx
    _check_lengths(ctx, query, key, layer_idx)
    if dropout:
        raise ValueError("visprune_flex does not support attention dropout; use visprune_sdpa")
    Q = query.shape[2]
    window = ctx.window_of(layer_idx)
    cache_key = ("block_mask", Q, window)
    if cache_key not in ctx._cache:
        ctx._cache[cache_key] = _flex_block_mask(ctx, Q, query.device, window)
    vis = ctx.layout.visual_mask
    log_gate = ctx.log_head_gates(layer_idx, torch.float32).expand(vis.shape[0], -1)  # (B, H)
    if ctx.gates.rings is not None:  # rule 1 with ring gates: + log rho[l, k] on visual pairs at distance k
        lay = ctx.layout
        ring = ctx.log_ring_gates(layer_idx, torch.float32).expand(vis.shape[0], -1)  # (B, R + 1)
        offset, radius = lay.num_keys - Q, ring.shape[1] - 1
        row, col, same_span = lay.row, lay.col, lay.span_rule(ctx.temporal_window)

        def score_mod(score, b, h, q_idx, kv_idx):
            q_pos = q_idx + offset
            pair = vis[b, q_pos] & vis[b, kv_idx] & same_span(b, q_pos, kv_idx)
            dist = torch.maximum((row[b, q_pos] - row[b, kv_idx]).abs(), (col[b, q_pos] - col[b, kv_idx]).abs())
            bias = torch.where(pair, ring[b, dist.clamp(0, radius)], 0.0)
            return score + torch.where(vis[b, kv_idx], log_gate[b, h], 0.0) + bias
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + torch.where(vis[b, kv_idx], log_gate[b, h], 0.0)

    out = _flex_kernel(query.is_cuda)(query, key, value, score_mod=score_mod, block_mask=ctx._cache[cache_key],
                         scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return _finish(ctx, layer_idx, out), None


def visprune_mask(*args, **kwargs):
    """The boolean causal + padding mask (B, 1, Q, K), always materialised (never the is_causal shortcut)."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def flex_no_mask(*args, **kwargs):
    """visprune_flex builds its block mask from the visual layout; transformers need not build one."""
    return


AttentionInterface.register(SDPA_NAME, visprune_sdpa_attention)
AttentionMaskInterface.register(SDPA_NAME, visprune_mask)
AttentionInterface.register(FLEX_NAME, visprune_flex_attention)
AttentionMaskInterface.register(FLEX_NAME, flex_no_mask)
