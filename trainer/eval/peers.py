"""Token-dropping peers for `visprune bench --compare`: the stock (dense) model with visual tokens really removed,
run on the same weights and prompt as the dense and hardened models.

- `vtw` (visual token withdrawal): every visual token leaves after layer K; K is chosen so that the visual FLOPs
  match the hardened plan's as closely as possible.
- `fastv`: after layer K (the paper's K = 2 of 32, scaled to the benchmarked depth, at least 1) only the visual
  tokens the last token attends to most (its layer-(K-1) attention averaged over heads) stay; how many is chosen
  so that the visual FLOPs match the plan's. The score costs one more key projection at layer K-1, timed.

Both keep the original position ids of the tokens that stay (RoPE), use the stock SDPA attention and fill a KV
cache, as the dense prefill does. Costed by `token_drop_visual_flops` (full causal attention among kept tokens).
LLaMA-style language models (LLaVA-1.5, LLaVA-NeXT); Qwen2-VL's M-RoPE positions are not rebuilt here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from visprune.modeling.families import family_for
from visprune.modeling.flops import token_drop_visual_flops, visual_flops

PEERS = ("vtw", "fastv")
FASTV_LAYER_OF_32 = 2


@dataclass
class PeerRun:
    name: str
    layer: int  # tokens are dropped before this layer
    keep: int  # visual tokens kept from `layer` on
    visual_flops_ratio: float
    run: Callable[[], Any]


def _ratio(setup, layer: int, keep: int) -> float:
    dense = float(visual_flops(setup.dims, setup.layout))
    return float(token_drop_visual_flops(setup.dims, setup.layout, layer, keep)) / dense


def _closest(setup, target: float, candidates: list[tuple[int, int]]) -> tuple[int, int]:
    return min(candidates, key=lambda lk: (abs(_ratio(setup, *lk) - target), -lk[1]))


def build_peer(setup, name: str, target: float) -> PeerRun:
    """The peer `name` at the visual-FLOPs ratio closest to `target` on `setup` (a `BenchSetup`)."""
    if setup.dims.family not in ("llava", "llava_next"):
        raise ValueError(f"--compare covers LLaMA-style families (llava, llava_next), not {setup.dims.family!r}")
    layers = setup.dims.num_layers
    visual = setup.layout.visual
    if name == "vtw":
        layer, keep = _closest(setup, target, [(k, 0) for k in range(1, layers + 1)])
    elif name == "fastv":
        layer = min(layers, max(1, round(FASTV_LAYER_OF_32 * layers / 32)))
        layer, keep = _closest(setup, target, [(layer, keep) for keep in range(visual + 1)])
    else:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    return PeerRun(name, layer, keep, _ratio(setup, layer, keep),
                   lambda: token_drop_prefill(setup.dense, setup.inputs["input_ids"], setup.config.image_token_id,
                                              layer, keep))


def _last_token_attention(layer_module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(B, T) attention of the last token at this layer, averaged over heads (FastV's score)."""
    attn = layer_module.self_attn
    x = layer_module.input_layernorm(hidden)
    B, T, _ = x.shape
    head_dim = attn.head_dim
    q = attn.q_proj(x[:, -1:]).view(B, 1, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, H, 1, T)
    return scores.softmax(dim=-1).mean(dim=1)[:, 0]


@torch.no_grad()
def token_drop_prefill(model, input_ids: torch.Tensor, image_token_id: int, layer: int, keep: int) -> Any:
    """Prefill the stock `model`'s language model on `input_ids` (image tokens embedded as tokens, as the dense
    benchmark run does), keeping only `keep` visual tokens from decoder layer `layer` on (chosen by the last
    token's attention at layer `layer - 1` when 0 < keep < all). Returns (hidden states, KV cache)."""
    lm = family_for(model).language_model(model)
    hidden = lm.embed_tokens(input_ids)
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    cache = DynamicCache(config=lm.config)
    position_embeddings = lm.rotary_emb(hidden, position_ids=positions)
    visual = input_ids == image_token_id
    ranked = 0 < keep < int(visual[0].sum())
    score = None
    for idx, decoder_layer in enumerate(lm.layers):
        if ranked and idx == layer - 1:  # FastV: the attention the last token pays in the last full layer
            score = _last_token_attention(decoder_layer, hidden, position_embeddings)
        if idx == layer:
            if ranked:
                chosen = score.masked_fill(~visual, float("-inf")).topk(keep, dim=-1).indices
                stay = ~visual
                stay[torch.arange(B)[:, None], chosen] = True
            else:
                stay = ~visual if keep == 0 else torch.ones_like(visual)
            index = stay[0].nonzero().flatten()  # one prompt layout per batch row
            hidden, positions = hidden[:, index], positions[:, index]
            position_embeddings = lm.rotary_emb(hidden, position_ids=positions)
        hidden = decoder_layer(hidden, attention_mask=None, position_embeddings=position_embeddings,
                               position_ids=positions, past_key_values=cache, use_cache=True)
    return lm.norm(hidden), cache


__all__ = ["PEERS", "PeerRun", "build_peer", "token_drop_prefill"]
