"""Hardened execution == the gated reference (eval, 0/1 gates), cached decoding == recomputation,
and the pruned KV cache holds visual K/V only for kept groups of kept layers."""

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_llava
from test_gated_equivalence import random_plan, valid_logits
from visprune.modeling import LayerPlan, Plan, PrunedKVLayer, apply_plan, attach_gates, cache_nbytes
from visprune.modeling.hardened import HardenedDecoderLayer

ATOL = 1e-4


def gated_and_hardened(plan, num_kv_heads=4, bias=False, dtype=torch.float32, seed=0):
    gated = tiny_llava(num_kv_heads=num_kv_heads, attention_bias=bias, seed=seed).to(dtype)
    hardened = copy.deepcopy(gated)
    apply_plan(gated, plan)
    apply_plan(hardened, plan, mode="hardened")
    return gated.eval(), hardened.eval()


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def all_skipped(window=3):
    return Plan(family="llava", window=window, num_layers=3, num_heads=4,
                layers=tuple(LayerPlan(heads=(), mlp=False) for _ in range(3)))


def closed_heads_with_mlp(window=5):
    return Plan(family="llava", window=window, num_layers=3, num_heads=4,
                layers=(LayerPlan(heads=(), mlp=True), LayerPlan(heads=(1, 3), mlp=False),
                        LayerPlan(heads=(0, 1, 2, 3), mlp=True)))


@pytest.fixture(params=["merged", "sdpa"])
def kernel(request, monkeypatch):
    """Both attention kernels of the hardened layers: the fp32 merged softmax (CPU default) and fused SDPA in
    the weights' dtype (the CUDA default), here on CPU."""
    from visprune.modeling import hardened

    monkeypatch.setattr(hardened, "attention_kernel", request.param)
    return request.param


