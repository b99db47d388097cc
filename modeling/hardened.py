"""Hardened execution of a pruning plan: docs/design.md's semantics with 0/1 gates, computing only the
visual work the plan keeps.

Each decoder layer is wrapped by `HardenedDecoderLayer` (the original layer stays a child and
provides the weights). Per layer:

- text rows run the whole layer (every head, the whole MLP); their attention sees the text keys
  (causal) and the visual keys of kept heads only;
- visual rows, in layers the plan keeps, project Q (kept heads) and K/V (KV groups with a kept
  head) only, attend to the text keys before them and to their w x w neighbours on their own
  image grid (gathered, never a dense visual x visual score matrix), apply the output projection
  to the kept heads' columns and run the visual MLP (or its kept channels) only where kept;
- in layers the visual tokens skip, visual hidden states are carried past unchanged;
- padding rows are not computed at all (their hidden states are carried, their logits are unused);
- where text and visual rows use the same weight rows (the kept heads' Q/K/V/O slices, a kept
  MLP), one GEMM serves both: at apply time the heads inside each layer are reordered so the kept
  visual heads (and their KV groups) come first, which makes those slices contiguous views. The
  reordering leaves the layer's function unchanged (rotary embeddings act per head).

The KV cache (`PrunedKVLayer`, swapped into a `DynamicCache`) keeps text K/V for every KV head and
visual K/V only for the kept groups of kept layers. Decoder-only Llama-style layers
(q/k/v/o_proj, input/post_attention_layernorm, gate/up/down MLP, rotary embeddings) are supported;
the family decides where they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .families import family_for, forward_inputs, suppress_in_generation
from .layout import VisualLayout
from .plan import PLAN_FILE, Plan

HARDENED_KWARG = "visprune_hardened"
HARDENED_ATTR = "visprune_plan"  # the applied Plan, on the transformers model
_FAR = 1 << 62  # key position of padding slots: after every query


# ---- row bookkeeping, once per forward ----------------------------------------------------------
@dataclass
class Rows:
    """One kind of rows (text or visual) of a (B, T) forward: flat indices into B*T, and a padded
    per-sample layout (B, M) for attention. `seq` is the row's index in the forward (-1 on padding slots)."""

    flat: torch.Tensor  # (N,)
    batch: torch.Tensor  # (N,)
    slot: torch.Tensor  # (N,)
    pad: torch.Tensor  # (B, M) index into [0, N); 0 on padding slots
    ok: torch.Tensor  # (B, M) bool
    seq: torch.Tensor  # (B, M) long

    @classmethod
    def select(cls, mask: torch.Tensor) -> Rows:
        B, T = mask.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)
        batch = flat // T
        slot = (mask.long().cumsum(dim=1) - 1).reshape(-1)[flat]
        width = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
        pad = torch.zeros(B, width, dtype=torch.long, device=mask.device)
        ok = torch.zeros(B, width, dtype=torch.bool, device=mask.device)
        seq = torch.full((B, width), -1, dtype=torch.long, device=mask.device)
        pad[batch, slot] = torch.arange(flat.numel(), device=mask.device)
        ok[batch, slot] = True
        seq[batch, slot] = flat % T
        return cls(flat, batch, slot, pad, ok, seq)

    @property
    def count(self) -> int:
        return self.flat.numel()

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, M, ...); padding slots hold row 0's values (masked everywhere)."""
        return x[self.pad]

    def unpadded(self, y: torch.Tensor) -> torch.Tensor:
        """(B, M, ...) -> (N, ...)."""
        return y[self.batch, self.slot]

    def query_pos(self, past: int) -> torch.Tensor:
        return torch.where(self.ok, self.seq + past, torch.full_like(self.seq, -1))

    def key_pos(self, past: int) -> torch.Tensor:
        return torch.where(self.ok, self.seq + past, torch.full_like(self.seq, _FAR))


@dataclass
class ForwardRows:
    text: Rows
    visual: Rows
    window: WindowRows | None


@dataclass
class WindowRows:
    """The visual queries regrouped by image-grid row for the neighbour window: grid row i holds its
    queries in `q_index[i]` (by column, padded to the widest grid) and the keys of grid rows
    i-w//2 .. i+w//2 in `k_index[i]`; `pair_ok` says which (query, key) pairs are in the window.
    Indices point into this forward's visual rows (`Rows.flat` order)."""

    q_index: torch.Tensor  # (R, C)
    k_index: torch.Tensor  # (R, w*C)
    pair_ok: torch.Tensor  # (R, C, w*C)
    row_of: torch.Tensor  # (Nv,) grid row of each visual row
    col_of: torch.Tensor  # (Nv,) column of each visual row


