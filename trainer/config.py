"""Recipes: typed dataclasses are the schema; `load_recipe(path, overrides)` reads a YAML recipe with a
bounded yaml.SafeLoader, applies dotted overrides (`budget.visual_flops=0.25`) and refuses unknown keys,
wrong types and out-of-range values naming the dotted key. Building models is left to the trainer."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from visprune.modeling import ModelDims, TokenLayout, default_layout
from visprune.modeling.gates import GateConfig
from visprune.modeling.plan import parse_window


@dataclass
class ModelConfig:
    path: str  # local HF folder (or hub id on machines that can download)
    family: str = "llava"  # a key of visprune.modeling.families.FAMILIES
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    trust_remote_code: bool = False
    train_projector: bool = False  # the family's projector trained (peft modules_to_save under LoRA)

    def __post_init__(self) -> None:
        from visprune.modeling.families import FAMILIES

        _check_path("model.path", self.path)
        _check_choice("model.family", self.family, tuple(FAMILIES))
        _check_choice("model.dtype", self.dtype, ("auto", "bf16", "fp32"))


@dataclass
class DataConfig:
    path: str  # LLaVA-format JSON file, or a `visprune data prepare` folder
    image_folder: str | None = None  # images are resolved inside this folder, never outside it
    max_length: int = 2048  # tokens, image tokens included
    drop_overlong: bool = False  # False: an over-long sample is an error naming it; True: drop and count
    num_workers: int = 0
    template: str = "auto"  # chat template: auto | llava_v1 | chatml | processor (data_prep/templates.py)
    max_image_pixels: int = 64_000_000  # width x height; the data layer refuses larger images (decompression bombs)

    def __post_init__(self) -> None:
        from visprune.data_prep.templates import TEMPLATE_CHOICES

        _check_path("data.path", self.path)
        if self.image_folder is not None:
            _check_path("data.image_folder", self.image_folder, "null or a non-empty path")
        _check_int("data.max_length", self.max_length, 8)
        _check_int("data.num_workers", self.num_workers, 0)
        _check_choice("data.template", self.template, tuple(TEMPLATE_CHOICES))
        _check_int("data.max_image_pixels", self.max_image_pixels, 1)


@dataclass
class BudgetConfig:
    visual_flops: float  # fraction of dense visual prefill FLOPs kept at the end
    warmup_steps: int = 0  # target ramps linearly from 1.0 over this many steps
    system_tokens: int = 35  # token layout used for the expected-FLOPs fraction
    text_tokens: int = 60

    def __post_init__(self) -> None:
        _check_float("budget.visual_flops", self.visual_flops, "(", 0.0, 1.0, "]")
        _check_int("budget.warmup_steps", self.warmup_steps, 0)
        _check_int("budget.system_tokens", self.system_tokens, 0)
        _check_int("budget.text_tokens", self.text_tokens, 0)

    def layout(self, dims: ModelDims) -> TokenLayout:
        """The token layout the budget is costed on (one image, `system_tokens` before it, `text_tokens` after):
        what training pulls to the budget and hardening cuts at it."""
        return default_layout(dims, system=self.system_tokens, text=self.text_tokens)


@dataclass
class LoraConfig:
    rank: int = 128
    alpha: int = 256
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        _check_int("lora.rank", self.rank, 1)
        _check_int("lora.alpha", self.alpha, 1)
        _check_float("lora.dropout", self.dropout, "[", 0.0, 1.0, ")")
        if not self.targets:
            raise ValueError("lora.targets must name at least one linear layer")
        for idx, target in enumerate(self.targets):
            if not isinstance(target, str) or not target.strip():
                raise ValueError(f"lora.targets[{idx}] must be a module name such as q_proj, got {_show(target)}")


@dataclass
class DistillConfig:
    enabled: bool = False
    weight: float = 1.0  # loss += weight * KL(teacher || student) on answer tokens
    temperature: float = 1.0  # both distributions softened by it; 0 would divide the logits by zero

    def __post_init__(self) -> None:
        _check_float("distill.weight", self.weight, "[", 0.0)
        _check_float("distill.temperature", self.temperature, "(", 0.0)


@dataclass
class PlanLossConfig:
    weight: float = 0.0  # loss += weight * (LM loss [+ distillation] of the hardened plan at the current target)
    start: float = 0.5  # from this fraction of max_steps on (0: every step)
    fill: bool = True  # the plan by to_plan's fill rule (false: the prefix rule); match what harden will use
    # > 1: each plan-loss step scores this many candidate plans on its own batch without gradients (the gates'
    # plan and plans drawn from the gates, GateSet.candidate_plans) and trains the one with the lowest loss
    candidates: int = 1

    def __post_init__(self) -> None:
        _check_float("plan_loss.weight", self.weight, "[", 0.0)
        _check_float("plan_loss.start", self.start, "[", 0.0, 1.0)
        _check_int("plan_loss.candidates", self.candidates, 1, 64)


@dataclass
class PlanSelectConfig:
    # at this fraction of max_steps (after the budget's warm-up): choose the plan by a validation pass and train
    # it fixed to the last step (gates frozen to it); null: the gates learn to the end
    at: float | None = None
    candidates: int = 8  # the gates' own plan and up to candidates - 1 plans drawn from the gates
    samples: int = 64  # scored on the first N samples of `data`
    data: str | None = None  # held-out samples (LLaVA JSON or prepared folder; images in data.image_folder); null: data.path
    restart_lr: bool = True  # the LoRA / LM learning-rate schedule (warm-up, decay) starts again at the fix
    # > 1: the best `finalists` candidates are trained in turn (one per optimizer step, gates frozen) for `trial`
    # x max_steps steps, scored again on `data`, and the best of them is fixed; 1: the best candidate is fixed at once
    finalists: int = 1
    trial: float = 0.0

    def __post_init__(self) -> None:
        if self.at is not None:
            _check_float("plan_select.at", self.at, "(", 0.0, 1.0, ")")
        _check_int("plan_select.candidates", self.candidates, 1, 64)
        _check_int("plan_select.samples", self.samples, 1, 100_000)
        if self.data is not None:
            _check_path("plan_select.data", self.data, "null or a non-empty path")
        _check_int("plan_select.finalists", self.finalists, 1, self.candidates)
        _check_float("plan_select.trial", self.trial, "[", 0.0, 1.0, ")")
        if (self.finalists > 1) != (self.trial > 0):
            raise ValueError(f"plan_select.finalists {self.finalists} and plan_select.trial {self.trial:g}: finalists "
                             "above 1 are trained for a share (trial > 0) of max_steps before one is fixed; set both "
                             "(e.g. 3 and 0.15) or neither (1 and 0)")

    def step(self, max_steps: int) -> int | None:
        """The optimizer step at which the candidates are scored and the gates frozen (None: never); the plan is
        fixed then, or `trial_steps` later when finalists are trained first."""
        return None if self.at is None else max(1, round(self.at * max_steps))

    def trial_steps(self, max_steps: int) -> int:
        """Optimizer steps the finalists are trained in turn before one is fixed (0: none)."""
        return 0 if self.finalists == 1 else round(self.trial * max_steps)


# transformers schedulers that need no scheduler kwargs and step every param group through a LambdaLR
# (the trainer keeps the gates' and multipliers' learning rates constant through its lr_lambdas)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


@dataclass
class OptimConfig:
    lr: float = 2.0e-4  # LoRA (or full fine-tuning) learning rate
    gate_lr: float = 5.0e-2  # gate log_alpha learning rate, no weight decay
    lambda_lr: float = 5.0e-2  # Lagrange multipliers (gradient ascent through gradient reversal)
    gate_momentum: float = 0.0  # Adam beta1 of the gates: momentum makes the constraint overshoot
    lambda_momentum: float = 0.0  # Adam beta1 of the multipliers
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # one of SCHEDULERS
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lr", "gate_lr", "lambda_lr", "max_grad_norm"):
            _check_float(f"optim.{name}", getattr(self, name), "(", 0.0)
        for name in ("gate_momentum", "lambda_momentum", "warmup_ratio"):  # Adam's beta1 < 1; a ratio of steps
            _check_float(f"optim.{name}", getattr(self, name), "[", 0.0, 1.0, ")")
        _check_float("optim.weight_decay", self.weight_decay, "[", 0.0)
        _check_choice("optim.scheduler", self.scheduler, SCHEDULERS)


@dataclass
class TrainConfig:
    max_steps: int
    micro_batch_size: int = 4
    grad_accum: int = 1
    seed: int = 17  # 0 to 2**32 - 1 (numpy's seed range)
    gradient_checkpointing: bool = True
    logging_steps: int = 1
    stop_after_nonfinite: int = 8  # a step with a non-finite loss or gradient is skipped; stop after this many in a row
    group_by_length: bool = False  # batches of similar length (needs a `visprune data prepare` folder as data.path)

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "stop_after_nonfinite", "logging_steps"):
            _check_int(f"train.{name}", getattr(self, name), 1)
        _check_int("train.seed", self.seed, 0, 2**32 - 1)  # transformers' set_seed seeds numpy too


@dataclass
class DistributedConfig:
    zero_stage: int = 0  # 0 (plain DDP / single process), 2 or 3
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        _check_choice("distributed.zero_stage", self.zero_stage, (0, 2, 3))


@dataclass
class OutputConfig:
    dir: str
    save_steps: int = 500
    save_total_limit: int | None = 3  # keep the newest N complete checkpoints (null: all)
    heatmap_steps: int = 50  # every N steps a TensorBoard image of the L x H head-gate probabilities (0: never)

    def __post_init__(self) -> None:
        _check_path("output.dir", self.dir)
        _check_int("output.save_steps", self.save_steps, 1)
        if self.save_total_limit is not None:
            _check_int("output.save_total_limit", self.save_total_limit, 1, allowed_null=True)
        _check_int("output.heatmap_steps", self.heatmap_steps, 0)


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    budget: BudgetConfig
    train: TrainConfig
    output: OutputConfig
    window: int | list[int] | None = 5  # w (w x w on each grid), null, or [t, h, w] with h == w (videos)
    plan: str | None = None  # a pruning_plan.json: train LoRA with these gates fixed (no gate learning)
    gates: GateConfig = field(default_factory=GateConfig)  # modeling's schema; its window is `window` above
    lora: LoraConfig | None = field(default_factory=LoraConfig)  # null: full fine-tuning of the LM
    distill: DistillConfig = field(default_factory=DistillConfig)
    plan_loss: PlanLossConfig = field(default_factory=PlanLossConfig)  # a term on the plan hardening will keep
    plan_select: PlanSelectConfig = field(default_factory=PlanSelectConfig)  # choose the plan, then train it fixed
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        # the gate config's window is the recipe's top-level key: w, null, or [t, h, w] (a video's temporal slices)
        self.gates.window, self.gates.temporal_window = parse_window(self.window)
        if self.plan is not None:
            _check_path("plan", self.plan, "null or a non-empty path")
        fix_step = self.plan_select.step(self.train.max_steps)
        if fix_step is not None:
            if self.plan is not None:
                raise ValueError("plan_select.at chooses a plan from learned gates; this recipe fixes one (plan): "
                                 "set one of them to null")
            if fix_step < self.budget.warmup_steps:
                raise ValueError(f"plan_select.at {self.plan_select.at:g} chooses the plan at step {fix_step}, before "
                                 f"the budget reaches its target (budget.warmup_steps {self.budget.warmup_steps})")
            select, steps = self.plan_select, self.train.max_steps
            if select.finalists > 1 and select.trial_steps(steps) < select.finalists:
                raise ValueError(f"plan_select.trial {select.trial:g} of train.max_steps {steps} is "
                                 f"{select.trial_steps(steps)} steps for {select.finalists} finalists: give each "
                                 "at least one step")
            if fix_step + select.trial_steps(steps) >= steps:
                raise ValueError(f"plan_select.trial {select.trial:g} ({select.trial_steps(steps)} steps from step "
                                 f"{fix_step}) leaves no step of train.max_steps {steps} to train the chosen plan")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(key: str, value: Any, low: int, high: int | None = None, allowed_null: bool = False) -> None:
    """Raise ValueError unless `value` is an int (not a bool) in [low, high]; the message names `key`."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        allowed = f"null or an integer {allowed}" if allowed_null else f"an integer {allowed}"
        raise ValueError(f"{key} must be {allowed}, got {_show(value)}")


