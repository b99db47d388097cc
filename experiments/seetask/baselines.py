"""The baselines the see-task demo compares against, all costed by the same FLOPs model:

- VTW (visual tokens withdrawn after layer K): a plan, every visual computation in layers < K,
  none after; the largest K within the budget.
- YOPO heuristic (arXiv 2410.06169): heads ranked by how much of their visual queries' attention
  goes to visual keys on calibration samples, a layer cut, the half of the MLP channels most active
  on visual tokens, a neighbour window; the plan closest to the budget from below.
- Random plan: random gate scores hardened by the same `GateSet.to_plan`.
- FastV: training-free inference mode; after layer K the visual tokens the last prompt token
  attends to least (in layer K-1) are dropped from every later layer's keys.
- ShortV (arXiv 2504.00502): training-free; each layer's Layer Contribution (how far the answer's
  next-token distributions move when that layer alone freezes the visual tokens) on calibration
  samples, then the layers of least contribution frozen (docs/design.md rule 7) until the budget
  holds; where freezing every layer is not enough, the least contributing frozen layers are skipped.

The plan baselines are then fine-tuned with the plan fixed (recipe `plan:`), as visprune's own
LoRA budget; FastV and ShortV are used as is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from visprune.modeling import (
    GateConfig,
    GateSet,
    LayerPlan,
    ModelDims,
    Plan,
    TokenLayout,
    apply_plan,
    visual_flops,
)
from visprune.modeling.families import family_for
from visprune.modeling.flops import plan_visual_ratio, token_drop_visual_flops


def vtw_plan(dims: ModelDims, layout: TokenLayout, budget: float, fill: bool = False) -> tuple[Plan, int, int]:
    """Visual tokens take part in layers < K only (full attention, MLP); the largest K within budget. With
    `fill`, layer K also keeps its first heads (attention only) while the plan stays within budget, so the
    plan uses its budget. Returns the plan, K and the number of heads kept in layer K."""
    L, H = dims.num_layers, dims.num_heads

    def plan_of(k: int, extra: int) -> Plan:
        layers = tuple(LayerPlan(heads=tuple(range(H)) if i < k else tuple(range(extra)) if i == k else (),
                                 mlp=i < k) for i in range(L))
        return Plan(dims.family, None, L, H, layers)

    def fits(plan: Plan) -> bool:
        return plan_visual_ratio(dims, layout, plan) <= budget + 1e-9

    best = max(k for k in range(L + 1) if k == 0 or fits(plan_of(k, 0)))
    extra = 0
    if fill and best < L:
        extra = max(h for h in range(H + 1) if h == 0 or fits(plan_of(best, h)))
    return plan_of(best, extra), best, extra


def random_plan(dims: ModelDims, layout: TokenLayout, budget: float, window: int | None, seed: int = 0,
                fill: bool = True) -> Plan:
    """Random gate scores (seeded) hardened by `GateSet.to_plan` at the budget (by default with the fill
    rule, so the plan uses its budget)."""
    gen = torch.Generator().manual_seed(seed)
    gates = GateSet(dims.text_dims(), GateConfig(window=window), dims.family, dims.image_grid)
    with torch.no_grad():
        for gate in (gates.head, gates.router, gates.mlp):
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=gen))
    return gates.to_plan(budget, layout, fill=fill)


@dataclass
class Calibration:
    """Per (layer, head): share of visual queries' attention on visual keys; per layer: mean |activation|
    of each MLP channel on visual tokens."""

    head_visual_share: torch.Tensor  # (L, H)
    mlp_activity: torch.Tensor  # (L, I)


def calibrate(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Calibration:
    """Run the (dense, plain) model with eager attention on calibration batches."""
    family = family_for(model)
    layers = family.decoder_layers(model)
    image_id = model.config.image_token_id
    L = len(layers)
    dims = family.text_dims(model.config)
    share = torch.zeros(L, dims.num_heads)
    activity = torch.zeros(L, dims.intermediate_size)
    count = 0
    current: dict[str, Any] = {}

    def mlp_hook(layer_idx):
        def hook(module, args):
            vis = current["visual"]
            activity[layer_idx] += args[0][vis].abs().float().sum(dim=0).cpu()
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)) for i, layer in enumerate(layers)]
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager", "vision_config": model.config.vision_config._attn_implementation})
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v for k, v in batch.items() if k != "labels"}
                visual = batch["input_ids"] == image_id
                current["visual"] = visual
                out = model(**batch, output_attentions=True)
                for layer_idx, weights in enumerate(out.attentions):  # (B, H, T, T)
                    w = weights.float()
                    on_visual = (w * visual[:, None, None, :]).sum(-1)  # (B, H, T)
                    share[layer_idx] += (on_visual * visual[:, None, :]).sum(dim=(0, 2)).cpu()
                count += int(visual.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation({"text_config": previous,
                                       "vision_config": model.config.vision_config._attn_implementation})
    return Calibration(share / max(1, count), activity / max(1, count))


def yopo_plan(dims: ModelDims, layout: TokenLayout, budget: float, calib: Calibration, window: int | None = 5) -> Plan:
    """YOPO-style plan: layer cut K, heads by visual-attention share (within layers < K), half the MLP
    channels (most active on visual tokens) in every kept layer; the plan closest to the budget."""
    L, H, I = dims.num_layers, dims.num_heads, dims.intermediate_size
    half = I // 2
    channels = [tuple(sorted(calib.mlp_activity[i].topk(half).indices.tolist())) for i in range(L)]
    order = sorted(((float(calib.head_visual_share[i, h]), i, h) for i in range(L) for h in range(H)), reverse=True)
    best, best_ratio = None, -1.0
    for cut in range(1, L + 1):
        kept: dict[int, list[int]] = {}
        plan = None
        for _, layer_idx, head in order:
            if layer_idx >= cut:
                continue
            trial = {k: list(v) for k, v in kept.items()}
            trial.setdefault(layer_idx, []).append(head)
            candidate = _yopo_layers(trial, channels, L, H, window, dims.family)
            if plan_visual_ratio(dims, layout, candidate) > budget + 1e-9:
                break
            kept, plan = trial, candidate
        if plan is not None:
            ratio = plan_visual_ratio(dims, layout, plan)
            if ratio > best_ratio:
                best, best_ratio = plan, ratio
    if best is None:
        return Plan(dims.family, window, L, H, tuple(LayerPlan(heads=(), mlp=False) for _ in range(L)))
    return best


def _yopo_layers(kept: dict[int, list[int]], channels, L: int, H: int, window, family: str) -> Plan:
    layers = []
    for i in range(L):
        heads = tuple(sorted(kept.get(i, [])))
        layers.append(LayerPlan(heads=heads, mlp=bool(heads), mlp_channels=channels[i] if heads else None))
    return Plan(family, window, L, H, tuple(layers))


# ---- FastV ------------------------------------------------------------------------------------------
@dataclass
class FastVSettings:
    layer: int  # K: tokens are ranked with layer K-1's attention and dropped from layer K on
    keep: int  # visual tokens kept per image
    ratio: float  # visual FLOPs / dense


def fastv_settings(dims: ModelDims, layout: TokenLayout, budget: float) -> FastVSettings | None:
    """K = 1 (the FastV paper's K=2 of 32 layers, scaled down) and the most visual tokens kept within
    the budget; None when even dropping every token after layer K exceeds it."""
    dense = float(visual_flops(dims, layout))
    layer = max(1, round(2 * dims.num_layers / 32))
    best = None
    for keep in range(layout.visual + 1):
        ratio = float(token_drop_visual_flops(dims, layout, layer, keep)) / dense
        if ratio <= budget + 1e-9:
            best = FastVSettings(layer, keep, ratio)
    return best


@dataclass
class _FastVState:
    last: torch.Tensor  # (B,) position of the last prompt token
    keep_keys: torch.Tensor | None = None  # (B, T) bool
    extra: dict = field(default_factory=dict)


FASTV_KWARG = "fastv_last"


class FastVLayer(nn.Module):
    """Wraps a decoder layer for FastV (the original stays a child)."""

    def __init__(self, layer: nn.Module, layer_idx: int, settings: FastVSettings, rotary_fn):
        super().__init__()
        self.layer, self.layer_idx, self.settings = layer, layer_idx, settings
        self._rotary = rotary_fn
        self.state: _FastVState | None = None  # shared by all wrappers of one model, set per forward

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        state = self.state
        if state is None:
            return self.layer(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                              **kwargs)
        if self.layer_idx == self.settings.layer - 1:
            state.keep_keys = self._rank(hidden_states, position_embeddings, state)
        if self.layer_idx >= self.settings.layer and state.keep_keys is not None:
            T = state.keep_keys.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=hidden_states.device).tril()
            mask = causal[None, None] & state.keep_keys[:, None, None, :]
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                mask = mask & attention_mask[..., -T:, -T:]
            elif attention_mask is not None:
                mask = mask & (attention_mask[..., -T:, -T:] == 0)
            mask = mask | torch.eye(T, dtype=torch.bool, device=mask.device)[None, None]  # every row has a key
            attention_mask = mask
        return self.layer(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                          **kwargs)

    def _rank(self, hidden_states, position_embeddings, state: _FastVState) -> torch.Tensor:
        attn = self.layer.self_attn
        B, T, _ = hidden_states.shape
        H, Hkv = attn.config.num_attention_heads, attn.config.num_key_value_heads
        D = attn.head_dim
        x = self.layer.input_layernorm(hidden_states)
        q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)
        k = k.repeat_interleave(H // Hkv, dim=1)
        rows = torch.arange(B, device=q.device)
        q_last = q[rows, :, state.last]  # (B, H, D)
        scores = torch.einsum("bhd,bhtd->bht", q_last.float(), k.float()) * attn.scaling
        positions = torch.arange(T, device=q.device)
        scores = scores.masked_fill(positions[None, None, :] > state.last[:, None, None], float("-inf"))
        importance = scores.softmax(dim=-1).mean(dim=1)  # (B, T)
        visual = state.extra["visual"]
        keep = ~visual
        for b in range(B):
            vis_pos = visual[b].nonzero().squeeze(1)
            if vis_pos.numel() == 0:
                continue
            n_keep = min(vis_pos.numel(), self.settings.keep * max(1, vis_pos.numel() // state.extra["per_image"]))
            if n_keep:
                top = importance[b, vis_pos].topk(n_keep).indices
                keep[b, vis_pos[top]] = True
        return keep


def attach_fastv(model: nn.Module, settings: FastVSettings) -> None:
    """Wrap the decoder layers of a plain (not gated, not hardened) model for FastV."""
    import sys

    family = family_for(model)
    layers = family.decoder_layers(model)
    rotary = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
    wrappers = [FastVLayer(layer, i, settings, rotary) for i, layer in enumerate(layers)]
    for i, wrapper in enumerate(wrappers):
        layers[i] = wrapper
    per_image = model.config.image_seq_length if hasattr(model.config, "image_seq_length") else 1

    def pre_hook(module, args, kwargs):
        last = kwargs.pop(FASTV_KWARG, None)
        state = None
        if last is not None:
            state = _FastVState(last=last, extra={"visual": kwargs["input_ids"] == model.config.image_token_id,
                                                  "per_image": per_image})
        for wrapper in wrappers:
            wrapper.state = state
        return args, kwargs

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)


def fastv_batch_kwargs(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The last prompt token of each sample: the position before its first supervised label."""
    supervised = labels != -100
    first = torch.where(supervised.any(dim=1), supervised.float().argmax(dim=1),
                        torch.full((labels.shape[0],), labels.shape[1], device=labels.device))
    return {FASTV_KWARG: (first - 1).clamp_min(0)}


__all__ = ["Calibration", "FastVSettings", "attach_fastv", "calibrate", "fastv_batch_kwargs", "fastv_settings",
           "random_plan", "vtw_plan", "yopo_plan"]


# ---- ShortV ------------------------------------------------------------------------------------------
def layer_contributions(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(L,) ShortV's Layer Contribution of every decoder layer: the mean KL divergence, over the answer tokens
    (labels != -100) of `batches`, from the dense model's next-token distribution to the one of the model whose
    visual tokens are frozen in that layer alone (every head's K/V still read by text; ordinary attention).
    `model` is left as it was (a copy gets the gated plans)."""
    family = family_for(model)
    dims = family.text_dims(model.config)
    L, H = dims.num_layers, dims.num_heads
    gated = copy.deepcopy(model).eval()
    scores = torch.zeros(L)
    with torch.no_grad():
        dense_logp = []
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            dense_logp.append(torch.log_softmax(model(**inputs).logits.float(), dim=-1))
        for layer_idx in range(L):
            layers = tuple(LayerPlan(heads=tuple(range(H)), mlp=False, frozen=True) if i == layer_idx
                           else LayerPlan(heads=tuple(range(H)), mlp=True) for i in range(L))
            apply_plan(gated, Plan(family.name, None, L, H, layers))
            total, count = 0.0, 0
            for batch, logp in zip(batches, dense_logp, strict=True):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                frozen_logp = torch.log_softmax(gated(**inputs).logits.float(), dim=-1)
                answer = batch["labels"][:, 1:] != -100  # position t predicts label t + 1
                kl = (logp.exp() * (logp - frozen_logp)).sum(-1)[:, :-1][answer]
                total += float(kl.sum())
                count += int(answer.sum())
            scores[layer_idx] = total / max(1, count)
    return scores


def shortv_plan(dims: ModelDims, layout: TokenLayout, budget: float, contributions: torch.Tensor
                ) -> tuple[Plan, int, int]:
    """ShortV's choice at `budget`: layers frozen in order of least Layer Contribution until the plan's visual
    FLOPs (ordinary attention, no window) are within the budget; if freezing every layer is not enough, frozen
    layers are then skipped in the same order. Returns (plan, layers frozen, layers skipped)."""
    L, H = dims.num_layers, dims.num_heads
    order = sorted(range(L), key=lambda i: (float(contributions[i]), i))
    kept = LayerPlan(heads=tuple(range(H)), mlp=True)
    frozen = LayerPlan(heads=tuple(range(H)), mlp=False, frozen=True)
    skipped = LayerPlan(heads=(), mlp=False)

    def plan_of(num_frozen: int, num_skipped: int) -> Plan:
        state = {i: kept for i in range(L)}
        for rank, i in enumerate(order[:num_frozen]):
            state[i] = skipped if rank < num_skipped else frozen
        return Plan(dims.family, None, L, H, tuple(state[i] for i in range(L)))

    for num_frozen in range(L + 1):
        plan = plan_of(num_frozen, 0)
        if plan_visual_ratio(dims, layout, plan) <= budget + 1e-9:
            return plan, num_frozen, 0
    for num_skipped in range(1, L):
        plan = plan_of(L, num_skipped)
        if plan_visual_ratio(dims, layout, plan) <= budget + 1e-9:
            return plan, L - num_skipped, num_skipped
    return plan_of(L, L), 0, L  # every layer skipped: no visual FLOPs
