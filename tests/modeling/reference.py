"""An independent, slow reference of docs/design.md's gated semantics: eager math, layer by layer,
token by token layout, written from the contract (not from visprune.modeling)."""

from __future__ import annotations

import math

import torch
from visprune.modeling import Plan


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _token_layout(input_ids, image_token_id, grid):
    """Per token: (is_visual, (sample, image) id, row, col, medium, slice) by scanning each sample.

    `grid` is one side (every image a grid x grid square) or a list, in batch order, of per-image
    grids (rows, cols), (rows, cols, newline) or (rows, cols, newline, slice): with newline, each grid row is
    followed by one image token that is no grid cell (LLaVA-NeXT) and counts as text; `slice` is the grid's
    temporal slice in its video (0, the default, starts a new image or video)."""
    B, T = input_ids.shape
    per_image = None if isinstance(grid, int) else [tuple(g) + (False, 0)[len(g) - 2:] for g in grid]
    media = None if per_image is None else [sum(1 for g in per_image[: i + 1] if g[3] == 0) - 1
                                             for i in range(len(per_image))]
    info, image_idx = [], 0
    for b in range(B):
        count, row_info, image = 0, [], 0
        for t in range(T):
            if int(input_ids[b, t]) != image_token_id:
                row_info.append((False, None, -1, -1, None, -1))
                continue
            if per_image is None:
                image, pos = divmod(count, grid * grid)
                row_info.append((True, (b, image), pos // grid, pos % grid, (b, image), 0))
                count += 1
                continue
            rows, cols, newline, slice_ = per_image[image_idx]
            width = cols + int(newline)
            r, c = divmod(count, width)
            cell = c < cols
            row_info.append((cell, (b, image_idx) if cell else None, r if cell else -1, c if cell else -1,
                             media[image_idx] if cell else None, slice_ if cell else -1))
            count += 1
            if count == rows * width:
                count, image_idx = 0, image_idx + 1
        info.append(row_info)
    return info


def _allowed(info, valid, b, i, j, window, temporal=1):
    if not (valid[b, j] and valid[b, i]):
        return False
    vis_i, img_i, r_i, c_i, media_i, slice_i = info[b][i]
    vis_j, img_j, r_j, c_j, media_j, slice_j = info[b][j]
    if window is not None and vis_i and vis_j:
        k = window // 2
        same = img_i == img_j or (media_i == media_j and abs(slice_i - slice_j) <= temporal // 2)
        return same and abs(r_i - r_j) <= k and abs(c_i - c_j) <= k
    return j <= i


@torch.no_grad()
def reference_logits(model, batch, plan: Plan, image_token_id: int, grid: int) -> torch.Tensor:
    """Logits (B, T, V) of a LLaVA `model` (base weights, gates not attached or unwrapped) under `plan`."""
    core = model.model
    lm = core.language_model
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    embeds = lm.embed_tokens(input_ids)
    if "pixel_values" in batch:
        feats = core.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-1,
                                        vision_feature_select_strategy="default").pooler_output
        feats = torch.cat(list(feats), dim=0)
        embeds = embeds.clone()
        embeds[input_ids == image_token_id] = feats
    position_ids = torch.arange(T)[None].expand(B, T)
    cos, sin = lm.rotary_emb(embeds, position_ids)
    return _reference(model, batch, plan, image_token_id, grid, embeds, cos, sin)


@torch.no_grad()
def reference_logits_any(model, batch, plan: Plan, image_token_id: int, grids, layout_ids=None) -> torch.Tensor:
    """Like `reference_logits` for any family: the embeddings (image features merged) and the rotary
    tables are what the base model hands its first decoder layer (so M-RoPE positions are the model's
    own); the gated semantics are computed here. `grids`: per-image grids in batch order. `layout_ids`: the
    token ids the layout is read from, when they differ from the model's (a video's tokens as image tokens,
    one grid per temporal slice)."""
    lm = model.model.language_model
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["rotary"] = kwargs["position_embeddings"]

    handle = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    cos, sin = seen["rotary"]
    B, T = batch["input_ids"].shape
    layout_batch = batch if layout_ids is None else {**batch, "input_ids": layout_ids}
    return _reference(model, layout_batch, plan, image_token_id, grids, seen["embeds"], cos.expand(B, T, -1),
                      sin.expand(B, T, -1))


def _reference(model, batch, plan, image_token_id, grid, embeds, cos, sin):
    lm = model.model.language_model
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    valid = batch["attention_mask"].bool()
    info = _token_layout(input_ids, image_token_id, grid)
    is_vis = torch.tensor([[info[b][t][0] for t in range(T)] for b in range(B)])
    masks = {}  # window -> (B, T, T) allowed pairs

    def allowed_for(window):
        if window not in masks:
            masks[window] = torch.tensor([[[_allowed(info, valid, b, i, j, window, plan.temporal_window)
                                            for j in range(T)] for i in range(T)]
                                          for b in range(B)])
        return masks[window]

    cfg = lm.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    Dh = cfg.hidden_size // H
    h = embeds
    for l, layer in enumerate(lm.layers):
        attn = getattr(layer.self_attn, "attn", layer.self_attn)
        mlp = getattr(layer.mlp, "mlp", layer.mlp)
        lp = plan.layers[l]
        allowed = allowed_for(plan.window if lp.window is None else lp.window)  # a layer's own window, else the plan's
        r = 0.0 if lp.skipped else 1.0
        e = torch.tensor([1.0 if hh in lp.heads else 0.0 for hh in range(H)])
        u = 1.0 if lp.mlp else 0.0
        a = 0.0 if lp.frozen else 1.0  # rule 7: a frozen layer does not update visual rows

        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        out = torch.zeros(B, T, H, Dh)
        for b in range(B):
            for hh in range(H):
                kv_h = hh // (H // Hkv)
                for i in range(T):
                    scores = []
                    for j in range(T):
                        if not allowed[b, i, j]:
                            scores.append(-math.inf)
                            continue
                        s = float(q[b, hh, i] @ k[b, kv_h, j]) / math.sqrt(Dh)
                        if is_vis[b, j]:  # key side: + log e, log 0 = -inf
                            s += math.log(e[hh]) if e[hh] > 0 else -math.inf
                        scores.append(s)
                    scores = torch.tensor(scores, dtype=torch.float64)
                    if torch.isinf(scores).all():
                        continue  # rule 6: no key -> zeros
                    p = torch.softmax(scores, dim=0).float()
                    row = p @ v[b, kv_h]
                    if is_vis[b, i]:  # query side
                        row = row * e[hh] * a
                    out[b, i, hh] = row
        flat = out.reshape(B, T, H * Dh)
        o = flat @ attn.o_proj.weight.T
        if attn.o_proj.bias is not None:
            o = o + torch.where(is_vis[..., None], r * a * attn.o_proj.bias, attn.o_proj.bias)
        h = h + o

        x = layer.post_attention_layernorm(h)
        hidden = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        text_out = mlp.down_proj(hidden)
        if lp.mlp_channels is not None:
            keep = torch.zeros(hidden.shape[-1])
            keep[list(lp.mlp_channels)] = 1.0
            hidden = hidden * keep
        vis_out = u * mlp.down_proj(hidden)
        h = h + torch.where(is_vis[..., None], vis_out, text_out)
    h = lm.norm(h)
    return model.lm_head(h)