def _check_float(key: str, value: Any, low_bracket: str = "[", low: float | None = None,
                 high: float | None = None, high_bracket: str = "]") -> None:
    """Raise ValueError unless `value` is a finite number in the interval (`"("` / `")"`: open ends)."""
    ok = _is_finite_number(value)
    if ok and low is not None:
        ok = value > low if low_bracket == "(" else value >= low
    if ok and high is not None:
        ok = value < high if high_bracket == ")" else value <= high
    if ok:
        return
    if low is not None and high is not None:
        allowed = f"in {low_bracket}{low:g}, {high:g}{high_bracket}"
    elif low is not None:
        allowed = f"finite and {'>' if low_bracket == '(' else '>='} {low:g}"
    else:
        allowed = "a finite number"
    raise ValueError(f"{key} must be {allowed}, got {_show(value)}")


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def _check_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(str(c) for c in choices)}, got {_show(value)}")


def _check_path(key: str, value: Any, allowed: str = "a non-empty path") -> None:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError(f"{key} must be {allowed}, got {_show(value)}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe file and the full dotted key."""


# PyYAML follows YAML 1.1, where `2e-4` (no dot) is a string; YAML 1.2 and every user mean a float.
# One way to match each digit (no `\d+\.?\d*`): the pattern stays linear on a long run of digits.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")

# Bounds of the YAML reader. Recipes are a few KB with a few hundred nodes; without these, the "billion
# laughs" document (nine levels of ten aliases, 1.6 KB) stands for 10^9 nodes that a repr, a deep copy or
# a dump would expand, and deep nesting ends PyYAML's recursive composer in a RecursionError.
MAX_RECIPE_BYTES = 1_000_000  # a recipe file, and each override
MAX_YAML_NODES = 10_000  # nodes of the document with every alias expanded
MAX_ALIAS_USES = 100  # uses of one anchor
MAX_YAML_DEPTH = 50  # nested sequences and mappings


class _YAMLLimitError(yaml.YAMLError):
    """A document the bounded loader refuses: `message` names the dotted key, `mark` where it is."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message, self.mark = message, mark


class _BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only, no Python tags) that refuses duplicate keys, nesting deeper
    than MAX_YAML_DEPTH, and documents whose alias expansion exceeds MAX_YAML_NODES or that use one
    anchor more than MAX_ALIAS_USES times (or inside itself), while composing, before anything is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._keys: list[str] = []  # the dotted key of the node being composed, one part per level
        self._sizes: dict[int, int] = {}  # id(node) -> its node count with aliases expanded
        self._alias_uses: dict[str, int] = {}
        self._num_nodes = 0  # nodes built so far, an alias counting its whole expansion
        self._paths: dict[int, str] = {}  # id(node) -> its dotted key, for errors while constructing

    def _dotted(self, *more: str) -> str:
        dotted = ""
        for part in filter(None, [*self._keys, *more]):
            dotted += part if part.startswith("[") or not dotted else f".{part}"
        return _shorten(dotted or "(top level)", 80)

    def _count(self, num: int, mark: Any) -> None:
        self._num_nodes += num
        if self._num_nodes > MAX_YAML_NODES:
            raise _YAMLLimitError(f"{self._dotted()}: more than {MAX_YAML_NODES} values with aliases expanded "
                                  "(an alias bomb?)", mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if isinstance(index, yaml.ScalarNode):  # a mapping value: index is its key
            self._keys.append(_shorten(str(index.value), 40))
        elif isinstance(index, int):  # a sequence item
            self._keys.append(f"[{index}]")
        else:  # the document, or a mapping key
            self._keys.append("" if parent is None else "(key)")
        try:
            if self.check_event(yaml.AliasEvent):
                return self._compose_alias(parent, index)
            event = self.peek_event()
            if len(self._keys) > MAX_YAML_DEPTH:
                raise _YAMLLimitError(f"{self._dotted()}: nested deeper than {MAX_YAML_DEPTH} levels",
                                      event.start_mark)
            self._count(1, event.start_mark)
            node = super().compose_node(parent, index)
            children = node.value if isinstance(node, yaml.SequenceNode) else (
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in children)
            self._paths[id(node)] = self._dotted()
            return node
        finally:
            self._keys.pop()

    def _compose_alias(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        uses = self._alias_uses[event.anchor] = self._alias_uses.get(event.anchor, 0) + 1
        name = _shorten(event.anchor, 40)
        if uses > MAX_ALIAS_USES:
            raise _YAMLLimitError(f"{self._dotted()}: alias *{name} is used more than {MAX_ALIAS_USES} times",
                                  event.start_mark)
        node = super().compose_node(parent, index)
        if id(node) not in self._sizes:  # its anchor is still being composed: the value would contain itself
            raise _YAMLLimitError(f"{self._dotted()}: alias *{name} is used inside its own anchor", event.start_mark)
        self._count(self._sizes[id(node)], event.start_mark)
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may override keys on purpose
            ident = (key_node.tag, key_node.value)
            if ident in first_line:
                dotted = self._dotted(_shorten(str(key_node.value), 40))
                raise _YAMLLimitError(f"duplicate key {dotted!r} (first at line {first_line[ident]})",
                                      key_node.start_mark)
            first_line[ident] = key_node.start_mark.line + 1
        return node


    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as err:  # an int past Python's 4300-digit limit, a 13th month, ...
            where = self._paths.get(id(node), "(top level)")
            raise yaml.constructor.ConstructorError(None, None, f"{where}: {_shorten(str(err), 100)}",
                                                    node.start_mark) from None


def _read_yaml(text: str) -> Any:
    """`text` parsed by the bounded safe loader; yaml.YAMLError (or ValueError) when it is refused."""
    loader = _BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(err: Exception) -> str:
    """One short line for a YAML error: `line L, column C: problem` (PyYAML's own text spans lines)."""
    if isinstance(err, _YAMLLimitError):
        problem, mark = err.message, err.mark
    elif isinstance(err, yaml.MarkedYAMLError):
        problem = ", ".join(part for part in (err.context, err.problem) if part) or "invalid YAML"
        mark = err.problem_mark or err.context_mark
    elif isinstance(err, RecursionError):
        problem, mark = "nested too deeply", None
    else:
        problem, mark = str(err), None
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + _shorten(" ".join(str(problem).split()), 160)


def _read_recipe_text(source: str) -> str:
    """The recipe file's text, refused above MAX_RECIPE_BYTES (read no further) or when not UTF-8."""
    try:
        with open(source, "rb") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(f"{source}: cannot read recipe: {err.strerror or err}") from err
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: a recipe must be at most {MAX_RECIPE_BYTES} bytes; this file is larger")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{source}: a recipe must be UTF-8 text (byte {err.start} is not)") from err


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `dotted.key=value` overrides and validate it against the schema.

    Args:
        path: the recipe file (at most MAX_RECIPE_BYTES); read as `yaml.safe_load` does, refusing
            duplicate keys, deep nesting and alias expansion past MAX_YAML_NODES.
        overrides: strings such as `budget.visual_flops=0.25` or `lora=null`; each value is parsed
            by the same loader, applied to the raw mapping in order, before validation.

    Raises:
        RecipeError: unreadable file, invalid YAML, malformed override, unknown or missing key,
            wrong type or bad value; one line that starts with the path and names the dotted key.
    """
    source = os.fspath(path)
    if isinstance(overrides, str):
        raise TypeError("load_recipe: overrides must be a sequence of 'key=value' strings, not one string")
    raw = read_recipe_mapping(source)
    for override in overrides:
        _apply_override(raw, override, source)
    return _build_dataclass(Recipe, raw, "", source)


def read_recipe_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe file as its raw YAML mapping (no schema check), read within the loader's bounds.

    Raises:
        RecipeError: unreadable, too large, not UTF-8, invalid or refused YAML, or not a mapping.
    """
    source = os.fspath(path)
    text = _read_recipe_text(source)
    try:
        raw = _read_yaml(text)
    except _YAMLLimitError as err:
        raise RecipeError(f"{source}: {_yaml_problem(err)}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: e.g. an int of 5000 digits
        raise RecipeError(f"{source}: not a valid recipe for yaml.safe_load: {_yaml_problem(err)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {_describe(raw)}")
    return raw


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain dicts, lists and scalars (what `save_recipe` writes); keys of a section that the
    recipe holds elsewhere (the gate config's window) are left out."""
    out = dataclasses.asdict(recipe)
    for f in dataclasses.fields(GateConfig):
        if "recipe_key" in f.metadata:
            out["gates"].pop(f.name, None)
    return out


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe as YAML, in schema order; `load_recipe(path)` gives it back equal.

    Raises:
        RecipeError: the YAML would be larger than MAX_RECIPE_BYTES (`load_recipe` would refuse it).
    """
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)  # no 6-byte \u escapes
    if len(text.encode("utf-8")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: the resolved recipe is larger than {MAX_RECIPE_BYTES} bytes")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


def _apply_override(raw: dict[str, Any], override: str, source: str) -> None:
    """Set one `dotted.key=value` in the raw recipe; sections on the way are created if absent or null."""
    shown = _quote(override)
    if len(override.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: override {shown} is longer than {MAX_RECIPE_BYTES} bytes")
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise RecipeError(f"{source}: override {shown} is not of the form dotted.key=value")
    try:
        value = _read_yaml(text)
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        raise RecipeError(f"{source}: override {shown}: value is not valid YAML: {_yaml_problem(err)}") from None
    cls: Any = Recipe
    node = raw
    for depth, name in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        if cls is None or name not in _field_types(cls):
            known = f" (known: {', '.join(sorted(_field_types(cls)))})" if cls is not None else ""
            raise RecipeError(f"{source}: override {shown}: unknown key {_quote(dotted)}{known}")
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
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise RecipeError(f"{source}: unknown key {_quote(prefix + unknown[0])}{more} "
                          f"(known: {', '.join(sorted(hints))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in hints:
            continue
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], prefix + f.name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: missing required key {prefix + f.name!r}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ checks; this module's name the dotted key, modeling's the field
        own = cls.__module__ == __name__
        raise RecipeError(f"{source}: {'' if own else prefix}{err}") from err


def _convert(tp: Any, value: Any, key: str, source: str, expected: str | None = None) -> Any:
    """Check (and for int -> float, convert) one value against its annotation; `expected` names the
    annotation in errors when `tp` is the non-null part of an `X | None`."""
    expected = expected or _type_name(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if value is None:
            raise RecipeError(f"{source}: {key}: expected {expected}, got null")
        for option in options[:-1]:  # e.g. `int | list[int]`: the first annotation the value matches
            try:
                return _convert(option, value, key, source, expected)
            except RecipeError:
                continue
        return _convert(options[-1], value, key, source, expected)
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
    if tp is float and isinstance(value, str) and len(value) <= 64 and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)
    elif not ok[tp]:
        raise RecipeError(f"{source}: {key}: expected {expected}, got {_describe(value)}")
    if tp is float:
        try:
            return float(value)
        except OverflowError:  # an int too large for a float
            raise RecipeError(f"{source}: {key} must be a finite number, got {_describe(value)}") from None
    return value


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's recipe keys (this module uses postponed, string annotations); a
    field marked `recipe_key` is set from another key of the recipe and is not one of this section's."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if "recipe_key" not in f.metadata}


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
    return f"{type(value).__name__} ({_show(value)})"


def _show(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: messages never print a whole (hostile) value."""
    try:
        shown = repr(value)
    except ValueError:  # an int past Python's digit limit
        return f"<{type(value).__name__} too large to show>"
    return _shorten(shown, limit)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(text: str, limit: int = 60) -> str:
    """A user-written key or override in quotes, shortened."""
    return repr(_shorten(text, limit))
