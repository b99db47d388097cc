"""Qwen2-VL videos: `pixel_values_videos` with `video_grid_thw` are laid out as one grid per temporal slice (the
neighbour window stays inside a slice, or with a spatio-temporal window `[t, h, w]` reaches the slices of the same
video t//2 on either side; M-RoPE positions are the model's own), beside images in the same batch; gated == the
eager reference, hardened == gated, cached decoding == recomputation, and video tokens without their grid are
refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from reference import reference_logits_any
from test_gated_equivalence import random_plan
from tiny_families import IMAGE_END, IMAGE_START, IMAGE_TOKEN_ID, pad_rows, text_tokens, tiny_qwen2_vl
from visprune.modeling import GateConfig, LayerPlan, Plan, apply_plan, attach_gates
from visprune.modeling.families import family_for

VIDEO_TOKEN_ID = 4  # tiny_qwen2_vl's video_token_id


def video_batch(samples, padding="left", seed=1):
    """`samples`: per sample a list of ("image", rows, cols) / ("video", slices, rows, cols) in prompt order.
    Returns the batch, the grids in token order (a video: one per slice) and input ids with video tokens written
    as image tokens (what the reference reads its layout from)."""
    gen = torch.Generator().manual_seed(seed)
    rows, types, image_thw, video_thw, grids = [], [], [], [], []
    for i, sample in enumerate(samples):
        ids = [1] + text_tokens(gen, 2 + i)
        for media in sample:
            if media[0] == "image":
                _, r, c = media
                ids += [IMAGE_START] + [IMAGE_TOKEN_ID] * (r * c) + [IMAGE_END] + text_tokens(gen, 1)
                image_thw.append([1, 2 * r, 2 * c])
                grids.append((r, c))
            else:
                _, t, r, c = media
                ids += [IMAGE_START] + [VIDEO_TOKEN_ID] * (t * r * c) + [IMAGE_END] + text_tokens(gen, 1)
                video_thw.append([t, 2 * r, 2 * c])
                grids.extend([(r, c)] * t)
        ids += text_tokens(gen, 4)
        rows.append(ids)
        types.append([1 if t == IMAGE_TOKEN_ID else 2 if t == VIDEO_TOKEN_ID else 0 for t in ids])
    batch = pad_rows(rows, padding, {"mm_token_type_ids": types})
    if image_thw:
        thw = torch.tensor(image_thw)
        batch["image_grid_thw"] = thw
        batch["pixel_values"] = torch.randn(int(thw.prod(-1).sum()), 3 * 2 * 2 * 2, generator=gen)
    if video_thw:
        thw = torch.tensor(video_thw)
        batch["video_grid_thw"] = thw
        batch["pixel_values_videos"] = torch.randn(int(thw.prod(-1).sum()), 3 * 2 * 2 * 2, generator=gen)
    layout_ids = torch.where(batch["input_ids"] == VIDEO_TOKEN_ID, IMAGE_TOKEN_ID, batch["input_ids"])
    return batch, grids, layout_ids


SAMPLES = ([("video", 3, 2, 3)], [("image", 2, 2), ("video", 2, 3, 3)], [])


# the reference reads grids in token order: sample 0's video slices, then sample 1's image and video slices; the
# fourth entry is the grid's temporal slice in its video
GRIDS_IN_ORDER = [(2, 3, False, 0), (2, 3, False, 1), (2, 3, False, 2), (2, 2), (3, 3, False, 0), (3, 3, False, 1)]


def spatio_temporal(plan: Plan, variant: str, temporal: int) -> Plan:
    return Plan.from_json({**plan.to_dict(), "family": variant, "window": [temporal, plan.window, plan.window]})


def test_a_video_is_one_grid_per_temporal_slice_after_the_images():
    tiny = tiny_qwen2_vl()
    batch, grids, _ = video_batch(SAMPLES)
    layout = family_for(tiny.model).build_layout(tiny.model, batch)
    video = batch["input_ids"] == VIDEO_TOKEN_ID
    assert bool(layout.visual_mask[video].all()) and int(layout.visual_mask.sum()) == sum(r * c for r, c in grids)
    first = layout.grid_idx[0][video[0]]  # sample 0: 3 slices of 2 x 3
    assert first.tolist() == [1] * 6 + [2] * 6 + [3] * 6  # grid 0 is sample 1's image (images first)
    assert layout.row[0][video[0]].tolist() == [0, 0, 0, 1, 1, 1] * 3
    assert layout.col[0][video[0]].tolist() == [0, 1, 2] * 6
    image = batch["input_ids"][1] == IMAGE_TOKEN_ID
    assert set(layout.grid_idx[1][image].tolist()) == {0}
    assert layout.slice_idx[0][video[0]].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert set(layout.media_idx[0][video[0]].tolist()) == {1}  # medium 0 is the image
    assert layout.media_idx[1][video[1]].tolist() == [2] * 18 and layout.slice_idx[1][image].tolist() == [0] * 4


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("window", [3, None])
def test_gated_video_matches_the_reference_and_hardened_equals_gated(window, variant):
    tiny = tiny_qwen2_vl(seed=1, variant=variant)
    batch, _, layout_ids = video_batch(SAMPLES, padding="right")
    for plan in (random_plan(5, window=window), random_plan(6, window=window, frozen=True, layer_windows=True)):
        plan = Plan.from_json({**plan.to_dict(), "family": variant})
        expected = reference_logits_any(tiny.model, batch, plan, IMAGE_TOKEN_ID, GRIDS_IN_ORDER, layout_ids)
        gated, hardened = copy.deepcopy(tiny.model), copy.deepcopy(tiny.model)
        apply_plan(gated, plan)
        apply_plan(hardened, plan, mode="hardened")
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            got_gated, got_hardened = gated(**batch).logits[mask], hardened(**batch).logits[mask]
        torch.testing.assert_close(got_gated, expected[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(got_hardened, got_gated, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("temporal", [3, 5])
def test_spatio_temporal_window_matches_the_reference_and_hardened_equals_gated(temporal, backend):
    """`window: [t, w, w]`: a video token also attends to the w x w neighbours on the slices of its video at most
    t//2 away (never another video's or an image's); with per-layer windows and frozen layers too."""
    tiny = tiny_qwen2_vl(seed=3)
    batch, _, layout_ids = video_batch(SAMPLES, padding="right")
    mask = batch["attention_mask"].bool()
    for i, plan in enumerate((random_plan(7, window=3), random_plan(8, window=3, frozen=True, layer_windows=True))):
        plan = spatio_temporal(plan, "qwen2_vl", temporal)
        expected = reference_logits_any(tiny.model, batch, plan, IMAGE_TOKEN_ID, GRIDS_IN_ORDER, layout_ids)
        if i == 0:  # the temporal window changes the outputs (plan 7 updates visual rows in two layers)
            spatial = reference_logits_any(tiny.model, batch, Plan.from_json({**plan.to_dict(), "window": 3}),
                                           IMAGE_TOKEN_ID, GRIDS_IN_ORDER, layout_ids)
            assert (spatial[mask] - expected[mask]).abs().max() > 1e-3
        gated, hardened = copy.deepcopy(tiny.model), copy.deepcopy(tiny.model)
        apply_plan(gated, plan, backend=backend)
        apply_plan(hardened, plan, mode="hardened")
        with torch.no_grad():
            got_gated, got_hardened = gated(**batch).logits[mask], hardened(**batch).logits[mask]
        torch.testing.assert_close(got_gated, expected[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(got_hardened, got_gated, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_ring_gates_committed_to_a_spatio_temporal_plan_compute_the_hardened_plan(backend):
    """Learned window radii with a temporal window: a ring's distance is counted on the grid, on every slice the
    temporal window reaches; gates committed to a plan of per-layer windows compute the hardened plan."""
    tiny = tiny_qwen2_vl(seed=4)
    batch, _, _ = video_batch(SAMPLES, padding="right")
    layers = tuple(LayerPlan(heads=(0, 1, 2, 3)[: 2 + i], mlp=i != 1, window=(None, 3, 1)[i]) for i in range(3))
    plan = Plan(family="qwen2_vl", window=5, num_layers=3, num_heads=4, layers=layers, temporal_window=3)
    hardened = copy.deepcopy(tiny.model)
    apply_plan(hardened, plan, mode="hardened")
    gates = attach_gates(tiny.model, GateConfig(window=5, temporal_window=3, window_rings=True, backend=backend))
    gates.commit_to(plan)
    with pytest.raises(ValueError, match="temporal window is 1, these gates' 3"):
        gates.commit_to(Plan.from_json({**plan.to_dict(), "window": 5}))
    mask = batch["attention_mask"].bool()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        expected, got = hardened.eval()(**batch).logits[mask], tiny.model.eval()(**batch).logits[mask]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_the_window_stays_inside_a_temporal_slice():
    """With every visual head kept and window 3, changing the second temporal slice's pixels leaves the first
    slice's last hidden states unchanged: a visual query never sees another slice's keys (the vision tower
    attends within a slice too), and the first slice precedes the second."""
    tiny = tiny_qwen2_vl(seed=2)
    batch, _, _ = video_batch([[("video", 2, 2, 2)]])
    plan = Plan(family="qwen2_vl", window=3, num_layers=3, num_heads=4,
                layers=tuple(LayerPlan(heads=(0, 1, 2, 3), mlp=True) for _ in range(3)))
    apply_plan(tiny.model, plan)
    video = (batch["input_ids"][0] == VIDEO_TOKEN_ID).nonzero().flatten()
    first_slice, second_slice = video[:4], video[4:]
    changed = dict(batch)
    pixels = batch["pixel_values_videos"].clone()
    pixels[16:] += 1.0  # the second temporal slice's patches (4 x 4 patches per slice, slice by slice)
    changed["pixel_values_videos"] = pixels
    with torch.no_grad():
        out = tiny.model(**batch, output_hidden_states=True).hidden_states[-1][0]
        moved = tiny.model(**changed, output_hidden_states=True).hidden_states[-1][0]
    assert (moved[second_slice] - out[second_slice]).abs().max() > 1e-4
    torch.testing.assert_close(moved[first_slice], out[first_slice], atol=1e-6, rtol=0)


def test_video_tokens_without_their_grid_are_refused():
    tiny = tiny_qwen2_vl()
    batch, _, _ = video_batch(SAMPLES)
    del batch["video_grid_thw"]
    with pytest.raises(ValueError, match="video tokens or pixel_values_videos without video_grid_thw"):
        family_for(tiny.model).build_layout(tiny.model, batch)


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_cached_decoding_with_a_video_equals_recomputation_gated_and_hardened(variant):
    """`generate()` encodes the video up front and drops `video_grid_thw`: the slices come from the M-RoPE
    positions; every step's logits equal a recomputation of the whole sequence, gated and hardened."""
    tiny = tiny_qwen2_vl(variant=variant)
    batch, _, _ = video_batch(SAMPLES, padding="left")
    plan = spatio_temporal(random_plan(5, window=3), variant, 3)
    gated, hardened = tiny.model, copy.deepcopy(tiny.model)
    apply_plan(gated, plan)
    apply_plan(hardened, plan, mode="hardened")
    steps, outs = 4, {}
    for label, model in (("gated", gated), ("hardened", hardened)):
        with torch.no_grad():
            outs[label] = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                         suppress_tokens=[IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])
    assert torch.equal(outs["gated"].sequences, outs["hardened"].sequences)
    prompt = batch["input_ids"].shape[1]
    ones = torch.ones(batch["input_ids"].shape[0], steps, dtype=torch.long)
    for label, model in (("gated", gated), ("hardened", hardened)):
        full = {**batch, "input_ids": outs[label].sequences,
                "attention_mask": torch.cat([batch["attention_mask"], ones], dim=1),
                "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], 0 * ones], dim=1)}
        with torch.no_grad():
            logits = model(**full, use_cache=False).logits
        for i in range(steps):
            torch.testing.assert_close(outs[label].logits[i], logits[:, prompt - 1 + i], atol=1e-4, rtol=0, msg=label)
