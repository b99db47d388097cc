"""`pruning_plan.json`, the exchange format between training, hardening and users: which visual
heads, visual MLPs (and MLP channels) each layer keeps, which layers only lend their visual keys
(frozen), and the neighbour window. Validation only;
executing a plan is `gates.apply_plan`'s job. The plan's `window` is an odd w (w x w on each grid), null (no window), or
`[t, w, w]`: a spatio-temporal window whose keys also come from the t//2 temporal slices of the same video on
either side (docs/design.md rule 1)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLAN_FORMAT = "visprune-plan/1"
PLAN_FILE = "pruning_plan.json"  # the plan inside an exported folder
# every MLP channel of every layer listed (80 layers x 29568 channels, indent 1) is about 24 MiB
MAX_PLAN_BYTES = 64 * 2**20
_TOP_KEYS = {"format", "family", "window", "num_layers", "num_heads", "layers"}
_LAYER_KEYS = {"heads", "mlp", "mlp_channels", "frozen", "window"}


class PlanError(ValueError):
    """A pruning plan that does not validate; the message names the offending key."""


def parse_window(value: Any, name: str = "window") -> tuple[int | None, int]:
    """(spatial, temporal) of a window as plans and recipes write it: null (no window: (None, 1)), an odd w
    ((w, 1)) or `[t, h, w]` with h == w, all odd positive ((w, t)).

    Raises:
        ValueError: naming `name` and the value.
    """
    if value is None or _is_int(value):
        check_odd(value, name, allow_none=True)
        return value, 1
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) for v in value):
        t, h, w = value
        for part, part_name in ((t, "t"), (h, "h"), (w, "w")):
            check_odd(part, f"{name} [t, h, w]: {part_name}", allow_none=False)
        if h != w:
            raise ValueError(f"{name} [t, h, w] must be square on the grid (h == w), got {show_value(list(value))}")
        return w, t
    raise ValueError(f"{name} must be null, an odd positive integer or [t, h, w] (odd, h == w), "
                     f"got {show_value(value)}")


def window_value(spatial: int | None, temporal: int) -> int | None | list[int]:
    """The window as plans and recipes write it (`parse_window`'s inverse): w, null, or [t, w, w] when t > 1."""
    return spatial if temporal == 1 else [temporal, spatial, spatial]


def check_odd(value: Any, name: str, allow_none: bool, error: type[ValueError] = ValueError) -> None:
    """Raise `error` naming `name` unless `value` is an odd positive int (or None with `allow_none`)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1 or value % 2 == 0:
        raise error(f"{name} must be {'null or ' if allow_none else ''}an odd positive integer, "
                    f"got {show_value(value)}")


@dataclass(frozen=True)
class LayerPlan:
    heads: tuple[int, ...]  # visual heads kept (effective gate e = 1)
    mlp: bool  # visual MLP kept
    mlp_channels: tuple[int, ...] | None = None  # intermediate channels kept by visual rows; None = all
    # visual rows are not updated (freeze gate a = 0): their K/V of the kept heads' groups are still computed and
    # read by text queries; no visual Q, attention, output projection or MLP (docs/design.md rule 7)
    frozen: bool = False
    window: int | None = None  # this layer's neighbour window (odd); None: the plan's `window`

    @property
    def skipped(self) -> bool:
        """Visual tokens take no part in this layer (router r = 0)."""
        return not self.heads and not self.mlp

    @property
    def updated(self) -> bool:
        """Visual rows are computed and updated in this layer (neither skipped nor frozen)."""
        return not self.skipped and not self.frozen


@dataclass(frozen=True)
class Plan:
    family: str
    window: int | None  # the spatial window w (w x w on a grid); None: no window
    num_layers: int
    num_heads: int
    layers: tuple[LayerPlan, ...] = field(default_factory=tuple)
    # temporal slices a video token's window spans (odd t: t//2 slices of the same video on either side); 1: its own
    temporal_window: int = 1
    source: str | None = field(default=None, compare=False, repr=False)  # the file it was read from

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
        """Load from a `pruning_plan.json` path or an already parsed dict; raises PlanError.

        A file is refused above MAX_PLAN_BYTES, with duplicate keys or with NaN / Infinity literals.
        """
        if isinstance(source, dict):
            return cls._from_dict(source, "plan")
        where = str(source)
        return cls._from_dict(_read_plan_file(where), where, source=where)

    @classmethod
    def _from_dict(cls, data: Any, where: str, source: str | None = None) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise PlanError(f"{where}: unknown key(s) {_show_keys(unknown)}; allowed: {sorted(_TOP_KEYS)}")
        missing = sorted(_TOP_KEYS - set(data))
        if missing:
            raise PlanError(f"{where}: missing key(s) {missing}")
        if data["format"] != PLAN_FORMAT:
            raise PlanError(f"{where}: format must be {PLAN_FORMAT!r}, got {show_value(data['format'])}")
        if not isinstance(data["layers"], list):
            raise PlanError(f"{where}: 'layers' must be a list")
        layers = []
        for idx, layer in enumerate(data["layers"]):
            key = f"{where}: layers[{idx}]"
            if not isinstance(layer, dict):
                raise PlanError(f"{key} must be an object")
            unknown = sorted(set(layer) - _LAYER_KEYS)
            if unknown:
                raise PlanError(f"{key}: unknown key(s) {_show_keys(unknown)}; allowed: {sorted(_LAYER_KEYS)}")
            if "heads" not in layer or "mlp" not in layer:
                raise PlanError(f"{key}: needs 'heads' and 'mlp'")
            heads, channels = layer["heads"], layer.get("mlp_channels")
            if not isinstance(heads, list):
                raise PlanError(f"{key}.heads must be a list of head indices")
            if channels is not None and not isinstance(channels, list):
                raise PlanError(f"{key}.mlp_channels must be a list of channel indices")
            layers.append(LayerPlan(heads=tuple(heads), mlp=layer["mlp"],
                                    mlp_channels=None if channels is None else tuple(channels),
                                    frozen=layer.get("frozen", False), window=layer.get("window")))
        try:
            window, temporal = parse_window(data["window"])
        except ValueError as err:
            raise PlanError(f"{where}: {err}") from None
        try:
            return cls(family=data["family"], window=window, num_layers=data["num_layers"],
                       num_heads=data["num_heads"], layers=tuple(layers), temporal_window=temporal, source=source)
        except PlanError as err:
            raise PlanError(f"{where}: {err}") from None

    # ---- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            entry: dict[str, Any] = {"heads": list(layer.heads), "mlp": layer.mlp}
            if layer.mlp_channels is not None:
                entry["mlp_channels"] = list(layer.mlp_channels)
            if layer.frozen:
                entry["frozen"] = True
            if layer.window is not None:
                entry["window"] = layer.window
            layers.append(entry)
        return {"format": PLAN_FORMAT, "family": self.family, "window": window_value(self.window, self.temporal_window),
                "num_layers": self.num_layers, "num_heads": self.num_heads, "layers": layers}

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    # ---- views used by gates and the FLOPs model ---------------------------------------------
    def layer_window(self, layer_idx: int) -> int | None:
        """The neighbour window of layer `layer_idx`: its own `window`, else the plan's."""
        own = self.layers[layer_idx].window
        return self.window if own is None else own

    def windows(self) -> int | None | tuple[int | None, ...]:
        """What the FLOPs model takes as `window`: the plan's window, or per layer when a layer has its own."""
        if all(layer.window is None for layer in self.layers):
            return self.window
        return tuple(self.layer_window(i) for i in range(len(self.layers)))

    def head_mask(self) -> list[list[bool]]:
        """(num_layers, num_heads) booleans: visual head kept."""
        return [[h in set(layer.heads) for h in range(self.num_heads)] for layer in self.layers]

    def validate_for(self, num_layers: int, num_heads: int, intermediate_size: int | None = None,
                     family: str | None = None) -> None:
        """Raise PlanError unless the plan fits a model of these dimensions (and of `family`, when given:
        a plan of another family would keep other heads than the ones it names). Messages start with
        the plan's file when it was read from one."""
        where = f"{self.source}: " if self.source else ""
        if family is not None and self.family != family:
            raise PlanError(f"{where}plan is for family {show_value(self.family)}, the model is {family!r}")
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise PlanError(f"{where}plan is for {self.num_layers} layers x {self.num_heads} heads, "
                            f"the model has {num_layers} x {num_heads}")
        if intermediate_size is None:
            return
        for idx, layer in enumerate(self.layers):
            if layer.mlp_channels and max(layer.mlp_channels) >= intermediate_size:
                raise PlanError(f"{where}layers[{idx}].mlp_channels: channel {max(layer.mlp_channels)} is out of "
                                f"range for intermediate size {intermediate_size}")


def _read_plan_file(where: str) -> Any:
    """The JSON value of a plan file: at most MAX_PLAN_BYTES, UTF-8, no duplicate keys, no NaN / Infinity."""
    return read_json_file(where, MAX_PLAN_BYTES, "plan", PlanError)


def read_json_file(where: str | Path, max_bytes: int, what: str, error: type[ValueError] = ValueError) -> Any:
    """The JSON value of a small file the user hands visprune (a plan, a model or processor config): at most
    `max_bytes` (read no further), UTF-8, no duplicate keys (json.loads would keep the last silently), no
    NaN / Infinity literals, no nesting past the stack. Failures raise `error` naming the file and `what`."""
    try:
        with open(where, "rb") as file:
            raw = file.read(max_bytes + 1)
    except OSError as err:
        raise error(f"{where}: cannot read {what}: {err.strerror or err}") from None
    if len(raw) > max_bytes:
        raise error(f"{where}: a {what} must be at most {max_bytes} bytes; this file is larger")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_without_duplicates, parse_constant=_no_constant)
    except _JSONValueError as err:
        raise error(f"{where}: {err}") from None
    except UnicodeDecodeError as err:
        raise error(f"{where}: a {what} must be UTF-8 text (byte {err.start} is not)") from None
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an int of thousands of digits; nesting past the stack
        text = "nested too deeply" if isinstance(err, RecursionError) else _shorten(str(err), 120)
        raise error(f"{where}: not valid JSON ({text})") from None


