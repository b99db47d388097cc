"""The one cost model: analytic prefill FLOPs (2 per multiply-add) and visual KV-cache bytes of a
language model, dense, expected (from gate open-probabilities, differentiable) or under a plan.
Counts QKVO projections, attention matmuls (window / causal / closed heads) and the MLP; no
embeddings, norms, softmax or LM head."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .plan import Plan


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of a multimodal model's language model and its per-image visual grid."""

    name: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    image_grid: tuple[int, int]  # (rows, cols) of visual tokens per image (its first grid)
    kv_bytes_per_value: int = 2  # bf16 KV cache
    extra_grids: tuple[tuple[int, int], ...] = ()  # an image's further grids (LLaVA-NeXT: the high-res grid)
    non_grid_tokens: int = 0  # an image's image tokens that are no grid cell (LLaVA-NeXT's newlines): text

    @property
    def image_grids(self) -> tuple[tuple[int, int], ...]:
        return (tuple(self.image_grid), *self.extra_grids)

    @property
    def tokens_per_image(self) -> int:
        return sum(rows * cols for rows, cols in self.image_grids)


@dataclass(frozen=True)
class TokenLayout:
    """A prefill sequence: `system` text tokens, then `num_images` images, then `text` tokens. An image
    is `image_grid` plus `extra_grids` of visual tokens and `non_grid` image tokens that are no grid
    cell (LLaVA-NeXT's newlines), costed as text tokens after the images (they see every visual key)."""

    system: int
    num_images: int
    image_grid: tuple[int, int]
    text: int
    extra_grids: tuple[tuple[int, int], ...] = ()
    non_grid: int = 0

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """The grids of one image."""
        return (tuple(self.image_grid), *self.extra_grids)

    @property
    def visual(self) -> int:
        return self.num_images * sum(rows * cols for rows, cols in self.grids)

    @property
    def text_rows(self) -> int:
        """Every non-visual token after the system prompt: the text and the images' non-grid tokens."""
        return self.text + self.num_images * self.non_grid

    def visual_pairs(self, window: int | None) -> int:
        """Visual (query, key) pairs inside the window on each grid (None: causal pairs of all visual tokens)."""
        if window is None:
            return self.visual * (self.visual + 1) // 2
        return self.num_images * sum(window_pairs(rows, cols, window) for rows, cols in self.grids)

    def to_dict(self) -> dict[str, Any]:
        out = {"system": self.system, "visual": self.visual, "text": self.text, "num_images": self.num_images,
               "image_grid": list(self.image_grid)}
        if self.extra_grids or self.non_grid:
            out.update({"image_grids": [list(grid) for grid in self.grids], "non_grid": self.non_grid})
        return out


@dataclass
class GateProbs:
    """P(gate != 0): raw head gates (L, H), routers (L), visual MLP gates (L), and optionally the
    fraction of MLP channels visual tokens keep (L). Effective head prob is router * head."""

    head: torch.Tensor
    layer: torch.Tensor
    mlp: torch.Tensor
    mlp_channels: torch.Tensor | None = None

    @classmethod
    def dense(cls, num_layers: int, num_heads: int) -> GateProbs:
        return cls(torch.ones(num_layers, num_heads), torch.ones(num_layers), torch.ones(num_layers))

    @classmethod
    def from_plan(cls, plan: Plan, intermediate_size: int) -> GateProbs:
        head = torch.tensor(plan.head_mask(), dtype=torch.float32)
        layer = torch.tensor([not lp.skipped for lp in plan.layers], dtype=torch.float32)
        mlp = torch.tensor([lp.mlp for lp in plan.layers], dtype=torch.float32)
        channels = torch.tensor([1.0 if lp.mlp_channels is None else len(lp.mlp_channels) / intermediate_size
                                 for lp in plan.layers])
        return cls(head, layer, mlp, channels)