def _window_rows(layout: VisualLayout, visual: Rows, window: int) -> WindowRows:
    device = visual.flat.device
    grid = layout.grid_idx.reshape(-1)[visual.flat]
    row = layout.row.reshape(-1)[visual.flat]
    col = layout.col.reshape(-1)[visual.flat]
    num_grids = int(grid.max().item()) + 1
    zeros = torch.zeros(num_grids, dtype=torch.long, device=device)
    rows = zeros.scatter_reduce(0, grid, row + 1, "amax")
    cols = zeros.scatter_reduce(0, grid, col + 1, "amax")
    index = torch.arange(visual.count, device=device)
    start = torch.full_like(zeros, _FAR).scatter_reduce(0, grid, index, "amin")  # a grid's tokens are consecutive
    row_offset = torch.cumsum(rows, 0) - rows
    R, C = int(rows.sum().item()), int(cols.max().item())
    radius = window // 2

    row_of = row_offset[grid] + row
    q_index = torch.zeros(R, C, dtype=torch.long, device=device)
    q_ok = torch.zeros(R, C, dtype=torch.bool, device=device)
    q_index[row_of, col] = index
    q_ok[row_of, col] = True

    row_grid = torch.repeat_interleave(torch.arange(num_grids, device=device), rows)  # (R,)
    row_r = torch.arange(R, device=device) - row_offset[row_grid]
    d_row = torch.arange(-radius, radius + 1, device=device)
    key_row = row_r[:, None] + d_row  # (R, w)
    key_col = torch.arange(C, device=device)
    g_rows, g_cols = rows[row_grid][:, None, None], cols[row_grid][:, None, None]
    k_ok = (key_row[..., None] >= 0) & (key_row[..., None] < g_rows) & (key_col < g_cols)  # (R, w, C)
    k_index = torch.where(k_ok, start[row_grid][:, None, None] + key_row[..., None] * g_cols + key_col, 0)
    near = (key_col[:, None] - key_col[None, :]).abs() <= radius  # (C query, C key)
    pair_ok = q_ok[:, :, None, None] & k_ok[:, None, :, :] & near[None, :, None, :]  # (R, C, w, C)
    return WindowRows(q_index, k_index.reshape(R, -1), pair_ok.reshape(R, C, -1), row_of, col)


@dataclass
class HardenedForward:
    """The layout of one forward and what every layer derives from it (computed once)."""

    layout: VisualLayout
    window: int | None
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def rows(self) -> ForwardRows:
        if "rows" not in self._memo:
            lay = self.layout
            text = Rows.select(lay.key_valid & ~lay.visual_mask)
            visual = Rows.select(lay.key_valid & lay.visual_mask)
            window = None
            if self.window is not None and visual.count:
                window = _window_rows(lay, visual, self.window)
            self._memo["rows"] = ForwardRows(text, visual, window)
        return self._memo["rows"]

    def rotary(self, position_embeddings: tuple[torch.Tensor, torch.Tensor], batch: int):
        """cos, sin flattened to (B*T, D) (shared by every layer of this forward)."""
        if "rotary" not in self._memo:
            cos, sin = position_embeddings
            if cos.dim() != 3:  # e.g. M-RoPE tables (3, B, T, D) whose sections were not recomposed
                raise TypeError(f"hardened layers need (B, T, D) rotary tables, got {tuple(cos.shape)}; "
                                "the family's rotary_fn does not match this transformers version")
            T, D = cos.shape[-2], cos.shape[-1]
            self._memo["rotary"] = (cos.expand(batch, T, D).reshape(batch * T, D),
                                    sin.expand(batch, T, D).reshape(batch * T, D))
        return self._memo["rotary"]