class _JSONValueError(ValueError):
    """A duplicate key or a NaN / Infinity literal, found while decoding."""


def _without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook`: refuse a key that occurs twice in one object."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JSONValueError(f"duplicate key {show_value(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    """`parse_constant`: NaN, Infinity and -Infinity are not JSON, though json.loads reads them."""
    raise _JSONValueError(f"{name} is not a valid JSON value")


def show_value(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: messages never print a whole (hostile) value."""
    try:
        return _shorten(repr(value), limit)
    except ValueError:  # an int past Python's digit limit
        return f"<{type(value).__name__} too large to show>"


def _show_keys(keys: list[Any]) -> str:
    shown = show_value(keys[:5])
    return shown if len(keys) <= 5 else f"{shown} and {len(keys) - 5} more"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(plan: Plan) -> None:
    if not isinstance(plan.family, str) or not plan.family:
        raise PlanError(f"family must be a non-empty string, got {show_value(plan.family)}")
    check_odd(plan.window, "window", allow_none=True, error=PlanError)
    check_odd(plan.temporal_window, "window [t, h, w]: t", allow_none=False, error=PlanError)
    if plan.temporal_window > 1 and plan.window is None:
        raise PlanError("a temporal window needs a spatial one: window [t, h, w] cannot have no window on the grid")
    for name in ("num_layers", "num_heads"):
        value = getattr(plan, name)
        if not _is_int(value) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {show_value(value)}")
    if len(plan.layers) != plan.num_layers:
        raise PlanError(f"layers has {len(plan.layers)} entries, num_layers is {plan.num_layers}")
    for idx, layer in enumerate(plan.layers):
        for pos, head in enumerate(layer.heads):
            if not _is_int(head) or not 0 <= head < plan.num_heads:
                raise PlanError(f"layers[{idx}].heads[{pos}] = {show_value(head)} is not a head index "
                                f"in [0, {plan.num_heads})")
        if len(set(layer.heads)) != len(layer.heads):
            raise PlanError(f"layers[{idx}].heads has duplicates: {show_value(list(layer.heads))}")
        if not isinstance(layer.mlp, bool):
            raise PlanError(f"layers[{idx}].mlp must be true or false, got {show_value(layer.mlp)}")
        if layer.window is not None and (not _is_int(layer.window) or layer.window < 1 or layer.window % 2 == 0):
            raise PlanError(f"layers[{idx}].window must be an odd positive integer (absent: the plan's window), "
                            f"got {show_value(layer.window)}")
        if not isinstance(layer.frozen, bool):
            raise PlanError(f"layers[{idx}].frozen must be true or false, got {show_value(layer.frozen)}")
        if layer.frozen and layer.mlp:
            raise PlanError(f"layers[{idx}] is frozen and keeps the MLP: frozen visual rows run no MLP")
        if layer.frozen and not layer.heads:
            raise PlanError(f"layers[{idx}] is frozen and keeps no head: text reads frozen visual keys through kept "
                            "heads; a layer without heads is skipped (heads [] and mlp false, no 'frozen')")
        if layer.mlp_channels is not None:
            if not layer.mlp:
                raise PlanError(f"layers[{idx}].mlp_channels is given but mlp is false")
            for pos, channel in enumerate(layer.mlp_channels):
                if not _is_int(channel) or channel < 0:
                    raise PlanError(f"layers[{idx}].mlp_channels[{pos}] = {show_value(channel)} is not a channel index")
            if len(set(layer.mlp_channels)) != len(layer.mlp_channels):
                raise PlanError(f"layers[{idx}].mlp_channels has duplicates")