# Built-in configs (dims only, no weights). Grids: LLaVA-1.5 336 px / patch 14 -> 24x24;
# Qwen2-VL at 448x448 -> 32x32 patches merged 2x2 -> 16x16; InternVL one 448 px tile -> 16x16.
# internvl2-8b (InternLM2.5-7B LM) has no native transformers class (remote code only): FLOPs only;
# internvl3-8b (Qwen2.5-7B LM) is OpenGVLab/InternVL3-8B-hf, what InternVLForConditionalGeneration loads.
# LLaVA-NeXT (v1.6, Vicuna-7B) at 672x672 px: 24x24 base grid + 2x2 tiles stitched into 48x48 + 48 newlines.
BUILTIN_MODELS: dict[str, ModelDims] = {
    "llava-1.5-7b": ModelDims("llava-1.5-7b", "llava", 32, 4096, 32, 32, 128, 11008, (24, 24)),
    "llava-1.5-13b": ModelDims("llava-1.5-13b", "llava", 40, 5120, 40, 40, 128, 13824, (24, 24)),
    "qwen2-vl-7b": ModelDims("qwen2-vl-7b", "qwen2_vl", 28, 3584, 28, 4, 128, 18944, (16, 16)),
    "internvl2-8b": ModelDims("internvl2-8b", "internvl", 32, 4096, 32, 8, 128, 14336, (16, 16)),
    "internvl3-8b": ModelDims("internvl3-8b", "internvl", 28, 3584, 28, 4, 128, 18944, (16, 16)),
    "llava-next-7b": ModelDims("llava-next-7b", "llava_next", 32, 4096, 32, 32, 128, 11008, (24, 24),
                               extra_grids=((48, 48),), non_grid_tokens=48),
}
DEFAULT_SYSTEM_TOKENS = 35  # LLaVA-1.5's system prompt and "USER:" prefix
DEFAULT_TEXT_TOKENS = 60


def default_layout(dims: ModelDims, num_images: int = 1, system: int = DEFAULT_SYSTEM_TOKENS,
                   text: int = DEFAULT_TEXT_TOKENS) -> TokenLayout:
    return TokenLayout(system=system, num_images=num_images, image_grid=dims.image_grid, text=text,
                       extra_grids=dims.extra_grids, non_grid=dims.non_grid_tokens)


def window_pairs(rows: int, cols: int, window: int | None) -> int:
    """Visual (query, key) pairs of one grid inside a w x w window (both directions); None: all pairs."""
    if window is None:
        return (rows * cols) ** 2
    radius = window // 2
    along = lambda n: sum(n - abs(d) for d in range(-radius, radius + 1) if abs(d) < n)
    return along(rows) * along(cols)