# ---- the KV cache ---------------------------------------------------------------------------------
class PrunedKVLayer(CacheLayerMixin):
    """One layer's cache in a hardened model: text K/V (B, Hkv, S_text, D) for every KV head, visual
    K/V (B, G_kept, S_vis, D) only for the kept groups, and each key's sequence position."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.text: list[torch.Tensor] | None = None  # [k, v, pos]
        self.vis: list[torch.Tensor] | None = None
        self.length = 0

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - not used
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise RuntimeError("a hardened model's cache layer is filled by visprune's layers, not by update()")

    def append(self, text: list[torch.Tensor], vis: list[torch.Tensor] | None, num_tokens: int):
        """Add this forward's keys; returns (text [k, v, pos], visual [k, v, pos] or None) of the whole cache."""
        cat = lambda old, new: [torch.cat([a, b], dim=-2 if a.dim() == 4 else 1) for a, b in zip(old, new)]
        self.text = text if self.text is None else cat(self.text, text)
        if vis is not None:
            self.vis = vis if self.vis is None else cat(self.vis, vis)
        self.length += num_tokens
        self.is_initialized = True
        return self.text, self.vis

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in (self.text, self.vis) if part for t in part[:2])

    def _map(self, fn) -> None:
        for part in ("text", "vis"):
            tensors = getattr(self, part)
            if tensors is not None:
                setattr(self, part, [fn(t) for t in tensors])

    def reset(self) -> None:
        self.text = self.vis = None
        self.length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a hardened model's cache cannot be cropped (assisted decoding is not supported)")

    def offload(self) -> None:
        return

    def prefetch(self) -> None:
        return


