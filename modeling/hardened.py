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
- in frozen layers (docs/design.md rule 7) visual rows project only K/V (KV groups with a kept head),
  which text rows read; their hidden states are carried past unchanged;
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

from .families import TextDims, forward_inputs, suppress_in_generation
from .families.base import check_llama_layers
from .gates import check_plan, get_gate_set
from .layout import VisualLayout
from .plan import PLAN_FILE, LayerPlan, Plan

HARDENED_KWARG = "visprune_hardened"
HARDENED_ATTR = "visprune_plan"  # the applied Plan, on the transformers model
# the attention kernel of hardened layers: "auto" (SDPA on CUDA, the merged fp32 softmax elsewhere), "sdpa", "merged"
ATTENTION_KERNELS = ("auto", "sdpa", "merged")
attention_kernel = "auto"
_FAR = 1 << 62  # key position of padding slots: after every query


# ---- row bookkeeping, once per forward ----------------------------------------------------------
@dataclass
class Rows:
    """One kind of rows (text or visual) of a (B, T) forward, in two layouts: flat, the N rows as
    indices into the B*T rows of the forward; and padded, (B, M) with M the most rows one sample has,
    for attention. A sample's slots past its own rows are padding slots."""

    flat_idx: torch.Tensor  # (N,) the row among the forward's B*T rows
    sample_idx: torch.Tensor  # (N,) its sample
    slot_idx: torch.Tensor  # (N,) its slot in the sample's padded row
    padded_idx: torch.Tensor  # (B, M) the flat row in each slot; 0 on padding slots
    valid_mask: torch.Tensor  # (B, M) bool: the slot holds a row (False on padding slots)
    seq_idx: torch.Tensor  # (B, M) the row's position in the forward; -1 on padding slots

    @classmethod
    def select(cls, mask: torch.Tensor) -> Rows:
        B, T = mask.shape
        flat_idx = mask.reshape(-1).nonzero().squeeze(1)
        sample_idx = flat_idx // T
        slot_idx = (mask.long().cumsum(dim=1) - 1).reshape(-1)[flat_idx]
        width = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
        padded_idx = torch.zeros(B, width, dtype=torch.long, device=mask.device)
        valid_mask = torch.zeros(B, width, dtype=torch.bool, device=mask.device)
        seq_idx = torch.full((B, width), -1, dtype=torch.long, device=mask.device)
        padded_idx[sample_idx, slot_idx] = torch.arange(flat_idx.numel(), device=mask.device)
        valid_mask[sample_idx, slot_idx] = True
        seq_idx[sample_idx, slot_idx] = flat_idx % T
        return cls(flat_idx, sample_idx, slot_idx, padded_idx, valid_mask, seq_idx)

    @property
    def count(self) -> int:
        return self.flat_idx.numel()

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, M, ...); padding slots hold row 0's values (masked everywhere)."""
        return x[self.padded_idx]

    def unpadded(self, y: torch.Tensor) -> torch.Tensor:
        """(B, M, ...) -> (N, ...)."""
        return y[self.sample_idx, self.slot_idx]

    def query_pos(self, past: int) -> torch.Tensor:
        """(B, M) each slot's position in the sequence (cache included); -1 on padding slots: sees no key."""
        return torch.where(self.valid_mask, self.seq_idx + past, torch.full_like(self.seq_idx, -1))

    def key_pos(self, past: int) -> torch.Tensor:
        """(B, M) each slot's position in the sequence; far past every query on padding slots: never seen."""
        return torch.where(self.valid_mask, self.seq_idx + past, torch.full_like(self.seq_idx, _FAR))


@dataclass
class ForwardRows:
    text: Rows
    visual: Rows
    window: WindowRows | None


@dataclass
class WindowRows:
    """The visual queries regrouped by image-grid row for the neighbour window: grid row i holds its
    queries in `q_index[i]` (by column, padded to the widest grid) and the keys of grid rows
    i-w//2 .. i+w//2 in `k_index[i]` (with a temporal window t: of those rows on each slice of the same video at
    most t//2 away, t x w rows); `pair_ok` says which (query, key) pairs are in the window.
    Indices point into this forward's visual rows (`Rows.flat_idx` order)."""

    q_index: torch.Tensor  # (R, C)
    k_index: torch.Tensor  # (R, t*w*C)
    pair_ok: torch.Tensor  # (R, C, t*w*C)
    row_of: torch.Tensor  # (Nv,) grid row of each visual row
    col_of: torch.Tensor  # (Nv,) column of each visual row


