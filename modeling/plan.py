"""`pruning_plan.json`, the exchange format between training, hardening and users: which visual
heads, visual MLPs (and MLP channels) each layer keeps, and the neighbour window. Validation only;
executing a plan is `gates.apply_plan`'s job."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLAN_FORMAT = "visprune-plan/1"
PLAN_FILE = "pruning_plan.json"  # the plan inside an exported folder
_TOP_KEYS = {"format", "family", "window", "num_layers", "num_heads", "layers"}
_LAYER_KEYS = {"heads", "mlp", "mlp_channels"}


class PlanError(ValueError):
    """A pruning plan that does not validate; the message names the offending key."""


@dataclass(frozen=True)
class LayerPlan:
    heads: tuple[int, ...]  # visual heads kept (effective gate e = 1)
    mlp: bool  # visual MLP kept
    mlp_channels: tuple[int, ...] | None = None  # intermediate channels kept by visual rows; None = all

    @property
    def skipped(self) -> bool:
        """Visual tokens take no part in this layer (router r = 0)."""
        return not self.heads and not self.mlp


@dataclass(frozen=True)
class Plan:
    family: str
    window: int | None
    num_layers: int
    num_heads: int
    layers: tuple[LayerPlan, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _validate(self)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def dense(cls, num_layers: int, num_heads: int, family: str = "llava", window: int | None = None) -> Plan:
        """Every visual head and MLP kept; with `window=None` this is exactly the base model."""
        layer = LayerPlan(heads=tuple(range(num_heads)), mlp=True)
        return cls(family=family, window=window, num_layers=num_layers, num_heads=num_heads,
                   layers=tuple(layer for _ in range(num_layers)))

    @classmethod
    def from_json(cls, source: str | os.PathLike | dict[str, Any]) -> Plan:
        """Load from a `pruning_plan.json` path or an already parsed dict; raises PlanError."""
        if isinstance(source, dict):
            data, where = source, "plan"
        else:
            where = str(source)
            try:
                data = json.loads(Path(source).read_text())
            except json.JSONDecodeError as err:
                raise PlanError(f"{where}: not valid JSON ({err})") from err
        return cls._from_dict(data, where)

    @classmethod
    def _from_dict(cls, data: Any, where: str) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise PlanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
        missing = sorted(_TOP_KEYS - set(data))
        if missing:
            raise PlanError(f"{where}: missing key(s) {missing}")
        if data["format"] != PLAN_FORMAT:
            raise PlanError(f"{where}: format must be {PLAN_FORMAT!r}, got {data['format']!r}")
        if not isinstance(data["layers"], list):
            raise PlanError(f"{where}: 'layers' must be a list")
        layers = []
        for idx, layer in enumerate(data["layers"]):
            key = f"{where}: layers[{idx}]"
            if not isinstance(layer, dict):
                raise PlanError(f"{key} must be an object")
            unknown = sorted(set(layer) - _LAYER_KEYS)
            if unknown:
                raise PlanError(f"{key}: unknown key(s) {unknown}; allowed: {sorted(_LAYER_KEYS)}")
            if "heads" not in layer or "mlp" not in layer:
                raise PlanError(f"{key}: needs 'heads' and 'mlp'")
            heads, channels = layer["heads"], layer.get("mlp_channels")
            if not isinstance(heads, list):
                raise PlanError(f"{key}.heads must be a list of head indices")
            if channels is not None and not isinstance(channels, list):
                raise PlanError(f"{key}.mlp_channels must be a list of channel indices")
            layers.append(LayerPlan(heads=tuple(heads), mlp=layer["mlp"],
                                    mlp_channels=None if channels is None else tuple(channels)))
        try:
            return cls(family=data["family"], window=data["window"], num_layers=data["num_layers"],
                       num_heads=data["num_heads"], layers=tuple(layers))
        except PlanError as err:
            raise PlanError(f"{where}: {err}") from None

    # ---- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            entry: dict[str, Any] = {"heads": list(layer.heads), "mlp": layer.mlp}
            if layer.mlp_channels is not None:
                entry["mlp_channels"] = list(layer.mlp_channels)
            layers.append(entry)
        return {"format": PLAN_FORMAT, "family": self.family, "window": self.window,
                "num_layers": self.num_layers, "num_heads": self.num_heads, "layers": layers}

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    # ---- views used by gates and the FLOPs model ---------------------------------------------
    def head_mask(self) -> list[list[bool]]:
        """(num_layers, num_heads) booleans: visual head kept."""
        return [[h in set(layer.heads) for h in range(self.num_heads)] for layer in self.layers]

    def validate_for(self, num_layers: int, num_heads: int, intermediate_size: int | None = None) -> None:
        """Raise PlanError unless the plan fits a model of these dimensions."""
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise PlanError(f"plan is for {self.num_layers} layers x {self.num_heads} heads, "
                            f"the model has {num_layers} x {num_heads}")
        if intermediate_size is None:
            return
        for idx, layer in enumerate(self.layers):
            if layer.mlp_channels and max(layer.mlp_channels) >= intermediate_size:
                raise PlanError(f"layers[{idx}].mlp_channels: channel {max(layer.mlp_channels)} is out of range "
                                f"for intermediate size {intermediate_size}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(plan: Plan) -> None:
    if not isinstance(plan.family, str) or not plan.family:
        raise PlanError(f"family must be a non-empty string, got {plan.family!r}")
    if plan.window is not None and (not _is_int(plan.window) or plan.window < 1 or plan.window % 2 == 0):
        raise PlanError(f"window must be null or an odd positive integer, got {plan.window!r}")
    for name in ("num_layers", "num_heads"):
        value = getattr(plan, name)
        if not _is_int(value) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if len(plan.layers) != plan.num_layers:
        raise PlanError(f"layers has {len(plan.layers)} entries, num_layers is {plan.num_layers}")
    for idx, layer in enumerate(plan.layers):
        for pos, head in enumerate(layer.heads):
            if not _is_int(head) or not 0 <= head < plan.num_heads:
                raise PlanError(f"layers[{idx}].heads[{pos}] = {head!r} is not a head index in [0, {plan.num_heads})")
        if len(set(layer.heads)) != len(layer.heads):
            raise PlanError(f"layers[{idx}].heads has duplicates: {list(layer.heads)}")
        if not isinstance(layer.mlp, bool):
            raise PlanError(f"layers[{idx}].mlp must be true or false, got {layer.mlp!r}")
        if layer.mlp_channels is not None:
            if not layer.mlp:
                raise PlanError(f"layers[{idx}].mlp_channels is given but mlp is false")
            for pos, channel in enumerate(layer.mlp_channels):
                if not _is_int(channel) or channel < 0:
                    raise PlanError(f"layers[{idx}].mlp_channels[{pos}] = {channel!r} is not a channel index")
            if len(set(layer.mlp_channels)) != len(layer.mlp_channels):
                raise PlanError(f"layers[{idx}].mlp_channels has duplicates")
