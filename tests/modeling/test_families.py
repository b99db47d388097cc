"""Every family beyond LLaVA-1.5 on tiny models built from its config classes: the attribute paths it
relies on, gated dense == base, random plans == the independent reference, hardened == gated,
cached decoding == recomputation, and `visprune flops` on a local config; batches hold several
images of mixed sizes, text-only samples and padding on either side."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from reference import reference_logits_any
from test_gated_equivalence import random_plan
from tiny_families import IMAGE_TOKEN_ID, TINY_FAMILIES
from visprune.modeling import Plan, apply_plan, attach_gates, detach_gates
from visprune.modeling.families import FAMILIES, family_for
from visprune.modeling.families.base import RotaryFn  # noqa: F401  (the protocol's public names exist)
from visprune.trainer.cli import main

FAMILY_NAMES = sorted(TINY_FAMILIES)
ATOL = 1e-4


def plan_for(family: str, seed: int, window=3, channels=False) -> Plan:
    plan = random_plan(seed, window=window, channels=channels)
    return Plan.from_json({**plan.to_dict(), "family": family})


def assert_reference_gated_hardened(tiny, batch, grids, plan):
    """`plan` on the tiny family model: gated == the eager reference (1e-5) and hardened == gated (1e-4)."""
    expected = reference_logits_any(tiny.model, batch, plan, IMAGE_TOKEN_ID, grids)
    gated, hardened = tiny.model, copy.deepcopy(tiny.model)
    apply_plan(gated, plan)
    apply_plan(hardened, plan, mode="hardened")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        got_gated, got_hardened = gated.eval()(**batch).logits[mask], hardened.eval()(**batch).logits[mask]
    torch.testing.assert_close(got_gated, expected[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_hardened, got_gated, atol=1e-4, rtol=0)


def valid(logits, batch):
    return logits[batch["attention_mask"].bool()]


def logits_of(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_paths_exist_and_a_moved_path_fails_loudly(name):
    tiny = TINY_FAMILIES[name]()
    family = family_for(tiny.model)
    assert family.name == name and FAMILIES[name] is family
    family.check(tiny.model)  # every path the family relies on is there in this transformers version
    inputs = family.vision_inputs(tiny.model, torch.device("cpu"))
    with torch.no_grad():
        features = tiny.model.model.get_image_features(**inputs).pooler_output
    assert torch.cat(list(features)).numel() > 0
    broken = copy.deepcopy(tiny.model)
    del broken.model.language_model.layers[0].mlp.gate_proj
    with pytest.raises(TypeError, match=rf"{name} family: .*gate_proj is missing"):
        attach_gates(broken)


def test_llava_paths_are_checked_too():
    from conftest import tiny_llava

    model = tiny_llava()
    FAMILIES["llava"].check(model)
    del model.model.multi_modal_projector
    with pytest.raises(TypeError, match=r"llava family: .*model\.multi_modal_projector is missing"):
        attach_gates(model)


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_dense_gated_equals_base_and_detach_restores(name, padding):
    tiny = TINY_FAMILIES[name]()
    batch, _ = tiny.batch(padding=padding)
    base = logits_of(tiny.model, batch)
    apply_plan(tiny.model, Plan.dense(tiny.num_layers, tiny.num_heads, family=name))
    torch.testing.assert_close(valid(logits_of(tiny.model, batch), batch), valid(base, batch), atol=1e-5, rtol=0)
    detach_gates(tiny.model)
    torch.testing.assert_close(logits_of(tiny.model, batch), base, atol=0, rtol=0)


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("seed, window, channels", [(0, 3, False), (1, None, True)])
def test_random_plan_matches_reference(name, seed, window, channels):
    tiny = TINY_FAMILIES[name](seed=seed)
    batch, grids = tiny.batch(padding="right" if seed else "left", seed=seed)
    plan = plan_for(name, seed, window, channels)
    expected = reference_logits_any(tiny.model, batch, plan, IMAGE_TOKEN_ID, grids)
    base = logits_of(tiny.model, batch)
    apply_plan(tiny.model, plan)
    gated = logits_of(tiny.model, batch)
    torch.testing.assert_close(valid(gated, batch), valid(expected, batch), atol=1e-5, rtol=0)
    assert (valid(gated, batch) - valid(base, batch)).abs().max() > 1e-3  # the plan did something


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("window, padding", [(3, "left"), (None, "right"), (5, "right")])
def test_hardened_equals_gated(name, window, padding):
    for seed in range(2):
        tiny = TINY_FAMILIES[name](seed=seed)
        batch, _ = tiny.batch(padding=padding, seed=seed)
        plan = plan_for(name, seed + 3, window, channels=seed == 1)
        gated, hardened = tiny.model, copy.deepcopy(tiny.model)
        apply_plan(gated, plan)
        apply_plan(hardened, plan, mode="hardened")
        torch.testing.assert_close(valid(logits_of(hardened, batch), batch), valid(logits_of(gated, batch), batch),
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_text_only_batch(name):
    tiny = TINY_FAMILIES[name]()
    batch, _ = tiny.batch(images=((), ()))
    base = logits_of(tiny.model, batch)
    hardened = copy.deepcopy(tiny.model)
    apply_plan(tiny.model, plan_for(name, 7))
    apply_plan(hardened, plan_for(name, 7), mode="hardened")
    for model in (tiny.model, hardened):
        torch.testing.assert_close(valid(logits_of(model, batch), batch), valid(base, batch), atol=ATOL, rtol=0)


def _recompute(model, batch, sequences, steps):
    """Logits of the whole generated sequence in one forward (no cache)."""
    full = dict(batch)
    ones = torch.ones(sequences.shape[0], steps, dtype=torch.long)
    full["input_ids"] = sequences
    full["attention_mask"] = torch.cat([batch["attention_mask"], ones], dim=1)
    for key in ("mm_token_type_ids",):  # per-token inputs: generated tokens are text
        if key in batch:
            full[key] = torch.cat([batch[key], 0 * ones], dim=1)
    return logits_of(model, full, use_cache=False)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cached_decoding_equals_recomputation_gated_and_hardened(name):
    tiny = TINY_FAMILIES[name]()
    batch, _ = tiny.batch(padding="left")
    plan = plan_for(name, 11, window=3)
    gated, hardened = tiny.model, copy.deepcopy(tiny.model)
    apply_plan(gated, plan)
    apply_plan(hardened, plan, mode="hardened")
    steps = 5
    outs = {}
    for label, model in (("gated", gated), ("hardened", hardened)):
        with torch.no_grad():
            outs[label] = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                         suppress_tokens=[IMAGE_TOKEN_ID])  # a random model may emit it
    assert torch.equal(outs["gated"].sequences, outs["hardened"].sequences)
    prompt = batch["input_ids"].shape[1]
    for label, model in (("gated", gated), ("hardened", hardened)):
        full = _recompute(model, batch, outs[label].sequences, steps)
        for i in range(steps):
            torch.testing.assert_close(outs[label].logits[i], full[:, prompt - 1 + i], atol=ATOL, rtol=0, msg=label)
            torch.testing.assert_close(outs[label].logits[i], outs["gated"].logits[i], atol=ATOL, rtol=0, msg=label)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_visprune_flops_on_a_local_config(name, tmp_path, capsys):
    tiny = TINY_FAMILIES[name]()
    tiny.model.config.save_pretrained(tmp_path)
    assert main(["flops", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    family = FAMILIES[name]
    dims = family.text_dims(tiny.model.config)
    layout = report["layout"]
    n = layout["visual"]
    d, m, L = dims.hidden_size, dims.intermediate_size, dims.num_layers
    kv = dims.num_kv_heads * dims.head_dim
    # L * (8nd^2 + 4n^2 d + 6ndm) with the K/V projections of the KV groups only (grouped-query attention)
    expected = L * (4 * n * d * d + 4 * n * d * kv + 4 * n * n * d + 6 * n * d * m)
    assert report["dense"]["visual_flops"] == pytest.approx(expected, rel=1e-9)
    assert report["model"] == str(tmp_path) and n > 0


def test_internvl_tile_grid_is_raster_order_after_pixel_shuffle():
    """The layout puts tile token t at (t // cols, t % cols): perturbing one 2 x 2 px patch of a tile
    (a vision tower without attention layers, so features stay local) changes exactly that token."""
    from tiny_families import tiny_internvl

    model = tiny_internvl(vision_layers=0).model
    rows, cols = FAMILIES["internvl"].image_grid(model.config)
    tile = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.model.get_image_features(pixel_values=tile).pooler_output[0]
        for r, c in [(0, 0), (0, 5), (5, 0), (7, 3)]:  # patch coordinates on the 8 x 8 patch grid
            moved = tile.clone()
            moved[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 1.0
            features = model.model.get_image_features(pixel_values=moved).pooler_output[0]
            changed = ((features - base).abs().sum(-1) > 1e-6).nonzero().flatten().tolist()
            assert changed == [(r // 2) * cols + c // 2], (r, c, changed)
    assert (rows, cols) == (4, 4)


@pytest.mark.parametrize("size", [(8, 16), (8, 8)])
def test_llava_next_grids_follow_the_stitched_unpadded_features(size):
    """An 8 x 16 px image is two tiles side by side: the high-resolution grid is 4 x 8 (tiles stitched,
    neighbours across the seam), an 8 x 8 one is cropped to 4 x 4 (its aspect ratio). Perturbing one patch of
    one tile (a vision tower without attention output, so features stay local) changes exactly the token the
    family's grid puts at that patch; newline tokens are the image_newline embedding."""
    from tiny_families import NEXT_PATCH, tiny_llava_next

    model = tiny_llava_next().model
    with torch.no_grad():  # no attention output in the CLIP tower: each patch's feature stays its own
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
    family = FAMILIES["llava_next"]
    (side, _, _), (rows, cols, newline) = family.image_grids(model.config, size)
    assert newline and (size != (8, 16) or (rows, cols) == (4, 8))
    batch, _ = tiny_llava_next().batch(images=((size,),))
    pixels, sizes = batch["pixel_values"], batch["image_sizes"]
    with torch.no_grad():
        base = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output[0]
    assert base.shape[0] == side * side + rows * (cols + 1)
    ends = [side * side + r * (cols + 1) + cols for r in range(rows)]
    assert (base[ends] == model.model.image_newline).all()
    full_cols = 2 * side  # both pinpoints used here are two tiles wide, one tile high
    crop = (full_cols - cols) // 2  # unpad_image crops the columns symmetrically
    for tile, r, c in [(1, 0, 0), (2, 1, 0), (2, 3, 3), (1, 2, 3)]:  # tile 1 = left, 2 = right
        moved = pixels.clone()
        moved[0, tile, :, r * NEXT_PATCH:(r + 1) * NEXT_PATCH, c * NEXT_PATCH:(c + 1) * NEXT_PATCH] += 1.0
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=moved, image_sizes=sizes).pooler_output[0]
        changed = ((features - base).abs().sum(-1) > 1e-6).nonzero().flatten().tolist()
        col = (tile - 1) * side + c - crop
        expected = [side * side + r * (cols + 1) + col] if 0 <= col < cols else []
        assert changed == expected, (tile, r, c, changed)