def _kv_group_probs(dims: ModelDims, probs: GateProbs) -> torch.Tensor:
    """(L, Hkv) P(a KV group is needed) = r * (1 - prod over its heads of (1 - g)), gates independent."""
    L, groups = dims.num_layers, dims.num_kv_heads
    closed = (1 - probs.head.float()).reshape(L, groups, dims.num_heads // groups)
    return probs.layer.float()[:, None] * (1 - closed.prod(dim=-1))


def _check(dims: ModelDims, probs: GateProbs) -> None:
    if tuple(probs.head.shape) != (dims.num_layers, dims.num_heads):
        raise ValueError(f"head probabilities have shape {tuple(probs.head.shape)}, "
                         f"{dims.name} needs ({dims.num_layers}, {dims.num_heads})")


def visual_flops(dims: ModelDims, layout: TokenLayout, probs: GateProbs | None = None,
                 window: int | None = None) -> torch.Tensor:
    """Visual-token prefill FLOPs, the paper's unit (arXiv 2410.06169): QKVO projections, visual x
    visual attention and MLP of the visual rows. Dense: L*(8nd^2 + 4n^2d + 6ndm) with full n x n
    attention (as the paper's table counts it); with a window, the pairs inside the window."""
    probs = probs or GateProbs.dense(dims.num_layers, dims.num_heads)
    _check(dims, probs)
    pairs = layout.visual ** 2 if window is None else layout.visual_pairs(window)
    return _visual_row_flops(dims, layout.visual, probs, pairs).sum()


def _visual_row_flops(dims: ModelDims, n: int, probs: GateProbs, key_pairs: int) -> torch.Tensor:
    """(L,) FLOPs of the n visual rows: QO per open head, KV per needed group, attention over
    `key_pairs` (query, key) pairs per open head, and the kept MLP (channels)."""
    d, Dh, m = dims.hidden_size, dims.head_dim, dims.intermediate_size
    open_heads = (probs.layer.float()[:, None] * probs.head.float()).sum(dim=1)  # (L,) effective
    per_head = 2 * (2 * n * d * Dh) + 4 * key_pairs * Dh  # Q and O projections + QK^T and AV
    kv = _kv_group_probs(dims, probs).sum(dim=1) * 2 * (2 * n * d * Dh)
    channels = probs.mlp_channels.float() if probs.mlp_channels is not None else 1.0
    mlp = probs.layer.float() * probs.mlp.float() * channels * 6 * n * d * m
    return open_heads * per_head + kv + mlp


def prefill_flops(dims: ModelDims, layout: TokenLayout, probs: GateProbs | None = None,
                  window: int | None = None) -> torch.Tensor:
    """Whole-prefill FLOPs (all tokens) with the real causal structure: text rows do all their work
    (seeing visual keys only in open heads); visual rows only in open heads / kept MLPs."""
    probs = probs or GateProbs.dense(dims.num_layers, dims.num_heads)
    _check(dims, probs)
    d, Dh, m, H, Hkv = dims.hidden_size, dims.head_dim, dims.intermediate_size, dims.num_heads, dims.num_kv_heads
    s, n, t = layout.system, layout.visual, layout.text_rows
    num_text = s + t
    effective = probs.layer.float()[:, None] * probs.head.float()  # (L, H)

    text_proj = num_text * (2 * d * H * Dh * 2 + 2 * d * Hkv * Dh * 2)  # Q, O; K, V
    text_mlp = num_text * 6 * d * m
    # causal pairs: system x system, text x (system + text), text x visual (per open head)
    text_text_pairs = s * (s + 1) // 2 + t * s + t * (t + 1) // 2
    text_visual_pairs = t * n
    text_attn = 4 * Dh * (H * text_text_pairs + effective.sum(dim=1) * text_visual_pairs)

    visual_rows = _visual_row_flops(dims, n, probs, n * s + layout.visual_pairs(window))
    return (text_proj + text_mlp + text_attn + visual_rows).sum()


def visual_kv_bytes(dims: ModelDims, layout: TokenLayout, probs: GateProbs | None = None) -> torch.Tensor:
    """Bytes of visual keys and values in the KV cache: kept groups of kept layers only."""
    probs = probs or GateProbs.dense(dims.num_layers, dims.num_heads)
    _check(dims, probs)
    groups = _kv_group_probs(dims, probs).sum()
    return groups * layout.visual * 2 * dims.head_dim * dims.kv_bytes_per_value


def token_drop_visual_flops(dims: ModelDims, layout: TokenLayout, layer: int, keep: int) -> torch.Tensor:
    """Visual FLOPs of FastV-style token dropping: every visual token in layers < `layer`, only `keep`
    visual tokens (per image layout) from `layer` on; full causal attention (no window)."""
    if not 0 <= layer <= dims.num_layers:
        raise ValueError(f"layer must be in [0, {dims.num_layers}], got {layer}")
    n = layout.visual
    if not 0 <= keep <= n:
        raise ValueError(f"keep must be in [0, {n}], got {keep}")
    dense = GateProbs.dense(1, dims.num_heads)
    one = replace(dims, num_layers=1)
    full = _visual_row_flops(one, n, dense, n * n).sum()
    kept = _visual_row_flops(one, keep, dense, keep * keep).sum()
    return full * layer + kept * (dims.num_layers - layer)


def flops_report(dims: ModelDims, layout: TokenLayout, probs: GateProbs | None = None,
                 window: int | None = None) -> dict[str, float]:
    """{"visual_flops", "prefill_flops", "visual_kv_bytes"} as plain floats."""
    return {"visual_flops": float(visual_flops(dims, layout, probs, window)),
            "prefill_flops": float(prefill_flops(dims, layout, probs, window)),
            "visual_kv_bytes": float(visual_kv_bytes(dims, layout, probs))}


def dims_from_config(config: Any, name: str = "local") -> ModelDims:
    """ModelDims of a transformers multimodal config (through its family)."""
    from .families import FAMILIES

    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"config model_type {model_type!r} is not a supported family; supported: {sorted(FAMILIES)}")
    text = family.text_dims(config)
    extra_grids, non_grid = family.image_extras(config)
    return ModelDims(name=name, family=family.name, image_grid=family.image_grid(config), extra_grids=extra_grids,
                     non_grid_tokens=non_grid, **asdict(text))


def resolve_model_dims(model: str) -> ModelDims:
    """A built-in name (`llava-1.5-7b`, ...) or a local folder holding a transformers config.json."""
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]
    from pathlib import Path

    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
                         "nor a folder with a config.json")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return dims_from_config(config, name=str(folder))
