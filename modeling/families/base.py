"""The family protocol: the only place that knows attribute paths inside a transformers model,
plus the layer wrappers (original module kept as a child) that gate the visual MLP rows and the
helpers the Llama-style families share (text dims, paths, the rotary function, attribute checks)."""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..flops import ImageGrids, TextDims
from ..gated_attention import CTX_KWARG, VisualContext
from ..layout import VisualLayout

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (q, k, cos, sin, unsqueeze_dim=1) -> (q, k)


class Family(Protocol):
    """What visprune needs to know about one kind of multimodal transformers model.

    `image_grid` is the reference grid the FLOPs model costs per image (families whose grid depends
    on the input say which image size they assume), `image_extras` that image's further grids and
    its image tokens that are no grid cell; `build_layout` gives the real grids of a forward.
    `rotary_fn` is what the hardened layers apply to Q/K with the (B, T, D) cos/sin tables the
    decoder layers receive. `vision_inputs` is a smallest valid input for `image_features`
    (the trainer runs it on text-only batches). `image_text` is the text one image takes in a prompt
    before the processor expands it (what LLaVA-format data's `<image>` becomes). `check` raises
    when a path the family relies on is missing; `decoder_layers` runs it, so every entry point
    (gates, hardening) checks.
    """

    name: str

    def matches(self, model: nn.Module) -> bool: ...
    def text_dims(self, config: Any) -> TextDims: ...
    def image_grid(self, config: Any) -> tuple[int, int]: ...
    def image_extras(self, config: Any) -> tuple[tuple[tuple[int, int], ...], int]: ...

    def image_size_grids(self, image_size: tuple[int, int], processor: dict[str, Any] | None,
                         grid: tuple[int, int]) -> ImageGrids:
        """The grids one image of `image_size` (height, width) px becomes as the family's processor lays
        it out with `processor` settings (preprocessor_config.json keys, missing keys at the image
        processor class's defaults; None: unknown, which a family whose layout depends on them
        refuses); `grid` is the model's per-image (per-tile) grid. Shape arithmetic only. A tiled
        family (InternVL) also has `tile_grids(num_tiles, grid)`: an image of that many tiles."""
        ...

    def multimodal_core(self, model: nn.Module) -> nn.Module: ...
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList: ...
    def build_layout(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualLayout: ...
    def rotary_fn(self, layer: nn.Module) -> RotaryFn: ...
    def vision_inputs(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]: ...
    def image_text(self, processor: Any) -> str: ...
    def check(self, model: nn.Module) -> None: ...

    def lora_target_regex(self, targets: Sequence[str]) -> str:
        """A peft `target_modules` regex (matched in full against module names) that selects the
        language model's linear layers named one of `targets` (e.g. "q_proj"), also inside the gate
        wrappers, and never a layer of the vision tower or the projector."""
        ...

    def projector_paths(self) -> tuple[str, ...]:
        """Dotted paths, from the top-level model, of the module(s) that map vision features into the
        language model (what `model.train_projector` trains). peft's `modules_to_save` matches each
        (as a suffix of a module name) and `model.get_submodule` resolves it."""
        ...

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder (embeddings, decoder layers, final norm; not the LM head): what full
        fine-tuning trains and what a full-weights checkpoint must hold."""
        ...

    def image_features(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Features of the images in `inputs` (e.g. `vision_inputs`) as the language model receives
        them: vision tower and projector, one (tokens, d) tensor per image (or a stacked tensor)."""
        ...

    def placeholder_token_ids(self, config: Any) -> tuple[int, ...]:
        """Token ids that stand for media features in a prompt (the image token; the video token in
        families that have one). The model must never generate them (see `suppress_in_generation`)."""
        ...


LANGUAGE_MODEL = "model.language_model"  # where the Llama-style families keep the text decoder
MULTI_MODAL_PROJECTOR = "model.multi_modal_projector"  # the LLaVA-style projector (LLaVA, LLaVA-NeXT, InternVL)


def llama_lora_target_regex(targets: Sequence[str]) -> str:
    """`Family.lora_target_regex` for a text decoder at `LANGUAGE_MODEL` with `layers.<i>`."""
    if not targets:
        raise ValueError("lora targets must name at least one linear layer (e.g. q_proj)")
    names = "|".join(re.escape(name) for name in targets)
    return rf"(.*\.)?{re.escape(LANGUAGE_MODEL)}\.layers\.\d+\.(.*\.)?({names})"


def llama_language_model(model: nn.Module) -> nn.Module:
    """`Family.language_model` of a model whose text decoder sits at `LANGUAGE_MODEL`."""
    return model.get_submodule(LANGUAGE_MODEL)


def core_image_features(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """`Family.image_features` of a model whose core has transformers' `get_image_features`."""
    return model.model.get_image_features(**inputs).pooler_output


class LlamaStyleFamily:
    """What the Llama-style families share: a text decoder at `LANGUAGE_MODEL` whose layers are checked to be
    Llama-style, the multimodal core at `model.model`, the attention module's own rotary function, a
    LLaVA-style projector, transformers' `get_image_features` and one image placeholder token. A family sets
    `name`, `class_name` (the transformers class it matches) and `paths` (every attribute path it relies on,
    checked by `check`) and implements only what differs: its image grids and layout, its smallest vision
    input, and any of these defaults that do not hold for it (Qwen2-VL: the merger as projector, a video
    token, M-RoPE head dims)."""

    name: str
    class_name: str
    paths: tuple[str, ...]

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == self.class_name

    def text_dims(self, config: Any) -> TextDims:
        return llama_text_dims(config.text_config)

    def image_extras(self, config: Any) -> tuple[tuple[tuple[int, int], ...], int]:
        return (), 0  # one grid per image (or tile), no other image tokens

    def multimodal_core(self, model: nn.Module) -> nn.Module:
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        self.check(model)
        return model.model.language_model.layers

    def rotary_fn(self, layer: nn.Module) -> RotaryFn:
        return module_rotary_fn(layer)

    def image_text(self, processor: Any) -> str:
        return processor.image_token  # expanded by the processor to the image's tokens

    def check(self, model: nn.Module) -> None:
        check_llama_family(self.name, model, self.paths)

    def lora_target_regex(self, targets: Sequence[str]) -> str:
        return llama_lora_target_regex(targets)

    def projector_paths(self) -> tuple[str, ...]:
        return (MULTI_MODAL_PROJECTOR,)

    def language_model(self, model: nn.Module) -> nn.Module:
        return llama_language_model(model)

    def image_features(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        return core_image_features(model, inputs)

    def placeholder_token_ids(self, config: Any) -> tuple[int, ...]:
        return (config.image_token_id,)


def layout_input_ids(kwargs: dict[str, Any]) -> torch.Tensor:
    """The forward's `input_ids`: the image tokens are found there, never in `inputs_embeds`."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("visprune needs input_ids (not inputs_embeds) to find the image tokens")
    return input_ids


def count_encoded_images(kwargs: dict[str, Any]) -> int:
    """Images (or tiles) this forward encodes: `pixel_values` rows, or the features `generate()` computed up
    front (`mm_encoder_outputs`); 0 for text only."""
    pixel_values = kwargs.get("pixel_values")
    if pixel_values is not None:
        return pixel_values.shape[0]
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    return 0 if encoded is None else len(encoded.pooler_output)


def suppress_in_generation(model: nn.Module, token_ids: Sequence[int]) -> None:
    """Make `generate()` of `model` never emit `token_ids`: add them to the model's
    `generation_config.suppress_tokens`, keeping the ids already there.

    A generated media placeholder (an image token from a pruned, gated or under-trained model) is a
    token with no features: the next forward's visual layout counts an image it cannot place and
    decoding fails. Suppressing it in the model's own generation config is the most robust fix:
    every `generate()` call applies it without the caller doing anything (a caller's own
    `GenerationConfig` takes the model's value for fields it leaves unset), it works for greedy,
    sampling and beam search alike, and `save_pretrained` persists it (generation_config.json). A
    logits processor would have to be passed on every call; a layout that read a generated image
    token as text would keep decoding alive but still emit the placeholder, which breaks the next
    forward of the same text (recomputation, a follow-up turn, the base model). Only an explicit
    `generate(suppress_tokens=...)` replaces the list; it must then name these ids itself.
    """
    config = getattr(model, "generation_config", None)
    if config is None:
        return  # not a generative model: nothing generates
    suppressed = [int(t) for t in config.suppress_tokens or []]
    for token_id in token_ids:
        if token_id is not None and int(token_id) not in suppressed:
            suppressed.append(int(token_id))
    config.suppress_tokens = suppressed


def llama_text_dims(text: Any, head_dim: int | None = None) -> TextDims:
    """TextDims of a Llama-style text config (Llama, Qwen2, Qwen2-VL text)."""
    head_dim = head_dim or getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return TextDims(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                    num_heads=text.num_attention_heads,
                    num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                    head_dim=head_dim, intermediate_size=text.intermediate_size)


def module_rotary_fn(layer: nn.Module) -> RotaryFn:
    """The `apply_rotary_pos_emb` of the module that defines the layer's attention class."""
    module = sys.modules[type(layer.self_attn).__module__]
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{module.__name__} has no apply_rotary_pos_emb")
    return fn


def forward_inputs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword view of a forward call: positional arguments named by the module's forward
    signature (LLaVA-NeXT's top-level model passes `input_ids` to its core positionally)."""
    if not args:
        return kwargs
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [name for name, param in inspect.signature(module.forward).parameters.items() if param.kind in positional]
    if len(args) > len(names):
        raise ValueError(f"{type(module).__name__}.forward got {len(args)} positional arguments; "
                         "call the model with keyword arguments (input_ids=..., pixel_values=...)")
    return {**kwargs, **dict(zip(names, args))}


def check_llama_family(family: str, model: nn.Module, paths: tuple[str, ...]) -> None:
    """Every attribute path a family relies on exists and its decoder layers are Llama-style."""
    for path in paths:
        require_path(family, model, path)
    check_llama_layers(family, model.model.language_model.layers, model.config.text_config)


def check_patch_features(family: str, config: Any) -> None:
    """Refuse a model whose image features keep the CLS token (it is not on the patch grid)."""
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"{family} family: vision_feature_select_strategy={strategy!r} keeps the CLS token, "
                         "which is not on the patch grid; only 'default' is supported")


def require_path(family: str, root: Any, path: str) -> Any:
    """`root.<path>` (dots; `[i]` indexing not needed), or a TypeError naming the family and the path.

    Families call this for every attribute path they rely on, so a transformers release that moves
    one fails loudly here instead of silently computing something else.
    """
    node = root
    for part in path.split("."):
        if not hasattr(node, part):
            raise TypeError(f"{family} family: {type(root).__name__}.{path} is missing ({type(node).__name__} has "
                            f"no {part!r}); this transformers version is not supported (see pyproject.toml)")
        node = getattr(node, part)
    return node


LAYER_PATHS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": ("gate_proj", "up_proj", "down_proj", "act_fn"),
               "input_layernorm": (), "post_attention_layernorm": ()}
_WRAPPED = {"self_attn": "attn", "mlp": "mlp"}  # where the gate wrappers keep the original module


def check_llama_layers(family: str, layers: nn.ModuleList, text_config: Any) -> None:
    """Every decoder layer is Llama-style (LAYER_PATHS; gated or hardened layers are looked through)
    and uses full attention (the gated attention has no sliding window)."""
    for layer in layers:
        layer = getattr(layer, "layer", layer)  # a hardened layer keeps the original as .layer
        for child, names in LAYER_PATHS.items():
            module = require_path(family, layer, child)
            module = getattr(module, _WRAPPED.get(child, ""), module)
            for name in names:
                require_path(family, module, name)
    sliding = [i for i, kind in enumerate(getattr(text_config, "layer_types", None) or []) if kind != "full_attention"]
    if sliding or getattr(text_config, "use_sliding_window", False):
        raise ValueError(f"{family} family: layers {sliding} use sliding-window attention, which visprune's gated "
                         "attention does not implement; use a config with use_sliding_window=false")


class LayerSlot:
    """Hands the visual context from a layer's attention wrapper to its MLP wrapper.

    The attention wrapper runs inside the layer's forward (also when gradient checkpointing re-runs
    that forward in backward), so the MLP always reads the context of the forward it belongs to.
    """

    def __init__(self) -> None:
        self.ctx: VisualContext | None = None


class VisualAttentionWrapper(nn.Module):
    """Wraps a decoder layer's self-attention: publishes the context to the MLP wrapper and scales
    the output-projection bias of visual rows by r[l] (times the freeze gate a[l]; docs/design.md rules 3, 7)."""

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
            keep = ctx.gates.rows_updated(self.layer_idx)[:, None, None].to(out.dtype)  # (N, 1, 1)
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
        blocks = None if ctx.gates.channels is None else ctx.gates.channels[:, self.layer_idx]  # (N, B): c[l, b]
        if channels is None and blocks is None:
            out = self.mlp(x)
            visual_out = out
        else:
            hidden = self.mlp.act_fn(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)  # (B, Q, I)
            out = self.mlp.down_proj(hidden)
            keep = torch.ones((), device=hidden.device) if channels is None else channels.to(hidden.dtype)
            if blocks is not None:  # each block's gate on its channels: (N, 1, I)
                learned = blocks.repeat_interleave(ctx.channel_block, dim=-1)[:, None, :hidden.shape[-1]]
                keep = keep * learned.to(hidden.dtype)
            visual_out = self.mlp.down_proj(hidden * keep)
        u = ctx.gates.mlp[:, self.layer_idx, None, None].to(out.dtype)  # (N, 1, 1)
        return torch.where(vis, u * visual_out, out)
