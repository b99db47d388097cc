"""Model folders loaded for evaluation (hardened when they hold a plan) and what their plan costs under the
FLOPs model. Scoring, prompting and timing live in their own modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.processing import load_processor
from visprune.modeling import PLAN_FILE, TokenLayout, default_layout, flops, load_pruned
from visprune.modeling.flops import dims_from_config


def load_for_eval(model_dir: str | Path, trust_remote_code: bool = False, *, dtype: torch.dtype | str | None = None,
                  device: str | torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, processor) of a model folder, the model in eval mode: hardened (`load_pruned`) when the folder has
    a `pruning_plan.json`, else the plain model.

    Args:
        model_dir: a model folder (e.g. one `visprune harden` wrote).
        trust_remote_code: let the folder's own model and processor code run; only ever from the caller, and
            only True or False (a string such as "false" would be truthy).
        dtype: weights dtype ("auto": the folder's; None: the plain model at torch's default dtype, a hardened
            one at the folder's).
        device: where to move the model (default: where transformers puts it).

    Raises:
        FileNotFoundError: `model_dir` is not a model folder.
        TypeError: `trust_remote_code` is not a bool.
        ValueError: the folder's model needs its own code and `trust_remote_code` is off.
    """
    from transformers import AutoModelForImageTextToText

    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    try:
        if (model_dir / PLAN_FILE).is_file():
            model = load_pruned(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        else:
            kwargs = {} if dtype is None else {"dtype": dtype}
            model = AutoModelForImageTextToText.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code,
                                                                **kwargs)
            model = (model if device is None else model.to(device)).eval()
    except ValueError as exc:
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        raise ValueError(f"{model_dir} can only be loaded by running its own code (auto_map in its config): pass "
                         "--trust-remote-code if you trust it") from exc
    return model, load_processor(model_dir, trust_remote_code=trust_remote_code)


def is_hardened(model: torch.nn.Module) -> bool:
    """Whether `model` runs a pruning plan (it was loaded from a folder with a `pruning_plan.json`)."""
    return getattr(model, "visprune_plan", None) is not None


def _cost_of_model(model: torch.nn.Module, layout: TokenLayout | None) -> tuple[TokenLayout, dict[str, Any]]:
    """The layout used (the default one when None) and `flops.plan_report` of `model`'s plan on it."""
    dims = dims_from_config(model.config)
    layout = layout or default_layout(dims)
    return layout, flops.plan_report(dims, layout, getattr(model, "visprune_plan", None))


def plan_flops(model: torch.nn.Module) -> dict[str, float]:
    """Visual FLOPs of the model's plan (dense when it has none) under the default layout: `dense`, `model`
    and their `ratio`."""
    _, report = _cost_of_model(model, None)
    return {"dense": report["dense"]["visual_flops"], "model": report["plan"]["visual_flops"],
            "ratio": report["visual_flops_ratio"]}


def plan_report(model: torch.nn.Module, layout: TokenLayout | None = None) -> dict[str, Any]:
    """The FLOPs model's full report of `model`'s plan (dense when it has none) on `layout` (default layout when
    None), with the layout and the visual / prefill FLOPs ratios to dense."""
    layout, report = _cost_of_model(model, layout)
    return {"layout": layout.to_dict(), **report["plan"], "visual_flops_ratio": report["visual_flops_ratio"],
            "prefill_flops_ratio": report["prefill_flops_ratio"]}


__all__ = ["is_hardened", "load_for_eval", "plan_flops", "plan_report"]