def _window_rows(layout: VisualLayout, visual: Rows, window: int, temporal: int = 1) -> WindowRows:
    device = visual.flat_idx.device
    grid = layout.grid_idx.reshape(-1)[visual.flat_idx]
    media = layout.media_idx.reshape(-1)[visual.flat_idx]
    slices = layout.slice_idx.reshape(-1)[visual.flat_idx]
    row = layout.row.reshape(-1)[visual.flat_idx]
    col = layout.col.reshape(-1)[visual.flat_idx]
    num_grids = int(grid.max().item()) + 1
    zeros = torch.zeros(num_grids, dtype=torch.long, device=device)
    rows = zeros.scatter_reduce(0, grid, row + 1, "amax")
    cols = zeros.scatter_reduce(0, grid, col + 1, "amax")
    index = torch.arange(visual.count, device=device)
    start = torch.full_like(zeros, _FAR).scatter_reduce(0, grid, index, "amin")  # a grid's tokens are consecutive
    row_offset = torch.cumsum(rows, 0) - rows
    R, C = int(rows.sum().item()), int(cols.max().item())
    radius = window // 2
    grid_media = torch.full_like(zeros, -1).scatter_reduce(0, grid, media, "amax")
    grid_slice = torch.full_like(zeros, -1).scatter_reduce(0, grid, slices, "amax")

    row_of = row_offset[grid] + row
    q_index = torch.zeros(R, C, dtype=torch.long, device=device)
    q_ok = torch.zeros(R, C, dtype=torch.bool, device=device)
    q_index[row_of, col] = index
    q_ok[row_of, col] = True

    row_grid = torch.repeat_interleave(torch.arange(num_grids, device=device), rows)  # (R,)
    row_r = torch.arange(R, device=device) - row_offset[row_grid]
    # the grids whose rows a grid row reads: its own and, with a temporal window, its video's slices around it
    # (a video's slices are consecutive grids of one size)
    d_slice = torch.arange(-(temporal // 2), temporal // 2 + 1, device=device)
    neighbour = row_grid[:, None] + d_slice  # (R, t)
    key_grid = neighbour.clamp(0, num_grids - 1)
    grid_ok = ((neighbour >= 0) & (neighbour < num_grids) & (grid_media[key_grid] == grid_media[row_grid][:, None])
               & (grid_slice[key_grid] - grid_slice[row_grid][:, None] == d_slice))
    d_row = torch.arange(-radius, radius + 1, device=device)
    key_row = row_r[:, None] + d_row  # (R, w)
    key_col = torch.arange(C, device=device)
    g_rows, g_cols = rows[row_grid][:, None, None, None], cols[row_grid][:, None, None, None]
    k_ok = (grid_ok[:, :, None, None] & (key_row[:, None, :, None] >= 0) & (key_row[:, None, :, None] < g_rows)
            & (key_col < g_cols))  # (R, t, w, C)
    k_index = torch.where(k_ok, start[key_grid][:, :, None, None] + key_row[:, None, :, None] * g_cols + key_col, 0)
    near = (key_col[:, None] - key_col[None, :]).abs() <= radius  # (C query, C key)
    pair_ok = q_ok[:, :, None, None, None] & k_ok[:, None] & near[None, :, None, None, :]  # (R, C, t, w, C)
    return WindowRows(q_index, k_index.reshape(R, -1), pair_ok.reshape(R, C, -1), row_of, col)


@dataclass
class HardenedForward:
    """The layout of one forward and what every layer derives from it (computed once)."""

    layout: VisualLayout
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def rows(self, window: int | None, temporal: int = 1) -> ForwardRows:
        """Text and visual rows, and the visual rows regrouped for a layer's `window` and the plan's temporal
        window (each window's regrouping computed once per forward)."""
        lay = self.layout
        if "rows" not in self._memo:
            self._memo["rows"] = (Rows.select(lay.key_valid & ~lay.visual_mask),
                                  Rows.select(lay.key_valid & lay.visual_mask))
        text, visual = self._memo["rows"]
        key = ("window", window, temporal)
        if key not in self._memo:
            self._memo[key] = (_window_rows(lay, visual, window, temporal) if window is not None and visual.count
                               else None)
        return ForwardRows(text, visual, self._memo[key])

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
    """One layer of a plan as index sets into the layer's weights. Heads and groups are numbered after
    `_permute_heads`, which puts the kept ones first (so their weight slices are contiguous views)."""

    visual: bool  # visual rows take part in this layer (router r = 1)
    heads: list[int]  # the kept visual heads
    groups: list[int]  # the KV groups with a kept head
    mlp: bool  # visual rows run the MLP
    channels: list[int] | None  # the MLP channels visual rows keep; None: all
    num_heads: int
    head_dim: int
    group_size: int  # query heads per KV group
    window: int | None = None  # the neighbour window of this layer's visual queries (the plan's or its own)
    temporal_window: int = 1  # the plan's: slices of the same video a video token's window spans
    frozen: bool = False  # visual rows give K/V (kept groups) and are not updated: no Q, attention, O or MLP

    def __post_init__(self) -> None:
        D = self.head_dim
        head_features = [h * D + i for h in self.heads for i in range(D)]
        self.q_proj_rows = _Select(head_features, 0)  # the kept heads' outputs of q_proj
        self.kv_proj_rows = _Select([g * D + i for g in self.groups for i in range(D)], 0)  # kept groups' of k/v_proj
        self.o_proj_cols = _Select(head_features, 1)  # the kept heads' inputs of o_proj
        kept_group_pos = {g: i for i, g in enumerate(self.groups)}
        # (Hk,) each kept head's KV group, numbered among all groups (text K/V) or among the kept ones (visual K/V)
        self.head_group_idx = torch.tensor([h // self.group_size for h in self.heads], dtype=torch.long)
        self.head_kept_group_idx = torch.tensor([kept_group_pos[h // self.group_size] for h in self.heads],
                                                dtype=torch.long)
        self.one_head_per_group = self.head_kept_group_idx.tolist() == list(range(len(self.groups)))
        self.head_idx = torch.tensor(self.heads, dtype=torch.long)  # (Hk,) the kept heads
        if self.channels is not None:
            self.mlp_in_rows = _Select(self.channels, 0)  # the kept channels' outputs of gate_proj and up_proj
            self.mlp_out_cols = _Select(self.channels, 1)  # the kept channels' inputs of down_proj


def _linear_pair(x_text: torch.Tensor, x_vis: torch.Tensor, linear: nn.Linear, select: _Select):
    """Text rows through the whole `linear`, visual rows through its `select`ed output rows. When the
    selection is a contiguous range, one GEMM serves both row sets on it (no small text-only GEMM)."""
    weight, bias = linear.weight, linear.bias
    if select.span is None:
        return F.linear(x_text, weight, bias), F.linear(x_vis, select(weight), select(bias))
    start, stop = select.span
    both = F.linear(torch.cat([x_text, x_vis]), weight[start:stop], None if bias is None else bias[start:stop])
    n = x_text.shape[0]
    parts = [both[:n]]
    if start > 0:
        parts.insert(0, F.linear(x_text, weight[:start], None if bias is None else bias[:start]))
    if stop < weight.shape[0]:
        parts.append(F.linear(x_text, weight[stop:], None if bias is None else bias[stop:]))
    text = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return text, both[n:]


def _out_pair(o_text: torch.Tensor, o_vis: torch.Tensor, linear: nn.Linear, select: _Select):
    """The output projection: text rows use every input column, visual rows the `select`ed ones
    (their kept heads); one GEMM over both on a contiguous range."""
    weight, bias = linear.weight, linear.bias
    if select.span is None:
        return F.linear(o_text, weight, bias), F.linear(o_vis, select(weight), bias)
    start, stop = select.span
    n = o_text.shape[0]
    both = F.linear(torch.cat([o_text[:, start:stop], o_vis]), weight[:, start:stop], bias)
    text = both[:n]
    if start > 0:
        text = text + F.linear(o_text[:, :start], weight[:, :start])
    if stop < weight.shape[1]:
        text = text + F.linear(o_text[:, stop:], weight[:, stop:])
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


def _use_sdpa(hidden: torch.Tensor) -> bool:
    if attention_kernel not in ATTENTION_KERNELS:
        raise ValueError(f"hardened attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                         f"got {attention_kernel!r}")
    return attention_kernel == "sdpa" or (attention_kernel == "auto" and hidden.is_cuda)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def _causal(scores: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """Scores (B, h, Q, K) with -inf where the key comes after the query: key_pos (B, K), query_pos (B, Q)."""
    return scores.masked_fill(key_pos[:, None, None, :] > query_pos[:, None, :, None], float("-inf"))


def _merged_softmax(blocks: list[tuple[torch.Tensor | None, torch.Tensor, Any]], shape: tuple[int, ...]):
    """Softmax over the union of key blocks, with the queries' output `shape` (..., h, Q, D) or (N, h, D).
    Each block is (heads or None = all, float32 scores of the output's shape with K for D and -inf where
    masked, apply(probs) -> that block's share of the output). Rows with no key give zeros."""
    m = None
    for heads, scores, _ in blocks:
        bm = scores.amax(dim=-1) if scores.shape[-1] else scores.new_full(scores.shape[:-1], float("-inf"))
        if m is None:
            m = bm if heads is None else scores.new_full(shape[:-1], float("-inf")).index_copy(1, heads, bm)
        elif heads is None:
            m = torch.maximum(m, bm)
        else:
            m = m.index_copy(1, heads, torch.maximum(m.index_select(1, heads), bm))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = torch.zeros(shape, dtype=torch.float32, device=m.device)
    denom = torch.zeros(shape[:-1], dtype=torch.float32, device=m.device)
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
@dataclass
class _Projected:
    """Q/K/V of one forward's rows after the rotary embeddings, heads split."""

    q_text: torch.Tensor  # (Nt, H, D)
    k_text: torch.Tensor  # (Nt, Hkv, D)
    v_text: torch.Tensor  # (Nt, Hkv, D)
    q_vis: torch.Tensor | None = None  # (Nv, Hk, D); None: no visual row attends in this layer
    k_vis: torch.Tensor | None = None  # (Nv, Gk, D)
    v_vis: torch.Tensor | None = None  # (Nv, Gk, D)


class HardenedDecoderLayer(nn.Module):
    """A Llama-style decoder layer executing one layer of a plan (see the module docstring), in four steps:
    `_project` (input norm, Q/K/V; `_keys` puts K/V after the cache's), `_text_attention`, `_visual_attention`
    (the neighbour window) and `_add_attention_output` + `_add_mlp` (output projection and MLP, each with its
    residual).

    Legend. Shapes: B samples, T tokens of this forward, d hidden size, H query heads, Hkv KV heads, D head
    dim; Hk kept visual heads, Gk their KV groups; Nt / Nv text / visual rows of this forward (flat rows),
    Mt / Mv the most text / visual rows of one sample (padded rows, see `Rows`), St / Sv text / visual keys
    (the cache's included). Names: `*_text` / `*_vis` belong to text / visual rows; `h` is the residual
    stream, `x` its input-normed copy, `q`, `k`, `v` queries, keys, values, `s` attention scores (-inf where
    masked), `o` attention outputs; `*_pos` sequence positions (cache included); `keys_*` a
    [keys, values, key positions] triple in the padded layout; `*_per_head` the K/V of each kept visual
    head's KV group (B, Hk, S, D).
    """

    def __init__(self, layer: nn.Module, layer_idx: int, rule: LayerRule, rotary_fn) -> None:
        super().__init__()
        self.layer = layer
        self.layer_idx = layer_idx
        self.rule = rule
        self._rotary = rotary_fn

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = False, position_embeddings=None, **kwargs) -> torch.Tensor:
        ctx = self._context(hidden_states, position_embeddings, kwargs)
        B, T, d = hidden_states.shape
        cache = _cache_layer(past_key_values, self.layer_idx) if use_cache or past_key_values is not None else None
        past = cache.length if cache is not None else 0
        rows = ctx.rows(self.rule.window, self.rule.temporal_window)
        text, vis = rows.text, rows.visual
        hidden = hidden_states.reshape(B * T, d)
        h_text = hidden[text.flat_idx]
        h_vis = hidden[vis.flat_idx] if self.rule.visual and vis.count else None  # None: visual rows skip the layer

        qkv = self._project(h_text, h_vis, ctx.rotary(position_embeddings, B), rows)
        keys_text, keys_vis = self._keys(qkv, rows, past, cache, T)
        if _use_sdpa(hidden):
            o_text, o_vis = self._sdpa_attention(qkv, keys_text, keys_vis, rows, past)
        else:
            o_text = self._text_attention(qkv.q_text, keys_text, keys_vis, text, past).to(hidden.dtype)
            o_vis = None
            if qkv.q_vis is not None:
                o_vis = self._visual_attention(qkv, keys_text, keys_vis, rows, past).to(hidden.dtype)
        if self.rule.frozen:
            h_vis = None  # frozen visual rows gave their K/V and are carried unchanged (rule 7)
        h_text, h_vis = self._add_attention_output(h_text, h_vis, o_text, o_vis)
        h_text, h_vis = self._add_mlp(h_text, h_vis)

        out = hidden.clone()  # skipped visual rows and padding rows are carried unchanged
        out[text.flat_idx] = h_text
        if h_vis is not None:
            out[vis.flat_idx] = h_vis
        return out.view(B, T, d)

    def _context(self, hidden_states: torch.Tensor, position_embeddings, kwargs: dict[str, Any]) -> HardenedForward:
        """This forward's `HardenedForward`, checked against the layer's inputs."""
        ctx: HardenedForward | None = kwargs.get(HARDENED_KWARG)
        if ctx is None:
            raise RuntimeError(f"layer {self.layer_idx}: hardened layer called without its context; call the "
                               "multimodal model (not its language model) directly")
        if position_embeddings is None:
            raise RuntimeError(f"layer {self.layer_idx}: no rotary position embeddings were passed")
        T = hidden_states.shape[1]
        if ctx.layout.num_queries != T:
            raise RuntimeError(f"layer {self.layer_idx}: {T} tokens but the layout has {ctx.layout.num_queries}")
        return ctx

    # ---- step 1: project ------------------------------------------------------------------------------------
    def _project(self, h_text: torch.Tensor, h_vis: torch.Tensor | None, rotary: tuple[torch.Tensor, torch.Tensor],
                 rows: ForwardRows) -> _Projected:
        """Input norm, then Q/K/V of the text rows (every head) and of the visual rows (kept heads, kept
        groups; none when `h_vis` is None or no head is kept), one GEMM over both where they use the same
        weight rows; rotary embeddings on Q and K. `rotary`: cos, sin (B*T, D)."""
        rule, layer = self.rule, self.layer
        attn = layer.self_attn
        H, D = rule.num_heads, rule.head_dim
        Hkv = H // rule.group_size
        cos, sin = rotary
        x_text = layer.input_layernorm(h_text)
        q_vis = k_vis = v_vis = None
        if h_vis is not None and rule.heads:
            x_vis = layer.input_layernorm(h_vis)
            if rule.frozen:  # rule 7: the visual K/V of the kept groups only, no visual queries
                q_text = attn.q_proj(x_text)
            else:
                q_text, q_vis = _linear_pair(x_text, x_vis, attn.q_proj, rule.q_proj_rows)
            k_text, k_vis = _linear_pair(x_text, x_vis, attn.k_proj, rule.kv_proj_rows)
            v_text, v_vis = _linear_pair(x_text, x_vis, attn.v_proj, rule.kv_proj_rows)
            Gk = len(rule.groups)
            k_vis, v_vis = k_vis.view(-1, Gk, D), v_vis.view(-1, Gk, D)
            flat = rows.visual.flat_idx
            q_vis = k_vis if q_vis is None else q_vis.view(-1, len(rule.heads), D)  # (frozen: rotate K alone)
            q_rot, k_vis = self._rotary(q_vis, k_vis, cos[flat], sin[flat], unsqueeze_dim=1)
            q_vis = None if rule.frozen else q_rot
        else:
            q_text, k_text, v_text = attn.q_proj(x_text), attn.k_proj(x_text), attn.v_proj(x_text)
        q_text, k_text, v_text = q_text.view(-1, H, D), k_text.view(-1, Hkv, D), v_text.view(-1, Hkv, D)
        flat = rows.text.flat_idx
        q_text, k_text = self._rotary(q_text, k_text, cos[flat], sin[flat], unsqueeze_dim=1)
        return _Projected(q_text, k_text, v_text, q_vis, k_vis, v_vis)

    def _keys(self, qkv: _Projected, rows: ForwardRows, past: int, cache: PrunedKVLayer | None, num_tokens: int):
        """This forward's keys in the padded layout, after the cache's: (keys_text [k, v (B, Hkv, St, D),
        positions (B, St)], keys_vis of the kept groups [k, v (B, Gk, Sv, D), positions (B, Sv)] or None
        where the layer keeps no visual head)."""
        text, vis = rows.text, rows.visual
        new_text = [text.padded(qkv.k_text).transpose(1, 2), text.padded(qkv.v_text).transpose(1, 2),
                    text.key_pos(past)]
        new_vis = None
        if qkv.k_vis is not None:
            new_vis = [vis.padded(qkv.k_vis).transpose(1, 2), vis.padded(qkv.v_vis).transpose(1, 2),
                       vis.key_pos(past)]
        if cache is None:
            return new_text, new_vis
        return cache.append(new_text, new_vis, num_tokens)

    # ---- step 2: text attention -----------------------------------------------------------------------------
    def _sdpa_attention(self, qkv: _Projected, keys_text, keys_vis, rows: ForwardRows, past: int):
        """Steps 2 and 3 on fused SDPA kernels in the weights' dtype (`hardened_sdpa`)."""
        from . import hardened_sdpa

        rule = self.rule
        scale = self.layer.self_attn.scaling
        device = qkv.q_text.device
        o_text = hardened_sdpa.text_attention(qkv.q_text, keys_text, keys_vis, rows.text, past,
                                              _to_device(rule.head_idx, device), rule.group_size, scale,
                                              self._per_head)
        if qkv.q_vis is None:
            return o_text, None
        kept_group = None if rule.one_head_per_group else _to_device(rule.head_kept_group_idx, device)
        o_vis = hardened_sdpa.visual_attention(qkv.q_vis, qkv.k_vis, qkv.v_vis, keys_text, keys_vis, rows.visual,
                                               rows.window, past, _to_device(rule.head_group_idx, device), scale,
                                               self._per_head, kept_group)
        return o_text, o_vis.reshape(-1, len(rule.heads) * rule.head_dim)

    def _text_attention(self, q_text: torch.Tensor, keys_text: list[torch.Tensor], keys_vis: list[torch.Tensor] | None,
                        text: Rows, past: int) -> torch.Tensor:
        """Text queries (Nt, H, D) against the text keys (every head, causal) and the visual keys (kept heads,
        causal), one softmax over both. Returns (Nt, H*D) float32."""
        rule = self.rule
        k_text, v_text, text_pos = keys_text
        q = text.padded(q_text).transpose(1, 2).float() * self.layer.self_attn.scaling  # (B, H, Mt, D)
        q_pos = text.query_pos(past)
        v_text = v_text.float()
        s_text = _causal(_grouped_scores(q, k_text.float()), text_pos, q_pos)  # (B, H, Mt, St)
        blocks = [(None, s_text, lambda p: _grouped_apply(p, v_text))]
        if keys_vis is not None and keys_vis[0].shape[2]:
            heads = _to_device(rule.head_idx, q.device)
            k_vis, v_vis = self._per_head(keys_vis[0]).float(), self._per_head(keys_vis[1]).float()
            s_vis = _causal(q.index_select(1, heads) @ k_vis.transpose(-1, -2), keys_vis[2], q_pos)  # (B, Hk, Mt, Sv)
            blocks.append((heads, s_vis, lambda p: p @ v_vis))
        o = _merged_softmax(blocks, q.shape)  # (B, H, Mt, D)
        return text.unpadded(o.transpose(1, 2)).reshape(-1, rule.num_heads * rule.head_dim)

    # ---- step 3: visual attention ---------------------------------------------------------------------------
    def _visual_attention(self, qkv: _Projected, keys_text: list[torch.Tensor], keys_vis: list[torch.Tensor],
                          rows: ForwardRows, past: int) -> torch.Tensor:
        """Visual queries of the kept heads against the text keys before them and the visual keys of their
        window (without a window: every visual key before them), one softmax over both. Returns (Nv, Hk*D)
        float32."""
        rule, vis = self.rule, rows.visual
        scale = self.layer.self_attn.scaling
        group = _to_device(rule.head_group_idx, qkv.q_vis.device)
        k_text, v_text, text_pos = keys_text
        k_text_per_head, v_text_per_head = k_text.index_select(1, group), v_text.index_select(1, group)
        if rows.window is not None:
            o = self._window_attention(qkv.q_vis * scale, qkv.k_vis, qkv.v_vis, k_text_per_head, v_text_per_head,
                                       text_pos, vis, rows.window, past)
        else:
            q = vis.padded(qkv.q_vis).transpose(1, 2).float() * scale  # (B, Hk, Mv, D)
            q_pos = vis.query_pos(past)
            v_text_per_head = v_text_per_head.float()
            k_vis, v_vis = self._per_head(keys_vis[0]).float(), self._per_head(keys_vis[1]).float()
            s_text = _causal(q @ k_text_per_head.float().transpose(-1, -2), text_pos, q_pos)  # (B, Hk, Mv, St)
            s_vis = _causal(q @ k_vis.transpose(-1, -2), keys_vis[2], q_pos)  # (B, Hk, Mv, Sv)
            o = _merged_softmax([(None, s_text, lambda p: p @ v_text_per_head), (None, s_vis, lambda p: p @ v_vis)],
                                q.shape)
            o = vis.unpadded(o.transpose(1, 2))  # (Nv, Hk, D)
        return o.reshape(-1, len(rule.heads) * rule.head_dim)

    def _per_head(self, kv: torch.Tensor) -> torch.Tensor:
        """(B, Gk, S, D) -> (B, Hk, S, D): each kept head's group."""
        if self.rule.one_head_per_group:
            return kv
        return kv.index_select(1, _to_device(self.rule.head_kept_group_idx, kv.device))

    def _window_attention(self, q_vis, k_vis, v_vis, k_text_per_head, v_text_per_head, text_pos, vis: Rows,
                          win: WindowRows, past: int) -> torch.Tensor:
        """Visual queries (Nv, Hk, D), already scaled, against the text keys before them (per sample) and their
        w x w neighbours, computed per image-grid row: each grid row's queries meet the keys of the w grid
        rows around it (w x the row's width keys, not every visual key). `k_vis`, `v_vis`: (Nv, Gk, D). One
        softmax over both blocks, per visual row. Returns (Nv, Hk, D) float32."""
        if not self.rule.one_head_per_group:
            pos = _to_device(self.rule.head_kept_group_idx, q_vis.device)
            k_vis, v_vis = k_vis.index_select(1, pos), v_vis.index_select(1, pos)
        # text block: scores per sample (B, Hk, Mv, St), then one row per visual query (Nv, Hk, St)
        s_text = vis.padded(q_vis).float().transpose(1, 2) @ k_text_per_head.float().transpose(-1, -2)
        s_text = _causal(s_text, text_pos, vis.query_pos(past)).transpose(1, 2)[vis.sample_idx, vis.slot_idx]
        v_text = v_text_per_head.float()

        def apply_text(p: torch.Tensor) -> torch.Tensor:  # (Nv, Hk, St) -> (Nv, Hk, D), through the padded layout
            return (vis.padded(p).transpose(1, 2) @ v_text).transpose(1, 2)[vis.sample_idx, vis.slot_idx]

        # window block: scores per grid row (Hk, R, C, w*C), then one row per visual query (Nv, Hk, w*C)
        q = q_vis.float().transpose(0, 1).contiguous()  # (Hk, Nv, D)
        k = k_vis.float().transpose(0, 1).contiguous()
        v = v_vis.float().transpose(0, 1).contiguous()
        s_win = (q[:, win.q_index] @ k[:, win.k_index].transpose(-1, -2)).masked_fill(~win.pair_ok, float("-inf"))
        s_win = s_win.permute(1, 2, 0, 3)[win.row_of, win.col_of]

        def apply_window(p: torch.Tensor) -> torch.Tensor:  # (Nv, Hk, w*C) -> (Nv, Hk, D), through the grid rows
            o = p[win.q_index].permute(2, 0, 1, 3) @ v[:, win.k_index]  # (Hk, R, C, D)
            return o.permute(1, 2, 0, 3)[win.row_of, win.col_of]

        return _merged_softmax([(None, s_text, apply_text), (None, s_win, apply_window)], q_vis.shape)

    # ---- step 4: output projection and MLP ------------------------------------------------------------------
    def _add_attention_output(self, h_text: torch.Tensor, h_vis: torch.Tensor | None, o_text: torch.Tensor,
                              o_vis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual plus the output projection: text rows of every head, visual rows of their kept heads
        (one GEMM over both); a layer that keeps no head adds only the projection's bias to visual rows."""
        o_proj = self.layer.self_attn.o_proj
        if o_vis is None:
            if h_vis is not None and o_proj.bias is not None:
                h_vis = h_vis + o_proj.bias
            return h_text + o_proj(o_text), h_vis
        out_text, out_vis = _out_pair(o_text, o_vis, o_proj, self.rule.o_proj_cols)
        return h_text + out_text, h_vis + out_vis

    def _add_mlp(self, h_text: torch.Tensor, h_vis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual plus the MLP: every text row; visual rows where the plan keeps it (its kept channels)."""
        layer, rule = self.layer, self.rule
        norm = layer.post_attention_layernorm
        x_text = norm(h_text)
        if h_vis is not None and rule.mlp and rule.channels is None:  # one MLP call over text + visual rows
            both = layer.mlp(torch.cat([x_text, norm(h_vis)]))
            return h_text + both[: len(h_text)], h_vis + both[len(h_text):]
        h_text = h_text + layer.mlp(x_text)
        if h_vis is not None and rule.mlp:
            h_vis = h_vis + self._visual_mlp(norm(h_vis))
        return h_text, h_vis

    def _visual_mlp(self, x: torch.Tensor) -> torch.Tensor:
        mlp, rule = self.layer.mlp, self.rule
        if rule.channels is None:
            return mlp(x)
        gate = F.linear(x, rule.mlp_in_rows(mlp.gate_proj.weight), rule.mlp_in_rows(mlp.gate_proj.bias))
        up = F.linear(x, rule.mlp_in_rows(mlp.up_proj.weight), rule.mlp_in_rows(mlp.up_proj.bias))
        return F.linear(mlp.act_fn(gate) * up, rule.mlp_out_cols(mlp.down_proj.weight), mlp.down_proj.bias)


# ---- applying and loading -------------------------------------------------------------------------------
def _check_layers(family: str, layers: nn.ModuleList, text_config: Any) -> None:
    """Hardened execution runs Llama-style layers (`check_llama_layers`) whose attention has no per-head
    Q/K norm."""
    check_llama_layers(family, layers, text_config)
    for layer_idx, layer in enumerate(layers):
        for norm in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, norm):
                raise TypeError(f"layer {layer_idx}: {type(layer.self_attn).__name__}.{norm} is not supported by "
                                "hardened execution")


def _layer_rule(attn: nn.Module, layer_plan: LayerPlan, dims: TextDims, window: int | None,
                temporal_window: int = 1) -> LayerRule:
    """The `LayerRule` of one layer of a plan; reorders the layer's heads so the kept ones come first."""
    group_size = dims.num_heads // dims.num_kv_heads
    heads, groups = [], []
    if not layer_plan.skipped and layer_plan.heads:
        heads, groups = _permute_heads(attn, sorted(layer_plan.heads), dims.num_heads, group_size, dims.head_dim)
    return LayerRule(visual=not layer_plan.skipped, heads=heads, groups=groups,
                     mlp=layer_plan.mlp and not layer_plan.skipped,
                     channels=None if layer_plan.mlp_channels is None else sorted(layer_plan.mlp_channels),
                     num_heads=dims.num_heads, head_dim=dims.head_dim, group_size=group_size, window=window,
                     temporal_window=temporal_window, frozen=layer_plan.frozen)


def harden_model(model: nn.Module, plan: Plan) -> nn.Module:
    """`apply_plan(model, plan, mode="hardened")`: wrap every decoder layer to execute `plan`.

    `generate()` never emits the family's media placeholder tokens (`suppress_in_generation`).
    """
    if getattr(model, HARDENED_ATTR, None) is not None:
        raise ValueError("this model is already hardened; load a fresh copy to apply another plan")
    if get_gate_set(model) is not None:
        raise ValueError("this model has gates attached; apply_plan(model, plan, mode='hardened') detaches them")
    family, dims = check_plan(model, plan)
    layers = family.decoder_layers(model)
    _check_layers(family.name, layers, model.config.text_config)
    rotary_fn = family.rotary_fn(layers[0])  # the family knows how its rotary tables are applied
    for layer_idx, layer in enumerate(layers):
        rule = _layer_rule(layer.self_attn, plan.layers[layer_idx], dims, plan.layer_window(layer_idx),
                           plan.temporal_window)
        layers[layer_idx] = HardenedDecoderLayer(layer, layer_idx, rule, rotary_fn)

    core = family.multimodal_core(model)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if kwargs.get(HARDENED_KWARG) is not None:
            return args, kwargs
        layout = family.build_layout(model, forward_inputs(module, args, kwargs))
        kwargs[HARDENED_KWARG] = HardenedForward(layout)
        return args, kwargs

    core.register_forward_pre_hook(pre_hook, with_kwargs=True)
    suppress_in_generation(model, family.placeholder_token_ids(model.config))
    object.__setattr__(model, HARDENED_ATTR, plan)
    return model


def hardened_forward_context(model: nn.Module, input_ids: torch.Tensor, grids, attention_mask=None) -> HardenedForward:
    """A context for calling a hardened model without pixel values (benchmarks): `visprune_hardened=ctx`."""
    from .layout import build_layout

    getattr(model, HARDENED_ATTR)  # an AttributeError for a model that is not hardened
    return HardenedForward(build_layout(input_ids, model.config.image_token_id, grids, attention_mask))


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
