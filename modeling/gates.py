"""GateSet: owns every gate of a model (head gates L x H, visual-skip routers L, visual MLP gates L, and
optionally MLP channel-block gates and freeze gates L),
and attaches them: attention wrappers, the registered attention function, and a pre-hook that
computes the visual layout and the gate values once per forward. `apply_plan` fixes gates to a plan."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .families import (
    Family,
    LayerSlot,
    TextDims,
    VisualAttentionWrapper,
    VisualMLPWrapper,
    family_for,
    forward_inputs,
    suppress_in_generation,
)
from .flops import GateProbs, ModelDims, TokenLayout, default_layout, visual_flops
from .gated_attention import CTX_KWARG, FLEX_NAME, SDPA_NAME, GateValues, VisualContext
from .hard_concrete import LOG_ALPHA_LIMIT, FixedGate, HardConcreteGate
from .plan import LayerPlan, Plan, check_odd

GATES_ATTR = "visprune_gates"  # the GateSet's name as a submodule of the multimodal model
BACKENDS = ("auto", "sdpa", "flex")


@dataclass
class GateConfig:
    """Which gates exist and how the visual attention is computed: the one schema of a recipe's `gates`
    section (the window is the recipe's top-level `window`) and of the config saved beside trained gates
    (`gates.safetensors` metadata), which is what hardening rebuilds."""

    heads: bool = True  # head gates g[l, h]
    visual_skip: bool = True  # visual-skip routers r[l]
    visual_mlp: bool = True  # visual MLP gates m[l]
    # channel gates c[l, b] over blocks of this many intermediate channels of the visual MLP (the last block of a
    # layer may be smaller); None: the visual MLP is kept or dropped whole (docs/design.md, learned MLP channels)
    mlp_channel_block: int | None = None
    # freeze gates a[l]: open = the layer updates its visual rows; closed with the router open = the layer is
    # frozen for visual tokens (no visual Q, attention, O or MLP; text still reads their K/V; docs/design.md rule 7)
    visual_freeze: bool = False
    # ring gates z[l, k] on the rings of the neighbour window (keys at Chebyshev distance exactly k = 1..window//2),
    # nested: ring k counts only while rings 1..k are open; a plan keeps a per-layer window (docs/design.md rule 1)
    window_rings: bool = False
    # neighbour window w (w x w on the grid); None = ordinary causal attention; a recipe's top-level `window`
    window: int | None = field(default=5, metadata={"recipe_key": "window"})
    # temporal slices of the same video a video token's window spans (odd; t of a recipe's `window: [t, h, w]`)
    temporal_window: int = field(default=1, metadata={"recipe_key": "window"})
    init_log_alpha: float = 2.0  # P(open) ~ 0.97 at the start: the gated model starts near the dense one
    backend: str = "auto"  # "sdpa", "flex", or "auto" (flex on CUDA when available, else sdpa)
    per_sample: bool = True  # training draws independent gates for every sample of a batch (else one draw)
    temperature: float = 2.0 / 3.0  # hard-concrete temperature at the end of training (eval and hardening use it)
    temperature_start: float | None = None  # anneal from this temperature at step 0 to `temperature`; None: constant

    def __post_init__(self) -> None:
        if self.window is not None and (self.window < 1 or self.window % 2 == 0):
            raise ValueError(f"window must be None or an odd positive integer, got {self.window}")
        check_odd(self.temporal_window, "temporal_window", allow_none=False)
        if self.temporal_window > 1 and self.window is None:
            raise ValueError("a temporal window needs a window on the grid (window [t, h, w])")
        if not math.isfinite(self.init_log_alpha):
            raise ValueError(f"init_log_alpha must be a finite number, got {self.init_log_alpha}")
        for name in ("temperature", "temperature_start"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.window_rings, bool):
            raise ValueError(f"window_rings must be true or false, got {self.window_rings!r}")  # noqa: TRY004
        if self.window_rings and (self.window is None or self.window < 3):
            raise ValueError(f"window_rings learns a radius inside the window: it needs a window of 3 or more, "
                             f"got {self.window}")
        if not isinstance(self.visual_freeze, bool):
            raise ValueError(f"visual_freeze must be true or false, got {self.visual_freeze!r}")  # noqa: TRY004 (one error type for a config)
        block = self.mlp_channel_block
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(f"mlp_channel_block must be null or a positive integer, got {block!r}")


def _pick_backend(backend: str, model: nn.Module) -> str:
    if backend != "auto":
        return backend
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return "sdpa"
    on_cuda = any(p.is_cuda for p in model.parameters())
    return "flex" if on_cuda else "sdpa"


class GateSet(nn.Module):
    """All gates of one model; calling it returns this forward's effective `GateValues`.

    Gates that a config disables are constant ones. `train()` samples, `eval()` is deterministic.
    """

    def __init__(self, dims: TextDims, cfg: GateConfig, family: str,
                 image_grid: tuple[int, int] | None = None,
                 image_extras: tuple[tuple[tuple[int, int], ...], int] = ((), 0)) -> None:
        super().__init__()
        self.dims, self.cfg, self.family, self.image_grid = dims, cfg, family, image_grid
        self.image_extras = image_extras  # further grids and non-grid tokens of an image (FLOPs model)
        L, H = dims.num_layers, dims.num_heads
        t = cfg.temperature
        self.head = HardConcreteGate((L, H), cfg.init_log_alpha, t) if cfg.heads else FixedGate(torch.ones(L, H))
        self.router = HardConcreteGate((L,), cfg.init_log_alpha, t) if cfg.visual_skip else FixedGate(torch.ones(L))
        self.mlp = HardConcreteGate((L,), cfg.init_log_alpha, t) if cfg.visual_mlp else FixedGate(torch.ones(L))
        block = cfg.mlp_channel_block
        self.channel_block = None if block is None else min(block, dims.intermediate_size)
        # c[l, b]: None without channel gates (kept out of the module tree, so checkpoints without them load)
        self.channels = (None if block is None else
                         HardConcreteGate((L, math.ceil(dims.intermediate_size / self.channel_block)),
                                          cfg.init_log_alpha, t))
        self._block_sizes = (None if block is None else  # (B,) channels per block, the last possibly fewer
                             torch.tensor([min(self.channel_block, dims.intermediate_size - start)
                                           for start in range(0, dims.intermediate_size, self.channel_block)],
                                          dtype=torch.float32))
        # a[l]: None without freeze gates (kept out of the module tree, so checkpoints without them load)
        self.update = HardConcreteGate((L,), cfg.init_log_alpha, t) if cfg.visual_freeze else None
        # z[l, k-1] for ring k: None without ring gates (kept out of the module tree, so older checkpoints load)
        self.rings = HardConcreteGate((L, cfg.window // 2), cfg.init_log_alpha, t) if cfg.window_rings else None
        self.window, self.temporal_window = cfg.window, cfg.temporal_window
        self.layer_windows: dict[int, int] = {}  # a plan's per-layer windows (`apply_plan`), over `window`
        self.mlp_channel_masks: dict[int, torch.Tensor] = {}
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> its layout
        self._handles: list[Any] = []
        self._restore: dict[str, Any] = {}
        self._open_all = False
        self._plan_request: tuple[float, TokenLayout | None, bool, Plan | None, bool] | None = None  # plan_forward
        self.last_probs: GateProbs | None = None  # P(open) of the latest forward, for the FLOPs constraint
        self.last_plan: Plan | None = None  # the plan of the latest plan_forward forward

    def forward(self, batch_size: int = 1) -> GateValues:
        """This forward's effective gates, with a leading sample dimension N: one draw per sample
        (N = `batch_size`) in training with `cfg.per_sample`, else N = 1 (shared by the batch). Also
        records `last_probs` (computed here so that ZeRO-3 has gathered the gate parameters)."""
        L, H = self.dims.num_layers, self.dims.num_heads
        if self._open_all:
            ones = torch.ones(1, L, device=self.device)
            return GateValues(head=torch.ones(1, L, H, device=self.device), router=ones, mlp=ones)
        if self._plan_request is not None:
            return self._plan_values()
        num_samples = batch_size if self.cfg.per_sample else 1
        (g, p_g), (r, p_r), (m, p_m) = self.head(num_samples), self.router(num_samples), self.mlp(num_samples)
        c, p_c = self.channels(num_samples) if self.channels is not None else (None, None)
        a, p_a = self.update(num_samples) if self.update is not None else (None, None)
        z, p_z = self.rings(num_samples) if self.rings is not None else (None, None)
        self.last_probs = GateProbs(head=p_g, layer=p_r, mlp=p_m, mlp_channels=self._channel_fractions(p_c),
                                    update=p_a, rings=p_z)
        g, r, m = g.reshape(-1, L, H), r.reshape(-1, L), m.reshape(-1, L)  # (N, L, H), (N, L): N = 1 or batch
        a = None if a is None else a.reshape(-1, L)
        rings = None if z is None else torch.cumprod(z.reshape(-1, *self.rings.shape), dim=-1)  # nested
        return GateValues(head=r[:, :, None] * g, router=r, mlp=r * m if a is None else r * a * m,
                          channels=None if c is None else c.reshape(-1, *self.channels.shape), update=a, rings=rings)

    @property
    def device(self) -> torch.device:
        gate = self.head
        return (gate.log_alpha if isinstance(gate, HardConcreteGate) else gate.values).device

    @contextlib.contextmanager
    def open_all(self) -> Iterator[None]:
        """Within this context every gate is 1 and the window is off: the dense model (the
        self-distillation teacher, with adapters disabled), without a second copy of the weights."""
        saved = self._open_all, self.window, self.layer_windows
        self._open_all, self.window, self.layer_windows = True, None, {}
        try:
            yield
        finally:
            self._open_all, self.window, self.layer_windows = saved

    @contextlib.contextmanager
    def plan_forward(self, budget: float, layout: TokenLayout | None = None, fill: bool = False,
                     plan: Plan | None = None, record_probs: bool = False) -> Iterator[None]:
        """Within this context every forward runs the hardened plan of the gates as they are at that forward,
        `to_plan(budget, layout, fill)`, or `plan` when given (e.g. one of `candidate_plans`): effective gates
        exactly 0 or 1, shared by the batch, in train mode too. Gradients reach `log_alpha` straight through:
        each 0/1 value carries the gradient of its effective P(open) (P(r open) x P(g open)), so a loss
        computed here also says which units the plan should hold. `last_probs` is left as the latest sampled
        forward set it (with `record_probs`: set to this forward's P(open), as a sampled forward does);
        `last_plan` is the plan run."""
        saved = self._plan_request
        self._plan_request = (budget, layout, fill, plan, record_probs)
        try:
            yield
        finally:
            self._plan_request = saved

    def _plan_values(self) -> GateValues:
        budget, layout, fill, plan, record_probs = self._plan_request
        L, H = self.dims.num_layers, self.dims.num_heads
        # P(open) through each gate module's own forward, so that ZeRO-3 gathers its parameters first
        p_g, p_r, p_m = (gate(probs_only=True)[1].float() for gate in (self.head, self.router, self.mlp))
        p_c = self.channels(probs_only=True)[1].float() if self.channels is not None else None
        p_a = self.update(probs_only=True)[1].float() if self.update is not None else None
        p_z = self.rings(probs_only=True)[1].float() if self.rings is not None else None
        if record_probs:
            self.last_probs = GateProbs(head=p_g, layer=p_r, mlp=p_m, mlp_channels=self._channel_fractions(p_c),
                                        update=p_a, rings=p_z)
        if plan is None:
            plan = self._plan_from_scores(_scores_from_probs(p_g, p_r, p_m, p_c, p_a, p_z), budget, layout, fill)
        self.last_plan = plan
        hard = GateProbs.from_plan(plan, self.dims.intermediate_size)
        device = p_g.device

        def straight_through(value: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
            return value.to(device) + (prob - prob.detach())  # exactly the 0/1 value, the gradient of prob

        channels = update = None
        if p_c is not None:
            channels = straight_through(self.plan_blocks(plan), p_c).reshape(1, *self.channels.shape)
        p_u = p_r * p_m
        if p_a is not None:
            frozen = torch.tensor([0.0 if layer.frozen else 1.0 for layer in plan.layers])
            update = straight_through(frozen, p_a).reshape(1, L)
            p_u = p_u * p_a
        rings = None
        if p_z is not None:
            rings = straight_through(self.plan_rings(plan), torch.cumprod(p_z, dim=-1)).reshape(1, *self.rings.shape)
        return GateValues(head=straight_through(hard.head, p_r[:, None] * p_g).reshape(1, L, H),
                          router=straight_through(hard.layer, p_r).reshape(1, L),
                          mlp=straight_through(hard.mlp, p_u).reshape(1, L), channels=channels, update=update,
                          rings=rings)

    def block_sizes(self) -> torch.Tensor:
        """(B,) channels in each block of the channel gates (the last may be smaller)."""
        return self._block_sizes.clone()

    def plan_blocks(self, plan: Plan) -> torch.Tensor:
        """(L, B) 0/1: the channel blocks `plan` keeps for visual rows (all of a layer whose MLP is kept
        whole, none of a dropped one). Raises ValueError when a plan keeps part of a block."""
        L, block = self.dims.num_layers, self.channel_block
        blocks = torch.zeros(self.channels.shape)
        for layer_idx, layer in enumerate(plan.layers[:L]):
            if not layer.mlp:
                continue
            if layer.mlp_channels is None:
                blocks[layer_idx] = 1.0
                continue
            kept = set(layer.mlp_channels)
            for b in range(blocks.shape[1]):
                inside = set(range(b * block, min((b + 1) * block, self.dims.intermediate_size)))
                if inside <= kept:
                    blocks[layer_idx, b] = 1.0
                elif inside & kept:
                    raise ValueError(f"layer {layer_idx} of the plan keeps part of channel block {b} "
                                     f"(gates.mlp_channel_block {block}): not a plan of these channel gates")
        return blocks

    def plan_rings(self, plan: Plan) -> torch.Tensor:
        """(L, R) 0/1: the rings of each layer's window that `plan` keeps (ring k open when k <= its window // 2).
        Raises ValueError when a layer's window is none or wider than the ring gates' window."""
        R = self.rings.shape[1]
        rings = torch.zeros(self.rings.shape)
        for layer_idx in range(self.dims.num_layers):
            window = plan.layer_window(layer_idx)
            if window is None or window // 2 > R:
                raise ValueError(f"layer {layer_idx} of the plan has window {window}: ring gates learn windows of at "
                                 f"most {2 * R + 1} (the run's window)")
            rings[layer_idx, : window // 2] = 1.0
        return rings

    def prob_open(self) -> GateProbs:
        """P(gate != 0) of the raw gates, for the expected-FLOPs model."""
        p_c = self.channels.prob_open() if self.channels is not None else None
        p_a = self.update.prob_open() if self.update is not None else None
        p_z = self.rings.prob_open() if self.rings is not None else None
        return GateProbs(head=self.head.prob_open(), layer=self.router.prob_open(), mlp=self.mlp.prob_open(),
                         mlp_channels=self._channel_fractions(p_c), update=p_a, rings=p_z)

    def _channel_fractions(self, p_c: torch.Tensor | None = None) -> torch.Tensor | None:
        """(L,) expected share of MLP channels visual rows keep: from the channel gates' P(open) (`p_c`,
        weighted by block size), or from fixed channel masks; None when neither exists."""
        if p_c is not None:
            sizes = self._block_sizes.to(p_c.device)
            return (p_c.float() * sizes).sum(dim=-1) / float(self.dims.intermediate_size)
        if not self.mlp_channel_masks:
            return None
        frac = torch.ones(self.dims.num_layers)
        for layer_idx, mask in self.mlp_channel_masks.items():
            frac[layer_idx] = mask.float().mean()
        return frac

    def committed_log_alpha(self, plan: Plan) -> dict[str, torch.Tensor]:
        """`log_alpha` of every learnable gate committed to `plan` (CPU float32, by parameter name): +-LOG_ALPHA_LIMIT,
        a layer's router open when the plan keeps any of its units, each head and MLP gate open when the plan
        keeps it, each freeze gate closed where the plan freezes its layer. P(open) is then about 1 or about e^-10, so `to_plan` at a budget that `plan` fills returns
        `plan` (a fill plan leaves no unit that still fits, so the prefix rule does too)."""
        L, H = self.dims.num_layers, self.dims.num_heads
        if (plan.num_layers, plan.num_heads) != (L, H):
            raise ValueError(f"a plan for {plan.num_layers} x {plan.num_heads} heads, gates of {L} x {H}")
        if plan.temporal_window != self.temporal_window:
            raise ValueError(f"the plan's temporal window is {plan.temporal_window}, these gates' {self.temporal_window} "
                             "(window [t, h, w]): gates cannot learn another")
        head = torch.full((L, H), -LOG_ALPHA_LIMIT)
        router, mlp = torch.full((L,), -LOG_ALPHA_LIMIT), torch.full((L,), -LOG_ALPHA_LIMIT)
        for layer_idx, layer in enumerate(plan.layers):
            head[layer_idx, list(layer.heads)] = LOG_ALPHA_LIMIT
            mlp[layer_idx] = LOG_ALPHA_LIMIT if layer.mlp else -LOG_ALPHA_LIMIT
            router[layer_idx] = -LOG_ALPHA_LIMIT if layer.skipped else LOG_ALPHA_LIMIT
        values = [("head", head), ("router", router), ("mlp", mlp)]
        if self.channels is not None:
            values.append(("channels", self.plan_blocks(plan) * 2 * LOG_ALPHA_LIMIT - LOG_ALPHA_LIMIT))
        if self.update is not None:
            values.append(("update", torch.tensor([-LOG_ALPHA_LIMIT if layer.frozen else LOG_ALPHA_LIMIT
                                                   for layer in plan.layers])))
        elif any(layer.frozen for layer in plan.layers):
            raise ValueError("the plan freezes layers but these gates have no freeze gates (gates.visual_freeze)")
        if self.rings is not None:
            values.append(("rings", self.plan_rings(plan) * 2 * LOG_ALPHA_LIMIT - LOG_ALPHA_LIMIT))
        return {f"{name}.log_alpha": value.reshape(getattr(self, name).shape)  # (ZeRO-3 empties log_alpha.shape)
                for name, value in values if isinstance(getattr(self, name), HardConcreteGate)}

    @torch.no_grad()
    def commit_to(self, plan: Plan) -> None:
        """Write `committed_log_alpha(plan)` into the gates (under ZeRO-3, inside a gather of the gate
        parameters), so the gates harden to `plan`."""
        for name, value in self.committed_log_alpha(plan).items():
            param = getattr(self, name.split(".")[0]).log_alpha
            param.copy_(value.to(param))

    def to_plan(self, budget: float, layout: TokenLayout | None = None, fill: bool = False) -> Plan:
        """Harden the gates: deterministic top-k by `log_alpha` under the visual-FLOPs budget.

        Units are the visual heads (l, h) and visual MLPs (l), or with channel gates the MLP's channel
        blocks (l, b); a unit's score is the log-probability that its effective gate is open,
        log P(r[l] != 0) + log P(g[l,h] != 0) (MLP: + log P(m[l]) instead; block: + log P(m[l]) +
        log P(c[l,b])), from the
        log_alphas; with freeze gates each layer also has an *update* unit (l), scored log P(r[l]) +
        log P(a[l]) and costing the query side of the layer's kept heads (Q, attention, O), and the MLP
        and its blocks add log P(a[l]); a layer with kept heads and no update unit is frozen (rule 7), and
        an MLP unit brings its layer's update unit with it. The hierarchy holds (no unit outranks its layer's router) and a strong head in a
        layer the router kept open part of the time ranks by how often training used it. Units are
        added in score order while the plan's visual FLOPs (the one FLOPs model, with this GateSet's
        window) stay within `budget` x dense; the first unit that does not fit ends the plan (the
        *prefix* rule). The ranking is global, so a smaller budget keeps a subset of a larger one.

        With `fill`, the scan goes on past a unit that does not fit and adds every later-ranked unit
        that still fits (the *fill* rule): the plan uses more of its budget (one visual MLP can cost
        a fifth of a small model's visual FLOPs), but a smaller budget no longer keeps a subset of a
        larger one.

        Args:
            budget: fraction of the dense visual FLOPs (the paper's unit), in (0, 1].
            layout: token layout costed; default one image with 35 system and 60 text tokens.
            fill: the fill rule instead of the prefix rule.
        """
        return self._plan_from_scores(_unit_scores(self), budget, layout, fill)

    def candidate_plans(self, budget: float, count: int, layout: TokenLayout | None = None, fill: bool = False,
                        seed: int = 0) -> list[tuple[Plan, str]]:
        """Up to `count` distinct plans at `budget`: first `to_plan`'s, then plans that draws of the gates make.

        A draw samples every hard-concrete gate once, as training does; its units rank by their drawn effective
        value r[l]*g[l,h] (MLP: r[l]*a[l]*m[l]; channel block: times c[l,b]; update unit: r[l]*a[l]; a[l] = 1
        without freeze gates), ties broken by `to_plan`'s score, and are hardened by the same rule.
        These are the plans training actually exercised; a short validation pass can pick among them
        (`visprune harden --select-on`). Returns (plan, source) pairs, source "scores" or "draw N".
        """
        first = self.to_plan(budget, layout, fill)
        plans, seen = [(first, "scores")], {first}
        if not self.learnable():
            return plans
        gen = torch.Generator().manual_seed(seed)
        base = {(kind, layer_idx, head_idx): score for score, kind, layer_idx, head_idx in _unit_scores(self)}
        for draw in range(1, 20 * count):
            if len(plans) >= count:
                break
            values = {}
            drawn = {}
            names = ("head", "router", "mlp") + tuple(name for name in ("channels", "update", "rings")
                                                      if getattr(self, name) is not None)
            for name in names:
                gate = getattr(self, name)
                if isinstance(gate, HardConcreteGate):
                    u = torch.rand(gate.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
                    drawn[name] = gate.draw(u).detach().cpu()
                else:
                    drawn[name] = gate.values.detach().float().cpu()
            for (kind, layer_idx, head_idx), score in base.items():
                update = drawn["update"][layer_idx] if "update" in drawn else 1.0
                if kind == 4:  # ring head_idx + 1: nested, the product of the rings up to it
                    own = torch.prod(drawn["rings"][layer_idx, : head_idx + 1])
                else:
                    own = (drawn["head"][layer_idx, head_idx] if kind == 0 else update * drawn["mlp"][layer_idx]
                           if kind == 1 else update if kind == 3
                           else update * drawn["mlp"][layer_idx] * drawn["channels"][layer_idx, head_idx])
                value = float(drawn["router"][layer_idx] * own)
                values[(kind, layer_idx, head_idx)] = math.log(max(value, 1e-6)) + 1e-6 * max(score, -1e6)
            plan = self._plan_from_scores([(v, *unit) for unit, v in values.items()], budget, layout, fill)
            if plan not in seen:
                seen.add(plan)
                plans.append((plan, f"draw {draw}"))
        return plans

    def _plan_from_scores(self, scores: list[tuple[float, int, int, int]], budget: float,
                          layout: TokenLayout | None, fill: bool) -> Plan:
        """Harden (score, kind, layer, head) units at `budget` by the prefix or the fill rule (see `to_plan`).
        Kinds: 0 head (l, h), 1 MLP (l), 2 MLP channel block (l, b), 3 update (l, freeze gates only), 4 window
        ring (l, k - 1) of ring gates: ring k of layer l, taken only after ring k - 1 (nested)."""
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        dims = self.model_dims()
        layout = layout or default_layout(dims)
        L, H = self.dims.num_layers, self.dims.num_heads
        order = sorted(scores, key=lambda unit: (-unit[0], unit[1], unit[2], unit[3]))
        limit = budget * float(visual_flops(dims, layout))  # dense: full attention, no window
        head = torch.zeros(L, H)
        mlp = torch.zeros(L)
        sizes = self.block_sizes() if self.channels is not None else None
        blocks = torch.zeros(self.channels.shape) if self.channels is not None else None  # kind 2 units (l, b)
        update = torch.zeros(L) if self.update is not None else None  # kind 3 units (l)
        radius = torch.zeros(L, dtype=torch.long) if self.rings is not None else None  # kind 4 units (l, k - 1)
        windows = lambda r: self.window if r is None else tuple(2 * int(k) + 1 for k in r)
        for _, kind, layer_idx, unit_idx in order:
            trial_radius = radius
            if kind == 4:
                if int(radius[layer_idx]) != unit_idx:  # ring k only after rings 1..k-1
                    continue
                trial_radius = radius.clone()
                trial_radius[layer_idx] = unit_idx + 1
            trial_head, trial_mlp = head.clone(), mlp.clone()
            trial_blocks = blocks.clone() if blocks is not None else None
            trial_update = update.clone() if update is not None else None
            if kind == 0:
                trial_head[layer_idx, unit_idx] = 1.0
            elif kind == 1:
                trial_mlp[layer_idx] = 1.0
            elif kind == 2:
                trial_blocks[layer_idx, unit_idx] = 1.0
                trial_mlp[layer_idx] = 1.0
            elif kind == 3:
                trial_update[layer_idx] = 1.0
            if trial_update is not None and kind in (1, 2):
                trial_update[layer_idx] = 1.0  # visual rows that run the MLP are updated
            router = ((trial_head.sum(dim=1) > 0) | (trial_mlp > 0)).float()
            channels = None if sizes is None else (trial_blocks * sizes).sum(dim=1) / float(sizes.sum())
            probs = GateProbs(trial_head, router, trial_mlp, channels, trial_update)
            cost = float(visual_flops(dims, layout, probs, windows(trial_radius), temporal=self.temporal_window))
            if cost > limit:
                if fill:
                    continue
                break
            head, mlp, blocks, update, radius = trial_head, trial_mlp, trial_blocks, trial_update, trial_radius
        layers = tuple(LayerPlan(heads=tuple(int(h) for h in head[l].nonzero().flatten().tolist()),
                                 mlp=bool(mlp[l] > 0), mlp_channels=self._block_channels(blocks, l),
                                 frozen=update is not None and bool(head[l].any()) and not bool(update[l] > 0),
                                 window=None if radius is None or 2 * int(radius[l]) + 1 == self.window
                                 else 2 * int(radius[l]) + 1)
                       for l in range(L))
        return Plan(family=self.family, window=self.window, num_layers=L, num_heads=H, layers=layers,
                    temporal_window=self.temporal_window)

    def _block_channels(self, blocks: torch.Tensor | None, layer_idx: int) -> tuple[int, ...] | None:
        """The channels of layer `layer_idx`'s kept blocks; None (all) when every block or no block is kept."""
        if blocks is None or bool(blocks[layer_idx].all()) or not bool(blocks[layer_idx].any()):
            return None
        block, size = self.channel_block, self.dims.intermediate_size
        return tuple(channel for b in blocks[layer_idx].nonzero().flatten().tolist()
                     for channel in range(b * block, min((b + 1) * block, size)))

    def model_dims(self) -> ModelDims:
        """The FLOPs model's view of this GateSet's model."""
        if self.image_grid is None:
            raise ValueError("this GateSet does not know its image grid")
        extra_grids, non_grid = self.image_extras
        return ModelDims(name=self.family, family=self.family, image_grid=tuple(self.image_grid),
                         extra_grids=tuple(extra_grids), non_grid_tokens=non_grid, **asdict(self.dims))

    def temperature_at(self, progress: float) -> float:
        """The hard-concrete temperature at `progress` (0 = first step, 1 = last) of training: constant
        `cfg.temperature`, or linear from `cfg.temperature_start` to it."""
        start, end = self.cfg.temperature_start, self.cfg.temperature
        if start is None:
            return end
        return start + (end - start) * min(1.0, max(0.0, progress))

    def gate_modules(self) -> list[HardConcreteGate | FixedGate]:
        """Head gates, routers, MLP gates and, when configured, the MLP channel, freeze and ring gates."""
        return [self.head, self.router, self.mlp] + [gate for gate in (self.channels, self.update, self.rings)
                                                     if gate is not None]

    def set_temperature(self, temperature: float) -> None:
        for gate in self.gate_modules():
            if isinstance(gate, HardConcreteGate):
                gate.temperature = float(temperature)

    def constrain_(self) -> None:
        for gate in self.gate_modules():
            gate.constrain_()

    def learnable(self) -> bool:
        return any(isinstance(g, HardConcreteGate) for g in self.gate_modules())


def _unit_scores(gates: GateSet) -> list[tuple[float, int, int, int]]:
    """(score, kind, layer, head) for every head (kind 0) and MLP (kind 1) unit.

    A unit's score is log P(its effective gate != 0) = log P(r[l] open) + log P(g[l,h] open) (or
    P(m[l] open)): how often training had the unit open. It is monotone in each log_alpha, never above
    the router's own, and ranks a strong head of a contested layer by how much that layer was used.
    Fixed gates have P(open) 0 or 1 (score -inf or the other gate's).
    """

    channels = gates.channels.prob_open() if gates.channels is not None else None
    update = gates.update.prob_open() if gates.update is not None else None
    rings = gates.rings.prob_open() if gates.rings is not None else None
    return _scores_from_probs(gates.head.prob_open(), gates.router.prob_open(), gates.mlp.prob_open(), channels,
                              update, rings)


def _scores_from_probs(head_p: torch.Tensor, router_p: torch.Tensor, mlp_p: torch.Tensor,
                       channel_p: torch.Tensor | None = None,
                       update_p: torch.Tensor | None = None,
                       ring_p: torch.Tensor | None = None) -> list[tuple[float, int, int, int]]:
    """`_unit_scores` from the P(open) tensors of the head (L, H), router (L) and MLP (L) gates. With channel
    gates (`channel_p`, (L, B)) a layer's MLP is B units (kind 2, index b), each scored log P(r) + log P(m)
    + log P(c[l, b]), instead of one. With freeze gates (`update_p`, (L,)) each layer has an update unit
    (kind 3) scored log P(r) + log P(a), and the MLP's units add log P(a). With ring gates (`ring_p`, (L, R)) ring
    k of layer l is a unit (kind 4, index k - 1) scored log P(r) + the sum of log P(z) of rings 1..k (nested)."""
    head, router, mlp = (torch.log(p.detach().float().cpu()) for p in (head_p, router_p, mlp_p))
    blocks = None if channel_p is None else torch.log(channel_p.detach().float().cpu())
    update = None if update_p is None else torch.log(update_p.detach().float().cpu())
    rings = None if ring_p is None else torch.cumsum(torch.log(ring_p.detach().float().cpu()), dim=-1)
    units = []
    for layer_idx in range(head.shape[0]):
        for head_idx in range(head.shape[1]):
            units.append((float(router[layer_idx] + head[layer_idx, head_idx]), 0, layer_idx, head_idx))
        rows = router[layer_idx] + (0.0 if update is None else update[layer_idx])
        if update is not None:
            units.append((float(rows), 3, layer_idx, -1))
        if rings is not None:
            units.extend((float(router[layer_idx] + rings[layer_idx, k]), 4, layer_idx, k) for k in range(rings.shape[1]))
        if blocks is None:
            units.append((float(rows + mlp[layer_idx]), 1, layer_idx, -1))
        else:
            units.extend((float(rows + mlp[layer_idx] + blocks[layer_idx, b]), 2, layer_idx, b)
                         for b in range(blocks.shape[1]))
    return units


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_gate_set(model: nn.Module) -> GateSet | None:
    """The GateSet attached to `model` (a transformers model, possibly inside a peft wrapper), or None."""
    base = _unwrap_peft(model)
    return getattr(base, GATES_ATTR, None)


def attach_gates(model: nn.Module, cfg: GateConfig | None = None) -> GateSet:
    """Add gates and the gated visual attention to a multimodal transformers model, in place.

    With every gate open and `window=None` the model computes exactly what it did before.
    Wraps each decoder layer's `self_attn` and `mlp` (the originals stay as children), selects the
    registered `visprune_sdpa` / `visprune_flex` attention for the text model only, and hooks the
    multimodal core so each forward gets its visual layout and gate values through `visprune_ctx`.
    `generate()` never emits the family's media placeholder tokens (`suppress_in_generation`).
    """
    cfg = cfg or GateConfig()
    base = _unwrap_peft(model)
    if get_gate_set(base) is not None:
        raise ValueError("gates are already attached to this model; call detach_gates(model) first")
    family = family_for(base)
    dims = family.text_dims(base.config)
    param = next(base.parameters())
    gates = GateSet(dims, cfg, family.name, family.image_grid(base.config), family.image_extras(base.config))
    gates = gates.to(param.device).train(base.training)
    setattr(base, GATES_ATTR, gates)

    for layer_idx, layer in enumerate(family.decoder_layers(base)):
        slot = LayerSlot()
        out_bias = getattr(layer.self_attn.o_proj, "bias", None)
        layer.self_attn = VisualAttentionWrapper(layer.self_attn, layer_idx, slot, out_bias)
        layer.mlp = VisualMLPWrapper(layer.mlp, layer_idx, slot)

    text_impl = base.config.text_config._attn_implementation
    vision_impl = base.config.vision_config._attn_implementation
    gates._restore = {"text": text_impl, "vision": vision_impl}
    backend = _pick_backend(cfg.backend, base)
    base.set_attn_implementation({"text_config": FLEX_NAME if backend == "flex" else SDPA_NAME,
                                  "vision_config": vision_impl})

    core = family.multimodal_core(base)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if kwargs.get(CTX_KWARG) is not None:
            return args, kwargs  # the caller supplied its own context
        inputs = forward_inputs(module, args, kwargs)
        layout = family.build_layout(base, inputs)
        cache = inputs.get("past_key_values")
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len:
            prev = gates._layouts.get(cache)
            if prev is None or prev.num_keys < past_len:
                raise ValueError("the KV cache was not filled by this gated model (its visual layout is unknown); "
                                 "prefill through the gated model first")
            layout = prev.keys(past_len).extend(layout)
            mask_2d = inputs.get("attention_mask")
            if mask_2d is not None and mask_2d.shape[1] == layout.num_keys:
                layout.key_valid = mask_2d.to(layout.key_valid.device).bool()
        values = gates(batch_size=layout.visual_mask.shape[0])
        kwargs[CTX_KWARG] = VisualContext(layout=layout, gates=values, window=gates.window,
                                          layer_windows=gates.layer_windows, temporal_window=gates.temporal_window,
                                          training=gates.training and not gates._open_all,
                                          mlp_channel_masks={} if gates._open_all else gates.mlp_channel_masks,
                                          channel_block=gates.channel_block)
        return args, kwargs

    def post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        cache = getattr(output, "past_key_values", None)
        ctx = kwargs.get(CTX_KWARG)
        if cache is not None and ctx is not None:
            gates._layouts[cache] = ctx.layout
        return output

    gates._handles = [core.register_forward_pre_hook(pre_hook, with_kwargs=True),
                      core.register_forward_hook(post_hook, with_kwargs=True)]
    suppress_in_generation(base, family.placeholder_token_ids(base.config))
    return gates


def detach_gates(model: nn.Module) -> None:
    """Undo `attach_gates`: unwrap layers, restore the attention implementation, remove hooks and gates.

    The placeholder tokens stay suppressed in `generate()`: that is right for the plain model too, and
    a model saved after detaching (an exported folder) keeps it in its generation config.
    """
    base = _unwrap_peft(model)
    gates = get_gate_set(base)
    if gates is None:
        raise ValueError("no gates are attached to this model")
    family = family_for(base)
    for layer in family.decoder_layers(base):
        layer.self_attn = layer.self_attn.attn
        layer.mlp = layer.mlp.mlp
    for handle in gates._handles:
        handle.remove()
    base.set_attn_implementation({"text_config": gates._restore["text"], "vision_config": gates._restore["vision"]})
    delattr(base, GATES_ATTR)


def check_plan(model: nn.Module, plan: Plan) -> tuple[Family, TextDims]:
    """The family and language-model dimensions of a transformers `model`, once `plan` is checked to be made
    for them (`Plan.validate_for`: its family, layers, heads and MLP channels); raises PlanError."""
    family = family_for(model)
    dims = family.text_dims(model.config)
    plan.validate_for(dims.num_layers, dims.num_heads, dims.intermediate_size, family=family.name)
    return family, dims


def apply_plan(model: nn.Module, plan: Plan, mode: str = "gated", backend: str = "auto") -> nn.Module:
    """Execute a plan on `model` (in place; returns it).

    mode="gated": gates fixed to the plan's 0/1 values (constant in train and eval) on the gated
    attention with the plan's window; this is the reference semantics of docs/design.md.
    mode="hardened": the same function computed without the removed visual work (see
    `visprune.modeling.hardened`); attached gates are detached first. For inference.
    """
    if mode not in ("gated", "hardened"):
        raise ValueError(f"apply_plan: unknown mode {mode!r}; available: 'gated', 'hardened'")
    base = _unwrap_peft(model)
    if mode == "hardened":
        from .hardened import harden_model

        if get_gate_set(base) is not None:
            detach_gates(base)
        harden_model(base, plan)
        return model
    _, dims = check_plan(base, plan)
    gates = get_gate_set(base)
    if gates is None:
        gates = attach_gates(base, GateConfig(window=plan.window, temporal_window=plan.temporal_window,
                                              backend=backend))
    gates.window, gates.temporal_window = plan.window, plan.temporal_window
    gates.layer_windows = {i: layer.window for i, layer in enumerate(plan.layers) if layer.window is not None}
    device = gates.device
    values = GateProbs.from_plan(plan, dims.intermediate_size)  # a plan's gates are open with probability 0 or 1
    gates.head, gates.router, gates.mlp = (FixedGate(v.to(device)) for v in (values.head, values.layer, values.mlp))
    gates.update = None if values.update is None else FixedGate(values.update.to(device))
    gates.rings = None  # the plan's per-layer windows (`layer_windows`) are its rings
    gates.mlp_channel_masks = {}
    for layer_idx, layer in enumerate(plan.layers):
        if layer.mlp_channels is not None:
            mask = torch.zeros(dims.intermediate_size, dtype=torch.bool, device=device)
            mask[list(layer.mlp_channels)] = True
            gates.mlp_channel_masks[layer_idx] = mask
    return model
