"""The hardened layer's attention on `F.scaled_dot_product_attention` (fused kernels, the weights' dtype): what
`HardenedDecoderLayer` runs on CUDA (`kernel="auto"`), and on CPU when asked (tests run it there against the
reference merged-softmax path). Same rows, keys and rules as `hardened.py`:

- text queries: the heads that keep visual work attend over the text keys and their visual keys, the other heads
  over the text keys only (two SDPA calls on the two head subsets);
- visual queries with a window: per image-grid row, one SDPA over [the text keys of its sample before it, the
  keys of the w grid rows around it] with a boolean mask (causal for text keys, the window for visual keys);
- visual queries without a window: text keys and every visual key before them, causal.

Masks are boolean (causal by position, never a per-head float mask); a row without any key (padding slots) is
given every key and dropped afterwards, as the reference drops it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # rows without keys: any output, dropped by the caller
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _causal(key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q, K) bool: the key is at or before the query. key_pos (B, K), query_pos (B, Q)."""
    return (key_pos[:, None, :] <= query_pos[:, :, None])[:, None]


def _per_query_head(kv: torch.Tensor, group_size: int) -> torch.Tensor:
    return kv if group_size == 1 else kv.repeat_interleave(group_size, dim=1)


def text_attention(q_text: torch.Tensor, keys_text: list[torch.Tensor], keys_vis: list[torch.Tensor] | None,
                   text, past: int, kept_heads: torch.Tensor, group_size: int, scale: float,
                   per_head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Text queries (Nt, H, D) -> (Nt, H*D) in their dtype. `kept_heads`: the heads with visual keys."""
    k_text, v_text, text_pos = keys_text
    q = text.padded(q_text).transpose(1, 2)  # (B, H, Mt, D)
    H = q.shape[1]
    allowed_text = _causal(text_pos, text.query_pos(past))
    k_text, v_text = _per_query_head(k_text, group_size), _per_query_head(v_text, group_size)
    if keys_vis is None or not keys_vis[0].shape[2] or not kept_heads.numel():
        out = _sdpa(q, k_text, v_text, allowed_text, scale)
    else:
        k_vis, v_vis = per_head(keys_vis[0]), per_head(keys_vis[1])  # (B, Hk, Sv, D)
        allowed = torch.cat([allowed_text, _causal(keys_vis[2], text.query_pos(past))], dim=-1)
        pick = lambda x, heads: x.index_select(1, heads)
        out = torch.empty_like(q)
        out.index_copy_(1, kept_heads, _sdpa(pick(q, kept_heads), torch.cat([pick(k_text, kept_heads), k_vis], dim=2),
                                             torch.cat([pick(v_text, kept_heads), v_vis], dim=2), allowed, scale))
        others = torch.ones(H, dtype=torch.bool, device=q.device)
        others[kept_heads] = False
        others = others.nonzero().flatten()
        if others.numel():
            out.index_copy_(1, others, _sdpa(pick(q, others), pick(k_text, others), pick(v_text, others),
                                             allowed_text, scale))
    return text.unpadded(out.transpose(1, 2)).reshape(q_text.shape[0], -1)


def visual_attention(q_vis: torch.Tensor, k_vis: torch.Tensor, v_vis: torch.Tensor, keys_text: list[torch.Tensor],
                     keys_vis: list[torch.Tensor], vis, window, past: int, head_group_idx: torch.Tensor, scale: float,
                     per_head: Callable[[torch.Tensor], torch.Tensor], kept_group_idx: torch.Tensor | None
                     ) -> torch.Tensor:
    """Visual queries of the kept heads (Nv, Hk, D) -> (Nv, Hk, D) in their dtype. `k_vis`, `v_vis`: this
    forward's visual keys (Nv, Gk, D); `keys_vis`: the padded keys with the cache's; `window`: `WindowRows` or
    None; `kept_group_idx`: each kept head's group among the kept groups (None: one head per group)."""
    k_text, v_text, text_pos = keys_text
    k_text, v_text = k_text.index_select(1, head_group_idx), v_text.index_select(1, head_group_idx)  # (B, Hk, St, D)
    if window is None:
        q = vis.padded(q_vis).transpose(1, 2)  # (B, Hk, Mv, D)
        q_pos = vis.query_pos(past)
        allowed = torch.cat([_causal(text_pos, q_pos), _causal(keys_vis[2], q_pos)], dim=-1)
        out = _sdpa(q, torch.cat([k_text, per_head(keys_vis[0])], dim=2),
                    torch.cat([v_text, per_head(keys_vis[1])], dim=2), allowed, scale)
        return vis.unpadded(out.transpose(1, 2))
    if kept_group_idx is not None:
        k_vis, v_vis = k_vis.index_select(1, kept_group_idx), v_vis.index_select(1, kept_group_idx)
    q = q_vis.transpose(0, 1)[:, window.q_index]  # (Hk, R, C, D)
    k_win = k_vis.transpose(0, 1)[:, window.k_index]  # (Hk, R, wC, D)
    v_win = v_vis.transpose(0, 1)[:, window.k_index]
    sample = vis.sample_idx[window.q_index[:, 0]]  # (R,) each grid row's sample
    q_pos = vis.query_pos(past)[vis.sample_idx, vis.slot_idx][window.q_index]  # (R, C)
    k_row_text = k_text.transpose(0, 1)[:, sample]  # (Hk, R, St, D)
    v_row_text = v_text.transpose(0, 1)[:, sample]
    allowed = torch.cat([text_pos[sample][:, None, :] <= q_pos[:, :, None], window.pair_ok], dim=-1)  # (R, C, St+wC)
    out = _sdpa(q, torch.cat([k_row_text, k_win], dim=2), torch.cat([v_row_text, v_win], dim=2), allowed, scale)
    return out.permute(1, 2, 0, 3)[window.row_of, window.col_of]  # (Nv, Hk, D)


__all__ = ["text_attention", "visual_attention"]
