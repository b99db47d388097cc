"""Recipes: typed dataclasses are the schema, `load_recipe(path, overrides)` reads a YAML recipe
(yaml.safe_load), rejects unknown keys and wrong types with the full dotted key, and applies
dotted command-line overrides (`budget.visual_flops=0.25`). Building models is left to the trainer."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    path: str  # local HF folder (or hub id on machines that can download)
    family: str = "llava"
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    trust_remote_code: bool = False
    train_projector: bool = False  # the family's projector trained (peft modules_to_save under LoRA)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"model.dtype must be auto, bf16 or fp32, got {self.dtype!r}")


@dataclass
class DataConfig:
    path: str  # LLaVA-format JSON file, or a `visprune data prepare` folder
    image_folder: str | None = None  # images are resolved inside this folder, never outside it
    max_length: int = 2048  # tokens, image tokens included
    drop_overlong: bool = False  # False: an over-long sample is an error naming it; True: drop and count
    num_workers: int = 0
    template: str = "auto"  # chat template: auto | llava_v1 | chatml | processor (data_prep/templates.py)

    def __post_init__(self) -> None:
        from visprune.data_prep.templates import TEMPLATE_CHOICES

        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")
        if self.template not in TEMPLATE_CHOICES:
            raise ValueError(f"data.template must be one of {', '.join(TEMPLATE_CHOICES)}, got {self.template!r}")


@dataclass
class GatesConfig:
    heads: bool = True
    visual_skip: bool = True
    visual_mlp: bool = True
    init_log_alpha: float = 2.0  # P(open) ~ 0.97 at the start: the gated model starts near the dense one
    backend: str = "auto"  # auto | sdpa | flex
    per_sample: bool = True  # every sample of a batch draws its own gates (else one draw per forward)


@dataclass
class BudgetConfig:
    visual_flops: float  # fraction of dense visual prefill FLOPs kept at the end
    warmup_steps: int = 0  # target ramps linearly from 1.0 over this many steps
    system_tokens: int = 35  # token layout used for the expected-FLOPs fraction
    text_tokens: int = 60

    def __post_init__(self) -> None:
        if not 0.0 < self.visual_flops <= 1.0:
            raise ValueError(f"budget.visual_flops must be in (0, 1], got {self.visual_flops}")
        if self.warmup_steps < 0:
            raise ValueError(f"budget.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class LoraConfig:
    rank: int = 128
    alpha: int = 256
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("lora.targets must name at least one linear layer")


@dataclass
class DistillConfig:
    enabled: bool = False
    weight: float = 1.0  # loss += weight * KL(teacher || student) on answer tokens
    temperature: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 2.0e-4  # LoRA (or full fine-tuning) learning rate
    gate_lr: float = 5.0e-2  # gate log_alpha learning rate, no weight decay
    lambda_lr: float = 5.0e-2  # Lagrange multipliers (gradient ascent through gradient reversal)
    gate_momentum: float = 0.0  # Adam beta1 of the gates: momentum makes the constraint overshoot
    lambda_momentum: float = 0.0  # Adam beta1 of the multipliers
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int
    micro_batch_size: int = 4
    grad_accum: int = 1
    seed: int = 17
    gradient_checkpointing: bool = True
    logging_steps: int = 1
    stop_after_nonfinite: int = 8  # a step with a non-finite loss or gradient is skipped; stop after this many in a row
    group_by_length: bool = False  # batches of similar length (needs a `visprune data prepare` folder as data.path)

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "stop_after_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DistributedConfig:
    zero_stage: int = 0  # 0 (plain DDP / single process), 2 or 3
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 2, 3):
            raise ValueError(f"distributed.zero_stage must be 0, 2 or 3, got {self.zero_stage}")


@dataclass
class OutputConfig:
    dir: str
    save_steps: int = 500
    save_total_limit: int | None = 3  # keep the newest N complete checkpoints (null: all)
    heatmap_steps: int = 50  # every N steps a TensorBoard image of the L x H head-gate probabilities


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    budget: BudgetConfig
    train: TrainConfig
    output: OutputConfig
    window: int | None = 5
    plan: str | None = None  # a pruning_plan.json: train LoRA with these gates fixed (no gate learning)
    gates: GatesConfig = field(default_factory=GatesConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)  # null: full fine-tuning of the LM
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.window is not None and (self.window < 1 or self.window % 2 == 0):
            raise ValueError(f"window must be null or an odd positive integer, got {self.window}")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe file and the full dotted key."""