@pytest.mark.parametrize("num_kv_heads, bias", [(4, False), (2, True), (1, False)])
@pytest.mark.parametrize("window", [None, 3, 5])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_random_plans_match_gated(num_kv_heads, bias, window, padding, kernel):
    batch = tiny_batch(images_per_sample=(1, 2, 0), padding=padding)  # two images in one sample, a text-only one
    for seed in range(3):
        plan = random_plan(seed, window=window, channels=seed == 2)
        gated, hardened = gated_and_hardened(plan, num_kv_heads, bias, seed=seed)
        torch.testing.assert_close(valid_logits(logits(hardened, batch), batch),
                                   valid_logits(logits(gated, batch), batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("plan_fn", [all_skipped, closed_heads_with_mlp, lambda: Plan.dense(3, 4, window=3),
                                     lambda: Plan.dense(3, 4)])
def test_edge_plans_match_gated(plan_fn, kernel):
    plan = plan_fn()
    batch = tiny_batch(images_per_sample=(2, 1), padding="left")
    gated, hardened = gated_and_hardened(plan, num_kv_heads=2, bias=True)
    torch.testing.assert_close(valid_logits(logits(hardened, batch), batch),
                               valid_logits(logits(gated, batch), batch), atol=ATOL, rtol=0)


def test_dense_plan_without_window_equals_base_model():
    base = tiny_llava(num_kv_heads=2)
    hardened = copy.deepcopy(base)
    apply_plan(hardened, Plan.dense(3, 4), mode="hardened")
    batch = tiny_batch()
    torch.testing.assert_close(valid_logits(logits(hardened, batch), batch), valid_logits(logits(base, batch), batch),
                               atol=ATOL, rtol=0)


def test_text_only_batch(kernel):
    gated, hardened = gated_and_hardened(random_plan(1, window=3))
    batch = tiny_batch(images_per_sample=(0, 0))
    torch.testing.assert_close(valid_logits(logits(hardened, batch), batch),
                               valid_logits(logits(gated, batch), batch), atol=ATOL, rtol=0)


def test_bf16_close_to_gated_and_finite(kernel):
    plan = random_plan(0, window=3)
    batch = tiny_batch()
    gated, hardened = gated_and_hardened(plan, num_kv_heads=2, dtype=torch.bfloat16)
    pixel = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
    h, g = valid_logits(logits(hardened, pixel), batch).float(), valid_logits(logits(gated, pixel), batch).float()
    assert torch.isfinite(h).all()
    assert (h - g).abs().max() < 0.1 and (h.argmax(-1) == g.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("num_kv_heads, window", [(4, 3), (2, None)])
def test_cached_greedy_decoding_equals_recomputation(num_kv_heads, window, kernel):
    plan = random_plan(3, window=window)
    gated, hardened = gated_and_hardened(plan, num_kv_heads)
    batch = tiny_batch(padding="left")
    steps = 6
    with torch.no_grad():
        out = hardened.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
        ref = gated.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, ref.sequences)
    seq = out.sequences
    mask = torch.cat([batch["attention_mask"], torch.ones(seq.shape[0], steps, dtype=torch.long)], dim=1)
    full = logits(hardened, {"input_ids": seq, "attention_mask": mask, "pixel_values": batch["pixel_values"]},
                  use_cache=False)
    prompt = batch["input_ids"].shape[1]
    for i in range(steps):
        torch.testing.assert_close(out.logits[i], full[:, prompt - 1 + i], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.logits[i], ref.logits[i], atol=ATOL, rtol=0)


def test_cache_holds_visual_kv_only_for_kept_groups():
    plan = Plan(family="llava", window=3, num_layers=3, num_heads=4,
                layers=(LayerPlan(heads=(), mlp=False), LayerPlan(heads=(0, 1), mlp=True), LayerPlan(heads=(3,), mlp=False)))
    _, hardened = gated_and_hardened(plan, num_kv_heads=2)  # groups {0,1} {2,3}
    batch = tiny_batch(images_per_sample=(1, 1), padding="right")
    with torch.no_grad():
        out = hardened(**batch, use_cache=True)
        dense_out = tiny_llava(num_kv_heads=2)(**batch, use_cache=True)
    layers = out.past_key_values.layers
    assert all(isinstance(layer, PrunedKVLayer) for layer in layers)
    assert layers[0].vis is None  # skipped layer: no visual K/V
    assert layers[1].vis[0].shape[1] == 1 and layers[2].vis[0].shape[1] == 1  # one kept group each
    assert layers[0].text[0].shape[1] == 2  # text keys keep every KV head
    assert out.past_key_values.get_seq_length() == batch["input_ids"].shape[1]
    assert cache_nbytes(out.past_key_values) < cache_nbytes(dense_out.past_key_values)


def test_layers_are_wrapped_not_copied_and_errors():
    model = tiny_llava()
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    plan = random_plan(0)
    apply_plan(model, plan, mode="hardened")
    layer = model.model.language_model.layers[0]
    assert isinstance(layer, HardenedDecoderLayer) and layer.layer.self_attn.q_proj.weight is q
    assert model.visprune_plan is plan
    with pytest.raises(ValueError, match="already hardened"):
        apply_plan(model, plan, mode="hardened")
    with pytest.raises(ValueError, match="unknown mode"):
        apply_plan(tiny_llava(), plan, mode="fast")
    with pytest.raises(ValueError, match="3 layers x 4 heads"):
        apply_plan(tiny_llava(num_layers=2), plan, mode="hardened")
    with pytest.raises(RuntimeError, match="hardened layer called without its context"):
        model.model.language_model(input_ids=torch.tensor([[1, 5, 6]]))


def test_gates_attached_are_detached_before_hardening():
    model = tiny_llava()
    reference = copy.deepcopy(model)
    attach_gates(model)
    plan = random_plan(2, window=5)
    apply_plan(model, plan, mode="hardened")
    apply_plan(reference, plan)
    batch = tiny_batch()
    torch.testing.assert_close(valid_logits(logits(model, batch), batch), valid_logits(logits(reference, batch), batch),
                               atol=ATOL, rtol=0)


def test_an_unknown_kernel_is_refused(monkeypatch):
    from visprune.modeling import hardened

    _, model = gated_and_hardened(random_plan(0, window=3))
    monkeypatch.setattr(hardened, "attention_kernel", "flash")
    with pytest.raises(ValueError, match="attention_kernel"):
        logits(model, tiny_batch())
