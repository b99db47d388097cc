"""The one cost model: analytic prefill FLOPs (2 per multiply-add) and visual KV-cache bytes of a
language model, dense, expected (from gate open-probabilities, differentiable) or under a plan.
Counts QKVO projections, attention matmuls (window / causal / closed heads) and the MLP; no
embeddings, norms, softmax or LM head."""

from __future__ import annotations

import copy
import functools
import logging
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .plan import Plan, read_json_file, show_value

logger = logging.getLogger(__name__)
Windows = int | None | tuple[int | None, ...]  # one neighbour window for every layer, or one per layer


@dataclass(frozen=True)
class TextDims:
    """Language-model dimensions the gates and the FLOPs model need."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


@dataclass(frozen=True, kw_only=True)
class ModelDims(TextDims):
    """Dimensions of a multimodal model: its language model's (`TextDims`, which a ModelDims is) and its
    per-image visual grid."""

    name: str
    family: str
    image_grid: tuple[int, int]  # (rows, cols) of visual tokens per image (its first grid)
    kv_bytes_per_value: int = 2  # bf16 KV cache
    extra_grids: tuple[tuple[int, int], ...] = ()  # an image's further grids (LLaVA-NeXT: the high-res grid)
    non_grid_tokens: int = 0  # an image's image tokens that are no grid cell (LLaVA-NeXT's newlines): text

    @property
    def image_grids(self) -> tuple[tuple[int, int], ...]:
        return (tuple(self.image_grid), *self.extra_grids)

    def text_dims(self) -> TextDims:
        """Only the language model's dimensions (what a GateSet is built with)."""
        return TextDims(**{f.name: getattr(self, f.name) for f in fields(TextDims)})

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
    # the temporal slice of each grid of `grids` in its video (0 starts a video); (): every grid is its own
    slices: tuple[int, ...] = ()

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

    @functools.lru_cache(maxsize=256)  # noqa: B019 (a frozen, hashable layout; the FLOPs constraint asks every step)
    def visual_pairs(self, window: int | None, temporal: int = 1) -> int:
        """Visual (query, key) pairs inside the window on each grid (None: causal pairs of all visual tokens); with
        a temporal window t, a video's slices also pair with those of its slices at most t//2 away."""
        if window is None:
            return self.visual * (self.visual + 1) // 2
        per_grid = [window_pairs(rows, cols, window) for rows, cols in self.grids]
        slices = self.slices or (0,) * len(per_grid)
        if len(slices) != len(per_grid):
            raise ValueError(f"{len(slices)} slice indices for {len(per_grid)} grids")
        total, video = 0, []  # the grids of the current video
        for grid_pairs, index in zip([*per_grid, 0], [*slices, 0]):  # a trailing 0 closes the last video
            if index == 0 and video:  # a video's slices are one grid size: its pairs x the slice pairs
                count = len(video)
                total += video[0] * (count + 2 * sum(count - d for d in range(1, min(temporal // 2, count - 1) + 1)))
                video = []
            video.append(grid_pairs)
        return self.num_images * total

    def layer_pairs(self, window: Windows, num_layers: int, full: bool = False, temporal: int = 1) -> torch.Tensor | int:
        """`visual_pairs` of one window for every layer, or (L,) pairs of per-layer windows (a sequence); with
        `full`, a window of None counts all n x n pairs (the paper's dense unit) instead of the causal ones."""
        def pairs(w: int | None) -> int:
            return self.visual ** 2 if full and w is None else self.visual_pairs(w, temporal)

        if window is None or isinstance(window, int):
            return pairs(window)
        if len(window) != num_layers:
            raise ValueError(f"{len(window)} per-layer windows for {num_layers} layers")
        return torch.tensor([float(pairs(w)) for w in window])

    def ring_pairs(self, radius: int, temporal: int = 1) -> torch.Tensor:
        """(radius + 1,) visual (query, key) pairs at Chebyshev distance exactly k on the same grid (or, with a
        temporal window, on a video's slices within it), k = 0..radius (k = 0: each token with itself and the
        tokens at its place on neighbouring slices), summed over the images."""
        inside = [self.visual_pairs(2 * k + 1, temporal) for k in range(radius + 1)]
        return torch.tensor([float(inside[0])] + [float(inside[k] - inside[k - 1]) for k in range(1, radius + 1)])

    def expected_ring_pairs(self, rings: torch.Tensor, temporal: int = 1) -> torch.Tensor:
        """(L,) expected visual pairs of learned window radii: every token with itself, plus ring k's pairs times
        P(rings 1..k all open) (`rings`: (L, R) P(open) of the ring gates, nested)."""
        ring = self.ring_pairs(rings.shape[1], temporal).to(rings.device)
        return ring[0] + (torch.cumprod(rings.float(), dim=1) * ring[1:]).sum(dim=1)

    def to_dict(self) -> dict[str, Any]:
        out = {"system": self.system, "visual": self.visual, "text": self.text, "num_images": self.num_images,
               "image_grid": list(self.image_grid)}
        if self.extra_grids or self.non_grid:
            out.update({"image_grids": [list(grid) for grid in self.grids], "non_grid": self.non_grid})
        if self.slices:
            out["slices"] = list(self.slices)
        return out


@dataclass(frozen=True)
class ImageGrids:
    """One image as its family's processor lays it out: its grids of visual tokens (first grid first;
    InternVL: one per tile, LLaVA-NeXT: base then high-resolution), its image tokens that are no grid
    cell (LLaVA-NeXT's newlines) and a one-line `note` saying how the processor got there."""

    grids: tuple[tuple[int, int], ...]
    non_grid: int = 0
    note: str = ""
    slices: tuple[int, ...] = ()  # a video: the temporal slice of each grid (`TokenLayout.slices`)

    def __post_init__(self) -> None:
        if not self.grids or any(rows < 1 or cols < 1 for rows, cols in self.grids):
            raise ValueError(f"an image needs at least one non-empty grid, got {list(self.grids)}")
        if self.slices and len(self.slices) != len(self.grids):
            raise ValueError(f"{len(self.slices)} slice indices for {len(self.grids)} grids")

    @property
    def visual_tokens(self) -> int:
        return sum(rows * cols for rows, cols in self.grids)

    def to_dict(self) -> dict[str, Any]:
        return {"grids": [list(grid) for grid in self.grids], "non_grid": self.non_grid,
                "visual_tokens": self.visual_tokens, "note": self.note}


@dataclass
class GateProbs:
    """P(gate != 0): raw head gates (L, H), routers (L), visual MLP gates (L), and optionally the
    fraction of MLP channels visual tokens keep (L) and the freeze gates (L, P(visual rows updated); None:
    always). Effective head prob is router * head on the key side (K/V, what text reads) and router *
    update * head on the query side (Q, attention, O of visual rows); the MLP's is router * update * mlp."""

    head: torch.Tensor
    layer: torch.Tensor
    mlp: torch.Tensor
    mlp_channels: torch.Tensor | None = None
    update: torch.Tensor | None = None
    rings: torch.Tensor | None = None  # (L, R) P(ring gate k+1 open) of learned window radii; None: fixed windows

    def rows_updated(self) -> torch.Tensor:
        """(L,) P(the layer computes and updates visual rows) = router * update."""
        layer = self.layer.float()
        return layer if self.update is None else layer * self.update.float()

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
        update = (torch.tensor([not lp.frozen for lp in plan.layers], dtype=torch.float32)
                  if any(lp.frozen for lp in plan.layers) else None)
        return cls(head, layer, mlp, channels, update)


# Built-in configs (dims only, no weights). Grids: LLaVA-1.5 336 px / patch 14 -> 24x24;
# Qwen2-VL at 448x448 -> 32x32 patches merged 2x2 -> 16x16; InternVL one 448 px tile -> 16x16.
# internvl2-8b (InternLM2.5-7B LM) has no native transformers class (remote code only): FLOPs only;
# internvl3-8b (Qwen2.5-7B LM) is OpenGVLab/InternVL3-8B-hf, what InternVLForConditionalGeneration loads.
# LLaVA-NeXT (v1.6, Vicuna-7B) at 672x672 px: 24x24 base grid + 2x2 tiles stitched into 48x48 + 48 newlines.
def _builtin(name: str, family: str, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, mlp: int,
             grid: tuple[int, int], **extra: Any) -> ModelDims:
    return ModelDims(name=name, family=family, num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=mlp, image_grid=grid, **extra)


BUILTIN_MODELS: dict[str, ModelDims] = {
    "llava-1.5-7b": _builtin("llava-1.5-7b", "llava", 32, 4096, 32, 32, 128, 11008, (24, 24)),
    "llava-1.5-13b": _builtin("llava-1.5-13b", "llava", 40, 5120, 40, 40, 128, 13824, (24, 24)),
    "qwen2-vl-7b": _builtin("qwen2-vl-7b", "qwen2_vl", 28, 3584, 28, 4, 128, 18944, (16, 16)),
    "internvl2-8b": _builtin("internvl2-8b", "internvl", 32, 4096, 32, 8, 128, 14336, (16, 16)),
    "internvl3-8b": _builtin("internvl3-8b", "internvl", 28, 3584, 28, 4, 128, 18944, (16, 16)),
    "llava-next-7b": _builtin("llava-next-7b", "llava_next", 32, 4096, 32, 32, 128, 11008, (24, 24),
                              extra_grids=((48, 48),), non_grid_tokens=48),
}
DEFAULT_SYSTEM_TOKENS = 35  # LLaVA-1.5's system prompt and "USER:" prefix
DEFAULT_TEXT_TOKENS = 60


def default_layout(dims: ModelDims, num_images: int = 1, system: int = DEFAULT_SYSTEM_TOKENS,
                   text: int = DEFAULT_TEXT_TOKENS, image: ImageGrids | None = None) -> TokenLayout:
    """`num_images` images between `system` and `text` tokens: each the model's reference image, or
    `image` (e.g. `image_size_grids` of a real image size)."""
    if image is not None:
        first, *rest = image.grids
        return TokenLayout(system=system, num_images=num_images, image_grid=first, text=text,
                           extra_grids=tuple(rest), non_grid=image.non_grid, slices=image.slices)
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
                 window: Windows = None, temporal: int = 1) -> torch.Tensor:
    """Visual-token prefill FLOPs, the paper's unit (arXiv 2410.06169): QKVO projections, visual x
    visual attention and MLP of the visual rows. Dense: L*(8nd^2 + 4n^2d + 6ndm) with full n x n
    attention (as the paper's table counts it); with a window, the pairs inside the window (`window`:
    one for every layer, or a sequence of per-layer windows, `Plan.windows()`; `temporal`: the temporal window
    of a video's slices, `Plan.temporal_window`)."""
    probs = probs or GateProbs.dense(dims.num_layers, dims.num_heads)
    _check(dims, probs)
    return _visual_row_flops(dims, layout.visual, probs, _pairs(dims, layout, probs, window, True, temporal)).sum()


def _pairs(dims: ModelDims, layout: TokenLayout, probs: GateProbs, window: Windows, full: bool,
           temporal: int) -> torch.Tensor | int:
    """Visual (query, key) pairs per layer: the expected ones of learned ring gates, else those inside the
    window(s) (`TokenLayout.layer_pairs`; `full`: all n x n pairs without a window, else the causal ones)."""
    if probs.rings is not None:
        return layout.expected_ring_pairs(probs.rings, temporal)
    return layout.layer_pairs(window, dims.num_layers, full=full, temporal=temporal)


def _visual_row_flops(dims: ModelDims, n: int, probs: GateProbs, key_pairs: int) -> torch.Tensor:
    """(L,) FLOPs of the n visual rows: QO per open head, KV per needed group, attention over
    `key_pairs` (query, key) pairs per open head, and the kept MLP (channels). A frozen layer (update gate
    closed) costs only the K/V of its needed groups (docs/design.md rule 7)."""
    d, Dh, m = dims.hidden_size, dims.head_dim, dims.intermediate_size
    updated = probs.rows_updated()  # (L,) router * update
    open_heads = (updated[:, None] * probs.head.float()).sum(dim=1)  # (L,) effective, query side
    per_head = 2 * (2 * n * d * Dh) + 4 * key_pairs * Dh  # Q and O projections + QK^T and AV
    kv = _kv_group_probs(dims, probs).sum(dim=1) * 2 * (2 * n * d * Dh)
    channels = probs.mlp_channels.float() if probs.mlp_channels is not None else 1.0
    mlp = updated * probs.mlp.float() * channels * 6 * n * d * m
    return open_heads * per_head + kv + mlp


def prefill_flops(dims: ModelDims, layout: TokenLayout, probs: GateProbs | None = None,
                  window: Windows = None, temporal: int = 1) -> torch.Tensor:
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

    visual_rows = _visual_row_flops(dims, n, probs, n * s + _pairs(dims, layout, probs, window, False, temporal))
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
                 window: Windows = None, temporal: int = 1) -> dict[str, float]:
    """{"visual_flops", "prefill_flops", "visual_kv_bytes"} as plain floats."""
    return {"visual_flops": float(visual_flops(dims, layout, probs, window, temporal)),
            "prefill_flops": float(prefill_flops(dims, layout, probs, window, temporal)),
            "visual_kv_bytes": float(visual_kv_bytes(dims, layout, probs))}


def plan_report(dims: ModelDims, layout: TokenLayout, plan: Plan | None = None) -> dict[str, Any]:
    """What `plan` costs beside the dense model on `layout`.

    Returns:
        {"dense": `flops_report` of the dense model, "plan": `flops_report` under the plan (the dense
        one when `plan` is None), "visual_flops_ratio" and "prefill_flops_ratio": plan / dense, None
        where the dense figure is 0 (a layout without tokens of that kind)}.
    """
    dense = flops_report(dims, layout)
    planned = dict(dense) if plan is None else flops_report(
        dims, layout, GateProbs.from_plan(plan, dims.intermediate_size), plan.windows(), plan.temporal_window)
    ratio = lambda key: planned[key] / dense[key] if dense[key] else None
    return {"dense": dense, "plan": planned, "visual_flops_ratio": ratio("visual_flops"),
            "prefill_flops_ratio": ratio("prefill_flops")}


def plan_visual_ratio(dims: ModelDims, layout: TokenLayout, plan: Plan) -> float:
    """`plan_report(...)["visual_flops_ratio"]` alone, for a search that costs many candidate plans."""
    probs = GateProbs.from_plan(plan, dims.intermediate_size)
    return float(visual_flops(dims, layout, probs, plan.windows(), plan.temporal_window)) / float(visual_flops(dims, layout))


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


CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few KB; label maps can make it larger
# The language-model keys the cost model reads from a model folder's config.json, each with the largest
# value taken as real (published LMs: up to ~130 layers, 128 heads, hidden 16384, MLP 53248).
CONFIG_DIM_LIMITS = {"num_hidden_layers": 1000, "hidden_size": 1_000_000, "num_attention_heads": 1000,
                     "intermediate_size": 10_000_000}
_DIM_OF_KEY = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_heads",
               "intermediate_size": "intermediate_size"}


def resolve_model_dims(model: str) -> ModelDims:
    """A built-in name (`llava-1.5-7b`, ...) or a local folder holding a transformers config.json.

    The language model's num_hidden_layers, hidden_size, num_attention_heads and intermediate_size (in
    `text_config`, or at the top level when it has none) must each be from 1 to its CONFIG_DIM_LIMITS bound
    where the file states them. A size the file leaves out is the config class's default, which is what
    `from_pretrained` builds (llava-hf's published LLaVA configs store only what differs from Llama's
    defaults); it is costed, never silently: a warning names every such key and the value used.
    Raises ValueError naming the file and key.
    """
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]
    folder = Path(model)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
                         "nor a folder with a config.json")
    from .families import FAMILIES

    raw = _read_json_object(file)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(f"{file}: model_type {show_value(model_type)} is not a supported family; "
                         f"supported: {sorted(FAMILIES)}")
    prefix, text = ("text_config.", raw["text_config"]) if "text_config" in raw else ("", raw)
    text = text if isinstance(text, dict) else {}
    for key, limit in CONFIG_DIM_LIMITS.items():  # before transformers sees them: a config of 10^9 layers is slow
        value = text.get(key)
        if key in text and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit):
            raise ValueError(f"{file}: {prefix}{key} must be an integer from 1 to {limit}, got {show_value(value)}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    dims = dims_from_config(config, name=str(folder))
    defaults = [f"{prefix}{key} = {getattr(dims, field_name)}" for key, field_name in _DIM_OF_KEY.items()
                if key not in text]
    if defaults:
        logger.warning("%s does not state %s: costed with the config class's defaults, which from_pretrained "
                       "builds as well (%s)", file, ", ".join(d.split(" = ")[0] for d in defaults), ", ".join(defaults))
    for key, field_name in _DIM_OF_KEY.items():
        read = getattr(dims, field_name)
        if key in text and read != text[key]:
            raise ValueError(f"{file}: transformers reads {key} = {read} for the language model, not the "
                             f"{text[key]} written at {prefix}{key}; write it where the config class reads it")
    if dims.num_kv_heads < 1 or dims.num_heads % dims.num_kv_heads or dims.head_dim < 1:
        raise ValueError(f"{file}: {dims.num_heads} attention heads cannot share {dims.num_kv_heads} key-value "
                         f"heads of dimension {dims.head_dim}")
    return dims


def _read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object of a model or processor config file (see `read_json_file`: bounded, strict)."""
    settings = read_json_file(file, MAX_CONFIG_BYTES, "config file")
    if isinstance(settings, dict):
        return settings
    raise ValueError(f"{file} must hold a JSON object, got {type(settings).__name__}")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Image sizes and processor settings: what one real image costs. The per-family rules (size -> grids)
# live in the families; this part resolves the processor settings they read and checks the inputs.
MAX_IMAGE_SIDE = 1_000_000  # px; a longer side is a typo, not an image
MAX_TILES = 1024  # InternVL tiles per image (processors use up to 12 + a thumbnail)
PREPROCESSOR_FILE = "preprocessor_config.json"

# The published preprocessor_config.json values of each built-in model's checkpoint (the keys its
# family reads; LLaVA-1.5 reads none: its grid is fixed), as (where they are published, settings).
BUILTIN_PROCESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    # huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/preprocessor_config.json (also quoted by
    # llama.cpp tools/mtmd/clip.cpp, PROJECTOR_TYPE_QWEN2VL: "max image size = sqrt(max_pixels) = 3584")
    "qwen2-vl-7b": ("Qwen/Qwen2-VL-7B-Instruct preprocessor_config.json",
                    {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                     "merge_size": 2}),
    # OpenGVLab/InternVL3-8B-hf preprocessor_config.json: the GotOcr2ImageProcessorFast written by
    # transformers' convert_internvl_weights_to_hf.py (write_image_processor: 448 px tiles, crop_to_patches
    # left at the class default false, min_patches 1, max_patches 12; the same dump is quoted in
    # hiyouga/LlamaFactory#8342). InternVLProcessor calls it with crop_to_patches=True (its images_kwargs).
    "internvl3-8b": ("OpenGVLab/InternVL3-8B-hf preprocessor_config.json",
                     {"crop_to_patches": False, "min_patches": 1, "max_patches": 12,
                      "size": {"height": 448, "width": 448}}),
    # OpenGVLab/InternVL2-8B has no preprocessor_config.json (remote code): its config.json's dynamic
    # tiling (force_image_size 448, min_dynamic_patch 1, max_dynamic_patch 12, use_thumbnail true) in the
    # GotOcr2 keys, whose tiling is a port of that remote code's dynamic_preprocess.
    "internvl2-8b": ("OpenGVLab/InternVL2-8B config.json (dynamic tiling)",
                     {"crop_to_patches": True, "min_patches": 1, "max_patches": 12,
                      "size": {"height": 448, "width": 448}}),
    # llava-hf/llava-v1.6-vicuna-7b-hf preprocessor_config.json (LlavaNextImageProcessor: 336 px tiles;
    # the pinpoints of liuhaotian/llava-v1.6-vicuna-7b's config.json)
    "llava-next-7b": ("llava-hf/llava-v1.6-vicuna-7b-hf preprocessor_config.json",
                      {"image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                       "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}),
}


def parse_image_size(text: str) -> tuple[int, int]:
    """(height, width) px of "HEIGHTxWIDTH" (e.g. "720x1280"), each side in [1, MAX_IMAGE_SIDE]."""
    match = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not HEIGHTxWIDTH in pixels (e.g. 720x1280)")
    sides = match.groups()
    if any(len(side.lstrip("0")) > len(str(MAX_IMAGE_SIDE)) or not 1 <= int(side) <= MAX_IMAGE_SIDE for side in sides):
        raise ValueError(f"{text!r}: each side must be 1 to {MAX_IMAGE_SIDE} px")
    height, width = (int(side) for side in sides)
    return height, width


def check_image_size(image_size: tuple[int, int]) -> None:
    """Raise unless `image_size` is (height, width) with integer sides in [1, MAX_IMAGE_SIDE] px."""
    if len(image_size) != 2 or not all(isinstance(side, int) and 1 <= side <= MAX_IMAGE_SIDE for side in image_size):
        raise ValueError(f"image size {tuple(image_size)}: each side must be an integer from 1 to "
                         f"{MAX_IMAGE_SIDE} px (height, width)")


def setting_int(value: Any, name: str, low: int = 1, high: int | None = None) -> int:
    """A processor setting that must be an integer in [low, high] (JSON may write it as 448.0)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or value < low or (high is not None and value > high):
        bounds = f"from {low}" + (f" to {high}" if high is not None else "")
        raise ValueError(f"processor setting {name} must be an integer {bounds}, got {value!r}")
    return value


def require_processor(family: str, processor: dict[str, Any] | None) -> dict[str, Any]:
    """`processor`, or a ValueError saying that `family` needs processor settings to lay out an image."""
    if processor is None:
        raise ValueError(f"{family} lays an image out from its processor settings and none are known "
                         f"for this model (no {PREPROCESSOR_FILE}); give a processor folder")
    return processor


def setting_dict(value: Any, name: str) -> dict[str, Any]:
    """A processor setting that must be a JSON object (e.g. size: {"height": 448, "width": 448})."""
    if isinstance(value, dict):
        return value
    raise ValueError(f"processor setting {name} must be an object, got {value!r}")


def load_processor_settings(path: str | Path) -> dict[str, Any]:
    """The JSON object of a folder's preprocessor_config.json (or of that file itself)."""
    path = Path(path)
    file = path if path.is_file() else path / PREPROCESSOR_FILE
    if not path.exists():
        raise ValueError(f"processor folder {str(path)!r} does not exist")
    if not file.is_file():
        raise ValueError(f"{path} has no {PREPROCESSOR_FILE}")
    return _read_json_object(file)


def resolve_processor_settings(model: str, folder: str | Path | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(settings, where they come from) for `model` (as `resolve_model_dims` takes it): `folder`'s
    preprocessor_config.json when given, else a built-in model's published settings, else the model
    folder's own preprocessor_config.json, else (None, None)."""
    if folder is not None:
        folder = Path(folder)
        return load_processor_settings(folder), str(folder if folder.is_file() else folder / PREPROCESSOR_FILE)
    if model in BUILTIN_PROCESSORS:
        source, settings = BUILTIN_PROCESSORS[model]
        return copy.deepcopy(settings), f"published {source}"
    if model not in BUILTIN_MODELS and (Path(model) / PREPROCESSOR_FILE).is_file():
        return load_processor_settings(model), str(Path(model) / PREPROCESSOR_FILE)
    return None, None


def image_size_grids(dims: ModelDims, image_size: tuple[int, int], processor: dict[str, Any] | None) -> ImageGrids:
    """The grids of one image of `image_size` (height, width) px as the family of `dims` lays it out
    with `processor` settings (preprocessor_config.json keys; None: none known)."""
    check_image_size(image_size)
    return _family(dims).image_size_grids(tuple(image_size), processor, tuple(dims.image_grid))


def tile_grids(dims: ModelDims, num_tiles: int) -> ImageGrids:
    """One image of `num_tiles` tiles (a thumbnail is a tile) for a tiled family (InternVL)."""
    family = _family(dims)
    if not hasattr(family, "tile_grids"):
        raise ValueError(f"{dims.name} is a {dims.family} model: only tiled families (internvl) take a tile count")
    if isinstance(num_tiles, bool) or not isinstance(num_tiles, int) or not 1 <= num_tiles <= MAX_TILES:
        raise ValueError(f"the tile count must be 1 to {MAX_TILES}, got {num_tiles!r}")
    return family.tile_grids(num_tiles, tuple(dims.image_grid))


MAX_VIDEO_FRAMES = 100_000  # frames of one video; hours of video at a few frames per second


def video_frame_grids(dims: ModelDims, frames: int, frame_size: tuple[int, int] | None,
                      processor: dict[str, Any] | None) -> ImageGrids:
    """One video of `frames` frames of `frame_size` (height, width) px (None: the model's reference grid) for a
    family that takes videos (Qwen2-VL): every `temporal_patch_size` frames (processor setting, default 2; a last
    partial group is padded, as the processor repeats the last frame) make one temporal slice of the frame's
    grid, and a plan's temporal window pairs the slices of the video within it."""
    family = _family(dims)
    if not hasattr(family, "video_grids"):
        raise ValueError(f"{dims.name} is a {dims.family} model: only Qwen2-VL / Qwen2.5-VL take videos")
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_VIDEO_FRAMES:
        raise ValueError(f"the frame count must be 1 to {MAX_VIDEO_FRAMES}, got {frames!r}")
    if frame_size is not None:
        check_image_size(frame_size)
    return family.video_grids(frames, frame_size, processor, tuple(dims.image_grid))


def _family(dims: ModelDims) -> Any:
    from .families import FAMILIES

    family = FAMILIES.get(dims.family)
    if family is None:
        raise ValueError(f"{dims.name}: family {dims.family!r} is not supported; supported: {sorted(FAMILIES)}")
    return family
