"""Choose a plan by a short validation pass: `GateSet.candidate_plans` gives the gates' own plan and the
plans that draws of the trained gates make at the budget; each is applied (gated mode, the merged model)
and scored by its language-model loss on a few validation samples; the lowest loss wins. This closes the
gap between the sampled gates training saw and the one deterministic ranking hardening keeps: a run whose
ranking closes a layer the task needs still exported a plan training never relied on."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.records import build_dataset
from visprune.data_prep.templates import ChatTemplate
from visprune.modeling import GateSet, Plan, TokenLayout, apply_plan, default_layout
from visprune.modeling.flops import plan_report

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


def held_out_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The LM loss of `model` over `batches`, per scored token (each batch's mean weighted by its supervised
    tokens, as one loss over all of them would count them); no gradients are taken here."""
    counts = [int((batch["labels"][:, 1:] != -100).sum()) for batch in batches]
    return sum(model(**batch).loss.float() * count for batch, count in zip(batches, counts)) / max(sum(counts), 1)


@dataclass
class PlanSelection:
    """Where and how widely `visprune harden --select-on` looks."""

    data: str | Path  # a LLaVA JSON (or prepared folder) of held-out samples
    image_folder: str | Path | None = None
    candidates: int = 8  # the gates' plan and up to candidates - 1 drawn plans
    samples: int = 64  # the first N samples of `data`
    batch_size: int = 16
    seed: int = 0  # of the draws

    def __post_init__(self) -> None:
        for name in ("candidates", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"plan selection: {name} must be >= 1, got {getattr(self, name)}")

    def rows(self) -> Dataset:
        """The samples each plan is scored on (read before any model is built, so bad data fails first)."""
        rows = build_dataset(self.data)
        if len(rows) == 0:
            raise ValueError(f"plan selection: {self.data} holds no samples")
        return rows.select(range(min(self.samples, len(rows))))


def select_plan(model: torch.nn.Module, gates: GateSet, budget: float, fill: bool, selection: PlanSelection,
                processor: Any, template: ChatTemplate, max_length: int, layout: TokenLayout | None = None,
                rows: Dataset | None = None, progress: bool = True) -> tuple[Plan, dict[str, Any]]:
    """The candidate with the lowest validation loss, and what was tried (for the pruning report).

    `model` carries `gates` (trained) and merged weights; afterwards its gates are the chosen plan's.
    `layout`: the token layout plans are costed on (default `default_layout`); `rows`: `selection.rows()`,
    when already read.
    """
    layout = layout or default_layout(gates.model_dims())
    candidates = gates.candidate_plans(budget, selection.candidates, layout, fill=fill, seed=selection.seed)
    rows = selection.rows() if rows is None else rows
    collator = ChatCollator(processor, template, image_folder=selection.image_folder, max_length=max_length)
    batches = [collator([rows[i] for i in range(start, min(start + selection.batch_size, len(rows)))])
               for start in range(0, len(rows), selection.batch_size)]
    dims = gates.model_dims()
    was_training = model.training
    model.eval()
    tried = []
    try:
        for plan, source in tqdm(candidates, desc="plan selection", disable=not progress, leave=False):
            apply_plan(model, plan)
            with torch.no_grad():
                loss = float(held_out_loss(model, batches))
            ratio = plan_report(dims, layout, plan)["visual_flops_ratio"]
            tried.append({"source": source, "loss": loss, "visual_flops_ratio": ratio, "plan": plan})
            logger.info("plan selection: %s loss %.4f (%.1f%% of the visual FLOPs)", source, loss, 100 * ratio)
    finally:
        model.train(was_training)
    best = min(tried, key=lambda t: (t["loss"] if math.isfinite(t["loss"]) else math.inf))
    apply_plan(model, best["plan"])
    report = {"data": str(selection.data), "samples": len(rows), "seed": selection.seed, "chosen": best["source"],
              "candidates": [{k: v for k, v in t.items() if k != "plan"} for t in tried]}
    return best["plan"], report


__all__ = ["PlanSelection", "select_plan"]
