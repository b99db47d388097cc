"""The ShortV baseline (arXiv 2504.00502): Layer Contribution per layer on calibration samples, then the least
contributing layers frozen (skipped where freezing all is not enough) within the budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_llava
from visprune.experiments.seetask.baselines import layer_contributions, shortv_plan
from visprune.modeling import GateProbs, visual_flops
from visprune.modeling.flops import default_layout as layout_of
from visprune.modeling.flops import dims_from_config, plan_visual_ratio


def _ratio(dims, layout, plan) -> float:
    return float(visual_flops(dims, layout, GateProbs.from_plan(plan, dims.intermediate_size), plan.window)
                 / visual_flops(dims, layout))


def test_layer_contribution_is_a_non_negative_divergence_per_layer_and_leaves_the_model_alone():
    model = tiny_llava().eval()
    batch = tiny_batch(padding="right")
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100  # the last tokens are the answer
    batch = {**batch, "labels": labels}
    with torch.no_grad():
        before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    scores = layer_contributions(model, [batch])
    assert scores.shape == (3,) and bool((scores >= 0).all()) and float(scores.max()) > 0
    with torch.no_grad():
        after = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert model.config.text_config._attn_implementation != "visprune_sdpa"


@pytest.mark.parametrize("budget", [0.9, 0.5, 0.25, 0.12, 0.02])
def test_shortv_freezes_the_least_contributing_layers_first_within_the_budget(budget):
    model = tiny_llava()
    dims = dims_from_config(model.config)
    layout = layout_of(dims)
    contributions = torch.tensor([0.5, 0.1, 0.3])  # freeze order: layer 1, then 2, then 0
    plan, frozen, skipped = shortv_plan(dims, layout, budget, contributions)
    assert plan.window is None
    assert plan_visual_ratio(dims, layout, plan) <= budget + 1e-9
    assert _ratio(dims, layout, plan) == pytest.approx(plan_visual_ratio(dims, layout, plan))
    order = [1, 2, 0]
    assert [plan.layers[i].frozen or plan.layers[i].skipped for i in order] == [True] * (frozen + skipped) + [
        False] * (3 - frozen - skipped)
    assert [plan.layers[i].skipped for i in order[:skipped]] == [True] * skipped
    if frozen and not skipped:  # closest below: one frozen layer fewer would not fit
        from dataclasses import replace

        last = order[frozen - 1]
        layers = list(plan.layers)
        layers[last] = replace(layers[last], mlp=True, frozen=False)
        assert plan_visual_ratio(dims, layout, replace(plan, layers=tuple(layers))) > budget
    if skipped:
        assert frozen + skipped == 3