def _cache_layer(cache: Cache | None, layer_idx: int) -> PrunedKVLayer | None:
    if cache is None:
        return None
    if not hasattr(cache, "layers") or (not cache.layers and getattr(cache, "layer_class_to_replicate", None) is None):
        raise TypeError(f"hardened models need a DynamicCache, got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        if getattr(cache, "layer_class_to_replicate", None) is None:
            raise TypeError(f"{type(cache).__name__} has {len(cache.layers)} layers; layer {layer_idx} is missing")
        cache.layers.append(cache.layer_class_to_replicate())
    layer = cache.layers[layer_idx]
    if isinstance(layer, PrunedKVLayer):
        return layer
    if type(layer) is not DynamicLayer or layer.get_seq_length() > 0:
        raise TypeError(f"layer {layer_idx}: hardened models need an empty DynamicCache (got a "
                        f"{type(layer).__name__} holding {layer.get_seq_length()} tokens)")
    layer = PrunedKVLayer()
    cache.layers[layer_idx] = layer
    return layer


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a (pruned or ordinary) KV cache's keys and values."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, PrunedKVLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


# ---- attention helpers -----------------------------------------------------------------------------
def _span(index: list[int]) -> tuple[int, int] | None:
    """(start, stop) when `index` is a contiguous range, else None."""
    if index and index == list(range(index[0], index[0] + len(index))):
        return index[0], index[0] + len(index)
    return None


class _Select:
    """Rows (dim 0) or columns (dim 1) of a weight: a view for a contiguous range, else index_select."""

    def __init__(self, index: list[int], dim: int) -> None:
        self.index, self.dim, self.span = torch.tensor(index, dtype=torch.long), dim, _span(index)

    def __call__(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        if self.span is not None:
            return tensor.narrow(self.dim, self.span[0], self.span[1] - self.span[0])
        if self.index.device != tensor.device:
            self.index = self.index.to(tensor.device)
        return tensor.index_select(self.dim, self.index)


@dataclass
class LayerRule:
    """One layer of a plan, as index sets for the weights."""

    visual: bool  # router r = 1
    heads: list[int]
    groups: list[int]  # KV groups with a kept head
    mlp: bool
    channels: list[int] | None
    num_heads: int
    head_dim: int
    group_size: int

    def __post_init__(self) -> None:
        D = self.head_dim
        self.q_rows = _Select([h * D + i for h in self.heads for i in range(D)], 0)
        self.kv_rows = _Select([g * D + i for g in self.groups for i in range(D)], 0)
        self.o_cols = _Select([h * D + i for h in self.heads for i in range(D)], 1)
        pos = {g: i for i, g in enumerate(self.groups)}
        self.head_group_pos = torch.tensor([pos[h // self.group_size] for h in self.heads], dtype=torch.long)
        self.head_group = torch.tensor([h // self.group_size for h in self.heads], dtype=torch.long)
        self.one_head_per_group = self.head_group_pos.tolist() == list(range(len(self.groups)))
        self.heads_t = torch.tensor(self.heads, dtype=torch.long)
        if self.channels is not None:
            self.ch_rows = _Select(self.channels, 0)
            self.ch_cols = _Select(self.channels, 1)


def _linear_pair(a_t: torch.Tensor, a_v: torch.Tensor, linear: nn.Linear, select: _Select):
    """Text rows through the whole `linear`, visual rows through its `select`ed output rows. When the
    selection is a contiguous range, one GEMM serves both row sets on it (no small text-only GEMM)."""
    weight, bias = linear.weight, linear.bias
    if select.span is None:
        return F.linear(a_t, weight, bias), F.linear(a_v, select(weight), select(bias))
    start, stop = select.span
    both = F.linear(torch.cat([a_t, a_v]), weight[start:stop], None if bias is None else bias[start:stop])
    n = a_t.shape[0]
    parts = [both[:n]]
    if start > 0:
        parts.insert(0, F.linear(a_t, weight[:start], None if bias is None else bias[:start]))
    if stop < weight.shape[0]:
        parts.append(F.linear(a_t, weight[stop:], None if bias is None else bias[stop:]))
    text = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return text, both[n:]


def _out_pair(o_t: torch.Tensor, o_v: torch.Tensor, linear: nn.Linear, select: _Select):
    """The output projection: text rows use every input column, visual rows the `select`ed ones
    (their kept heads); one GEMM over both on a contiguous range."""
    weight, bias = linear.weight, linear.bias
    if select.span is None:
        return F.linear(o_t, weight, bias), F.linear(o_v, select(weight), bias)
    start, stop = select.span
    n = o_t.shape[0]
    both = F.linear(torch.cat([o_t[:, start:stop], o_v]), weight[:, start:stop], bias)
    text = both[:n]
    if start > 0:
        text = text + F.linear(o_t[:, :start], weight[:, :start])
    if stop < weight.shape[1]:
        text = text + F.linear(o_t[:, stop:], weight[:, stop:])
    return text, both[n:]


def _permute_heads(attn: nn.Module, heads: list[int], num_heads: int, group_size: int, head_dim: int):
    """Reorder the heads inside one attention module so the kept visual heads come first: kept KV
    groups first, and inside each group its kept heads first. The layer computes the same function
    (rotary embeddings act per head); the weights get new tensors (shared storage is left alone).
    Returns the kept heads and kept groups in the new numbering."""
    num_groups = num_heads // group_size
    kept = set(heads)
    kept_groups = sorted({h // group_size for h in heads})
    group_order = kept_groups + [g for g in range(num_groups) if g not in set(kept_groups)]
    head_order, new_heads = [], []
    for pos, g in enumerate(group_order):
        members = list(range(g * group_size, (g + 1) * group_size))
        keep = [h for h in members if h in kept]
        new_heads += [pos * group_size + i for i in range(len(keep))]
        head_order += keep + [h for h in members if h not in kept]
    if head_order != list(range(num_heads)):
        q_index = torch.tensor([h * head_dim + i for h in head_order for i in range(head_dim)])
        kv_index = torch.tensor([g * head_dim + i for g in group_order for i in range(head_dim)])
        with torch.no_grad():
            for linear, index, dim in ((attn.q_proj, q_index, 0), (attn.k_proj, kv_index, 0),
                                       (attn.v_proj, kv_index, 0), (attn.o_proj, q_index, 1)):
                linear.weight.data = linear.weight.data.index_select(dim, index.to(linear.weight.device))
                if dim == 0 and linear.bias is not None:
                    linear.bias.data = linear.bias.data.index_select(0, index.to(linear.bias.device))
    return new_heads, list(range(len(kept_groups)))


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def _merged_softmax(blocks: list[tuple[torch.Tensor | None, torch.Tensor, Any]], shape: tuple[int, ...]):
    """Softmax over the union of key blocks. Each block is (heads or None = all, scores (B, h, Q, K)
    float32 with -inf where masked, apply(probs) -> (B, h, Q, D)). Rows with no key give zeros."""
    m = None
    for heads, scores, _ in blocks:
        bm = scores.amax(dim=-1) if scores.shape[-1] else scores.new_full(scores.shape[:-1], float("-inf"))
        if m is None:
            m = bm if heads is None else scores.new_full(shape[:3], float("-inf")).index_copy(1, heads, bm)
        elif heads is None:
            m = torch.maximum(m, bm)
        else:
            m = m.index_copy(1, heads, torch.maximum(m.index_select(1, heads), bm))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = torch.zeros(shape, dtype=torch.float32, device=m.device)
    denom = torch.zeros(shape[:3], dtype=torch.float32, device=m.device)
    for heads, scores, apply in blocks:
        if not scores.shape[-1]:
            continue
        bm = m if heads is None else m.index_select(1, heads)
        p = torch.exp(scores - bm[..., None])
        if heads is None:
            denom = denom + p.sum(dim=-1)
            out = out + apply(p)
        else:
            denom = denom.index_add(1, heads, p.sum(dim=-1))
            out = out.index_add(1, heads, apply(p))
    return out / denom.clamp_min(torch.finfo(torch.float32).tiny)[..., None]


def _grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, Q, D) x k (B, Hkv, K, D) -> (B, H, Q, K), without repeating K for grouped-query heads."""
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    return (q.view(B, Hkv, H // Hkv, Q, D) @ k.transpose(-1, -2).unsqueeze(2)).view(B, H, Q, k.shape[2])


def _grouped_apply(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, H, Q, K = p.shape
    Hkv = v.shape[1]
    return (p.view(B, Hkv, H // Hkv, Q, K) @ v.unsqueeze(2)).view(B, H, Q, v.shape[-1])


# ---- the layer ----------------------------------------------------------------------------------------
class HardenedDecoderLayer(nn.Module):
    """A Llama-style decoder layer executing one layer of a plan (see the module docstring)."""

    def __init__(self, layer: nn.Module, layer_idx: int, rule: LayerRule, rotary_fn) -> None:
        super().__init__()
        self.layer = layer
        self.layer_idx = layer_idx
        self.rule = rule
        self._rotary = rotary_fn

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = False, position_embeddings=None, **kwargs) -> torch.Tensor:
        ctx: HardenedForward | None = kwargs.get(HARDENED_KWARG)
        if ctx is None:
            raise RuntimeError(f"layer {self.layer_idx}: hardened layer called without its context; call the "
                               "multimodal model (not its language model) directly")
        if position_embeddings is None:
            raise RuntimeError(f"layer {self.layer_idx}: no rotary position embeddings were passed")
        B, T, d = hidden_states.shape
        if ctx.layout.num_queries != T:
            raise RuntimeError(f"layer {self.layer_idx}: {T} tokens but the layout has {ctx.layout.num_queries}")
        cache = _cache_layer(past_key_values, self.layer_idx) if use_cache or past_key_values is not None else None
        past = cache.length if cache is not None else 0
        rows = ctx.rows()
        cos, sin = ctx.rotary(position_embeddings, B)
        rule, layer = self.rule, self.layer
        attn = layer.self_attn
        dev = hidden_states.device
        H, D = rule.num_heads, rule.head_dim
        Hkv = H // rule.group_size
        scale = attn.scaling

        x = hidden_states.reshape(B * T, d)
        out = x.clone()
        text, vis = rows.text, rows.visual
        keep_visual = rule.visual and vis.count > 0
        heads_on = keep_visual and bool(rule.heads)

        # ---- projections: one GEMM over text + visual rows where both use the same weight rows
        h_t = x[text.flat]
        a_t = layer.input_layernorm(h_t)
        if keep_visual:
            h_v = x[vis.flat]
            a_v = layer.input_layernorm(h_v)
        new_vis = None
        if heads_on:
            Hk, Gk = len(rule.heads), len(rule.groups)
            q_t, q_v = _linear_pair(a_t, a_v, attn.q_proj, rule.q_rows)
            k_t, k_v = _linear_pair(a_t, a_v, attn.k_proj, rule.kv_rows)
            v_t, v_v = _linear_pair(a_t, a_v, attn.v_proj, rule.kv_rows)
            q_v, k_v, v_v = q_v.view(-1, Hk, D), k_v.view(-1, Gk, D), v_v.view(-1, Gk, D)
            q_v, k_v = self._rotary(q_v, k_v, cos[vis.flat], sin[vis.flat], unsqueeze_dim=1)
            new_vis = [vis.padded(k_v).transpose(1, 2), vis.padded(v_v).transpose(1, 2), vis.key_pos(past)]
        else:
            q_t, k_t, v_t = attn.q_proj(a_t), attn.k_proj(a_t), attn.v_proj(a_t)
        q_t, k_t, v_t = q_t.view(-1, H, D), k_t.view(-1, Hkv, D), v_t.view(-1, Hkv, D)
        q_t, k_t = self._rotary(q_t, k_t, cos[text.flat], sin[text.flat], unsqueeze_dim=1)
        new_text = [text.padded(k_t).transpose(1, 2), text.padded(v_t).transpose(1, 2), text.key_pos(past)]

        if cache is not None:
            all_text, all_vis = cache.append(new_text, new_vis if rule.visual and rule.heads else None, T)
        else:
            all_text, all_vis = new_text, new_vis
        if not (rule.visual and rule.heads):
            all_vis = None
        k_text, v_text, pos_text = all_text

        # ---- text queries: text keys (all heads, causal) + visual keys (kept heads, causal)
        f32 = torch.float32
        qt = text.padded(q_t).transpose(1, 2).to(f32) * scale  # (B, H, Mt, D)
        qpos = text.query_pos(past)[:, None, :, None]  # (B, 1, Mt, 1)
        s_text = _grouped_scores(qt, k_text.to(f32))
        s_text = s_text.masked_fill(pos_text[:, None, None, :] > qpos, float("-inf"))
        vt = v_text.to(f32)
        blocks = [(None, s_text, lambda p: _grouped_apply(p, vt))]
        if all_vis is not None and all_vis[0].shape[2]:
            heads = _on(rule.heads_t, dev)
            kv_k, kv_v = self._per_head(all_vis[0], dev), self._per_head(all_vis[1], dev)
            kv_k, kv_v = kv_k.to(f32), kv_v.to(f32)
            s_vis = qt.index_select(1, heads) @ kv_k.transpose(-1, -2)
            s_vis = s_vis.masked_fill(all_vis[2][:, None, None, :] > qpos, float("-inf"))
            blocks.append((heads, s_vis, lambda p: p @ kv_v))
        o_t = _merged_softmax(blocks, qt.shape).to(x.dtype)  # (B, H, Mt, D)
        o_t = text.unpadded(o_t.transpose(1, 2)).reshape(-1, H * D)
        if not keep_visual:
            h_t = h_t + attn.o_proj(o_t)
            out[text.flat] = h_t + layer.mlp(layer.post_attention_layernorm(h_t))
            return out.view(B, T, d)

        # ---- visual queries (kept heads): text keys before them + the window (or causal visual keys)
        if heads_on:
            Hk = len(rule.heads)
            group = _on(rule.head_group, dev)
            kt_h, vt_h = k_text.index_select(1, group), v_text.index_select(1, group)  # (B, Hk, St, D)
            if rows.window is not None:
                o_v = self._window_attention(q_v * scale, k_v, v_v, kt_h, vt_h, pos_text, vis, rows.window, past)
            else:
                qv_h = vis.padded(q_v).transpose(1, 2).to(f32) * scale  # (B, Hk, Mv, D)
                vpos = vis.query_pos(past)[:, None, :, None]
                kt_h, vt_h = kt_h.to(f32), vt_h.to(f32)
                s_t = (qv_h @ kt_h.transpose(-1, -2)).masked_fill(pos_text[:, None, None, :] > vpos, float("-inf"))
                kv_k = self._per_head(all_vis[0], dev).to(f32)
                kv_v = self._per_head(all_vis[1], dev).to(f32)
                s_v = (qv_h @ kv_k.transpose(-1, -2)).masked_fill(all_vis[2][:, None, None, :] > vpos, float("-inf"))
                o_v = _merged_softmax([(None, s_t, lambda p: p @ vt_h), (None, s_v, lambda p: p @ kv_v)], qv_h.shape)
                o_v = vis.unpadded(o_v.transpose(1, 2))  # (Nv, Hk, D)
            o_v = o_v.to(x.dtype).reshape(-1, Hk * D)
            out_t, out_v = _out_pair(o_t, o_v, attn.o_proj, rule.o_cols)
            h_t, h_v = h_t + out_t, h_v + out_v
        else:
            h_t = h_t + attn.o_proj(o_t)
            if attn.o_proj.bias is not None:
                h_v = h_v + attn.o_proj.bias
        n_t = layer.post_attention_layernorm(h_t)
        if rule.mlp and rule.channels is None:  # one MLP call over text + visual rows
            both = layer.mlp(torch.cat([n_t, layer.post_attention_layernorm(h_v)]))
            h_t, h_v = h_t + both[: text.count], h_v + both[text.count:]
        else:
            h_t = h_t + layer.mlp(n_t)
            if rule.mlp:
                h_v = h_v + self._visual_mlp(layer.post_attention_layernorm(h_v))
        out[text.flat] = h_t
        out[vis.flat] = h_v
        return out.view(B, T, d)

    def _per_head(self, kv: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, G_kept, S, D) -> (B, H_kept, S, D): each kept head's group."""
        if self.rule.one_head_per_group:
            return kv
        return kv.index_select(1, _on(self.rule.head_group_pos, device))

    def _window_attention(self, q_v, k_v, v_v, kt_h, vt_h, pos_text, vis: Rows, win: WindowRows,
                          past: int) -> torch.Tensor:
        """Visual queries (Nv, Hk, D), already scaled, against the text keys before them (per sample)
        and their w x w neighbours, computed per image-grid row: each grid row's queries meet the keys
        of the w grid rows around it (w x the row's width keys, not every visual key). The softmax
        over both blocks is taken per visual row. Returns (Nv, Hk, D)."""
        f32, inf = torch.float32, float("-inf")
        if not self.rule.one_head_per_group:
            pos = _on(self.rule.head_group_pos, q_v.device)
            k_v, v_v = k_v.index_select(1, pos), v_v.index_select(1, pos)
        # window block, grid-row layout (Hk, R, C, w*C)
        qh = q_v.to(f32).transpose(0, 1).contiguous()  # (Hk, Nv, D)
        kh = k_v.to(f32).transpose(0, 1).contiguous()
        vh = v_v.to(f32).transpose(0, 1).contiguous()
        s_win = (qh[:, win.q_index] @ kh[:, win.k_index].transpose(-1, -2)).masked_fill(~win.pair_ok, inf)
        s_win = s_win.permute(1, 2, 0, 3)[win.row_of, win.col_of]  # (Nv, Hk, w*C)
        # text block, per-sample layout (B, Hk, Mv, St)
        q_seq = vis.query_pos(past)
        s_text = vis.padded(q_v).to(f32).transpose(1, 2) @ kt_h.to(f32).transpose(-1, -2)
        s_text = s_text.masked_fill(pos_text[:, None, None, :] > q_seq[:, None, :, None], inf)
        s_text = s_text.transpose(1, 2)[vis.batch, vis.slot]  # (Nv, Hk, St)
        m = torch.maximum(s_win.amax(dim=-1), s_text.amax(dim=-1) if s_text.shape[-1] else s_win.amax(dim=-1))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))[..., None]
        p_win, p_text = torch.exp(s_win - m), torch.exp(s_text - m)
        denom = p_win.sum(dim=-1) + p_text.sum(dim=-1)  # >= exp(0) from the query itself
        o_text = (vis.padded(p_text).transpose(1, 2) @ vt_h.to(f32)).transpose(1, 2)[vis.batch, vis.slot]
        o_win = p_win[win.q_index].permute(2, 0, 1, 3) @ vh[:, win.k_index]  # (Hk, R, C, D)
        o_win = o_win.permute(1, 2, 0, 3)[win.row_of, win.col_of]  # (Nv, Hk, D)
        return (o_text + o_win) / denom[..., None]

    def _visual_mlp(self, x: torch.Tensor) -> torch.Tensor:
        mlp, rule = self.layer.mlp, self.rule
        if rule.channels is None:
            return mlp(x)
        gate = F.linear(x, rule.ch_rows(mlp.gate_proj.weight), rule.ch_rows(mlp.gate_proj.bias))
        up = F.linear(x, rule.ch_rows(mlp.up_proj.weight), rule.ch_rows(mlp.up_proj.bias))
        return F.linear(mlp.act_fn(gate) * up, rule.ch_cols(mlp.down_proj.weight), mlp.down_proj.bias)


# ---- applying and loading -------------------------------------------------------------------------------
def _check_layer(layer: nn.Module, layer_idx: int) -> None:
    attn = getattr(layer, "self_attn", None)
    needed = {"self_attn": attn, "input_layernorm": getattr(layer, "input_layernorm", None),
              "post_attention_layernorm": getattr(layer, "post_attention_layernorm", None),
              "mlp": getattr(layer, "mlp", None)}
    missing = [k for k, v in needed.items() if v is None]
    missing += [f"self_attn.{k}" for k in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, k)]
    missing += [f"mlp.{k}" for k in ("gate_proj", "up_proj", "down_proj", "act_fn")
                if not hasattr(getattr(layer, "mlp", None), k)]
    if missing:
        raise TypeError(f"layer {layer_idx} ({type(layer).__name__}) is not a Llama-style decoder layer: "
                        f"no {', '.join(missing)}")
    for extra in ("q_norm", "k_norm"):
        if hasattr(attn, extra):
            raise TypeError(f"layer {layer_idx}: {type(attn).__name__}.{extra} is not supported by hardened execution")


def harden_model(model: nn.Module, plan: Plan) -> nn.Module:
    """`apply_plan(model, plan, mode="hardened")`: wrap every decoder layer to execute `plan`.

    `generate()` never emits the family's media placeholder tokens (`suppress_in_generation`).
    """
    if getattr(model, HARDENED_ATTR, None) is not None:
        raise ValueError("this model is already hardened; load a fresh copy to apply another plan")
    family = family_for(model)
    dims = family.text_dims(model.config)
    plan.validate_for(dims.num_layers, dims.num_heads, dims.intermediate_size)
    if plan.family != family.name:
        raise ValueError(f"plan is for family {plan.family!r}, the model is {family.name!r}")
    group_size = dims.num_heads // dims.num_kv_heads
    layers = family.decoder_layers(model)
    rotary_fn = None
    for layer_idx, layer in enumerate(layers):
        _check_layer(layer, layer_idx)
        if rotary_fn is None:
            rotary_fn = family.rotary_fn(layer)  # the family knows how its rotary tables are applied
        lp = plan.layers[layer_idx]
        heads, groups = [], []
        if not lp.skipped and lp.heads:
            heads, groups = _permute_heads(layer.self_attn, sorted(lp.heads), dims.num_heads, group_size,
                                           dims.head_dim)
        rule = LayerRule(visual=not lp.skipped, heads=heads, groups=groups,
                         mlp=lp.mlp and not lp.skipped,
                         channels=None if lp.mlp_channels is None else sorted(lp.mlp_channels),
                         num_heads=dims.num_heads, head_dim=dims.head_dim, group_size=group_size)
        layers[layer_idx] = HardenedDecoderLayer(layer, layer_idx, rule, rotary_fn)

    core = family.multimodal_core(model)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if kwargs.get(HARDENED_KWARG) is not None:
            return args, kwargs
        layout = family.build_layout(model, forward_inputs(module, args, kwargs))
        kwargs[HARDENED_KWARG] = HardenedForward(layout, plan.window)
        return args, kwargs

    core.register_forward_pre_hook(pre_hook, with_kwargs=True)
    suppress_in_generation(model, family.placeholder_token_ids(model.config))
    object.__setattr__(model, HARDENED_ATTR, plan)
    return model


def hardened_forward_context(model: nn.Module, input_ids: torch.Tensor, grids, attention_mask=None) -> HardenedForward:
    """A context for calling a hardened model without pixel values (benchmarks): `visprune_hardened=ctx`."""
    from .layout import build_layout

    plan = getattr(model, HARDENED_ATTR)
    return HardenedForward(build_layout(input_ids, model.config.image_token_id, grids, attention_mask), plan.window)


def load_pruned(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                trust_remote_code: bool = False, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load an exported visprune folder (`visprune harden --out DIR`) as a hardened model in eval mode.

    The folder is a standard HF checkpoint (LoRA merged) plus `pruning_plan.json`; this loads it with
    `AutoModelForImageTextToText.from_pretrained` and applies the plan with `mode="hardened"`.

    Args:
        path: the exported folder.
        dtype: weights dtype (default: the folder's).
        device: where to move the model.
        trust_remote_code: let the folder's own model code run; must be given as True or False (a string such
            as "false" is refused: it would be truthy).
        **from_pretrained_kwargs: other `from_pretrained` arguments.
    """
    from transformers import AutoModelForImageTextToText

    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"load_pruned: trust_remote_code must be True or False, got {trust_remote_code!r}")
    path = Path(path)
    plan_file = path / PLAN_FILE
    if not plan_file.is_file():
        raise FileNotFoundError(f"{path} has no {PLAN_FILE}; is it a folder written by `visprune harden`?")
    plan = Plan.from_json(plan_file)
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype or "auto",
                                                        trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    if device is not None:
        model = model.to(device)
    harden_model(model, plan)
    return model.eval()


__all__ = ["HARDENED_KWARG", "HardenedDecoderLayer", "HardenedForward", "PrunedKVLayer", "cache_nbytes",
           "harden_model", "hardened_forward_context", "load_pruned"]