# PyYAML follows YAML 1.1, where `2e-4` (no dot) is a string; YAML 1.2 and every user mean a float.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `dotted.key=value` overrides and validate it against the schema.

    Args:
        path: the recipe file; read with `yaml.safe_load`.
        overrides: strings such as `budget.visual_flops=0.25` or `lora=null`; each value is parsed
            with `yaml.safe_load`, applied to the raw mapping in order, before validation.

    Raises:
        RecipeError: unreadable file, invalid YAML, malformed override, unknown or missing key,
            wrong type or bad value; the message starts with the path and names the dotted key.
    """
    source = os.fspath(path)
    if isinstance(overrides, str):
        raise TypeError("load_recipe: overrides must be a sequence of 'key=value' strings, not one string")
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"{source}: cannot read recipe: {err.strerror or err}") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not a valid recipe for yaml.safe_load: {err}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {_describe(raw)}")
    for override in overrides:
        _apply_override(raw, override, source)
    return _build_dataclass(Recipe, raw, "", source)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain dicts, lists and scalars (what `save_recipe` writes)."""
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe as YAML, in schema order; `load_recipe(path)` gives it back equal."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")


def _apply_override(raw: dict[str, Any], override: str, source: str) -> None:
    """Set one `dotted.key=value` in the raw recipe; sections on the way are created if absent or null."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise RecipeError(f"{source}: override {override!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: override {override!r}: value is not valid YAML: {err}") from err
    cls: Any = Recipe
    node = raw
    for depth, name in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        if cls is None or name not in _field_types(cls):
            known = f" (known: {', '.join(sorted(_field_types(cls)))})" if cls is not None else ""
            raise RecipeError(f"{source}: override {override!r}: unknown key {dotted!r}{known}")
        if depth == len(parts) - 1:
            node[name] = value
            return
        cls = _section_class(_field_types(cls)[name])
        if cls is None:
            continue  # reported as unknown at the next part: this field is not a section
        if node.get(name) is None:
            node[name] = {}  # e.g. `lora: null` + `lora.rank=8`: the section from its defaults
        if not isinstance(node[name], dict):
            raise RecipeError(f"{source}: {dotted}: expected a mapping, got {_describe(node[name])}")
        node = node[name]


def _build_dataclass(cls: type, raw: Any, key: str, source: str, expected: str = "a mapping") -> Any:
    """Validate a mapping against a dataclass, recursively; `key` is its dotted key ('' for the recipe)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {key}: expected {expected}, got {_describe(raw)}")
    prefix = f"{key}." if key else ""
    hints = _field_types(cls)
    unknown = sorted(str(k) for k in raw if k not in hints)
    if unknown:
        raise RecipeError(f"{source}: unknown key {prefix + unknown[0]!r} (known: {', '.join(sorted(hints))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], prefix + f.name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: missing required key {prefix + f.name!r}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ checks; their messages name the key
        raise RecipeError(f"{source}: {err}") from err


def _convert(tp: Any, value: Any, key: str, source: str, expected: str | None = None) -> Any:
    """Check (and for int -> float, convert) one value against its annotation; `expected` names the
    annotation in errors when `tp` is the non-null part of an `X | None`."""
    expected = expected or _type_name(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"recipe schema: unsupported annotation {tp} for {key}")
        if value is None:
            raise RecipeError(f"{source}: {key}: expected {expected}, got null")
        return _convert(options[0], value, key, source, expected)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, source, expected)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {key}: expected {expected}, got {_describe(value)}")
        return [_convert(args[0], item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if tp not in ok:
        raise TypeError(f"recipe schema: unsupported annotation {tp} for {key}")
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    if not ok[tp]:
        raise RecipeError(f"{source}: {key}: expected {expected}, got {_describe(value)}")
    return float(value) if tp is float else value


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (this module uses postponed, string annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section_class(tp: Any) -> type | None:
    """The dataclass behind `Section` or `Section | None`, else None (a scalar or list field)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return tp.__name__


def _describe(value: Any) -> str:
    """`str ('a lot')`, `null`, `list ([1, 2])`: the YAML value as the user wrote it, shortened."""
    if value is None:
        return "null"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{type(value).__name__} ({shown})"
