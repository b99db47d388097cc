"""Gated attention against the base model and an independent reference of docs/design.md's semantics."""

import random
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import GRID, IMAGE_SIZE, IMAGE_TOKEN_ID, TOKENS_PER_IMAGE, tiny_batch, tiny_llava
from reference import reference_logits
from visprune.modeling import GateConfig, LayerPlan, Plan, apply_plan, attach_gates, detach_gates, get_gate_set

ATOL = 1e-5


def valid_logits(logits, batch):
    return logits[batch["attention_mask"].bool()]


def random_plan(seed, num_layers=3, num_heads=4, window=3, channels=False, frozen=False, layer_windows=False):
    """A seeded plan: skipped layers, random heads, MLPs (channels), with `frozen` some layers that keep heads but
    not the MLP frozen (rule 7), and with `layer_windows` a window of 1, 3 or 5 of their own for some layers."""
    rng = random.Random(seed)
    layers = []
    for _ in range(num_layers):
        kind = rng.random()
        if kind < 0.25:
            layers.append(LayerPlan(heads=(), mlp=False))
            continue
        heads = tuple(sorted(rng.sample(range(num_heads), rng.randint(0, num_heads))))
        mlp = rng.random() < 0.6 or not heads
        chans = tuple(sorted(rng.sample(range(64), 20))) if channels and mlp else None
        if frozen and heads and rng.random() < 0.6:
            layers.append(LayerPlan(heads=heads, mlp=False, frozen=True))
            continue
        layers.append(LayerPlan(heads=heads, mlp=mlp, mlp_channels=chans))
    if layer_windows:
        own = random.Random(seed + 1000)
        layers = [replace(layer, window=own.choice((None, 1, 3, 5))) for layer in layers]
    return Plan(family="llava", window=window, num_layers=num_layers, num_heads=num_heads, layers=tuple(layers))


def assert_gated_matches_reference(model, batch, plan):
    """`plan` applied (gated) to a copy of the tiny LLaVA `model` gives the eager reference's logits."""
    import copy

    expected = reference_logits(model, batch, plan, IMAGE_TOKEN_ID, GRID)
    gated = copy.deepcopy(model)
    apply_plan(gated, plan)
    with torch.no_grad():
        got = gated(**batch).logits
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(expected, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_kv_heads, bias, padding", [(4, False, "left"), (2, True, "right"), (1, False, "left")])
def test_dense_plan_equals_base_model(num_kv_heads, bias, padding):
    model = tiny_llava(num_kv_heads=num_kv_heads, attention_bias=bias)
    batch = tiny_batch(padding=padding)
    with torch.no_grad():
        base = model(**batch).logits
    apply_plan(model, Plan.dense(3, 4))
    assert model.config.text_config._attn_implementation == "visprune_sdpa"
    with torch.no_grad():
        gated = model(**batch).logits
    torch.testing.assert_close(valid_logits(gated, batch), valid_logits(base, batch), atol=ATOL, rtol=0)


def test_open_learnable_gates_equal_base_model_and_detach_restores():
    model, batch = tiny_llava(), tiny_batch()
    with torch.no_grad():
        base = model(**batch).logits
    attach_gates(model, GateConfig(window=None, init_log_alpha=3.0))  # every deterministic gate exactly 1
    with torch.no_grad():
        gated = model(**batch).logits
    torch.testing.assert_close(valid_logits(gated, batch), valid_logits(base, batch), atol=ATOL, rtol=0)
    detach_gates(model)
    assert get_gate_set(model) is None and model.config.text_config._attn_implementation == "sdpa"
    assert type(model.model.language_model.layers[0].self_attn).__name__ == "LlamaAttention"
    with torch.no_grad():
        again = model(**batch).logits
    torch.testing.assert_close(again, base, atol=0, rtol=0)


@pytest.mark.parametrize("seed, num_kv_heads, bias, padding, window, channels", [
    (0, 4, False, "left", 3, False),
    (1, 2, True, "right", 3, True),
    (2, 4, True, "left", None, False),
    (3, 1, False, "right", 1, True),
])
def test_random_plan_matches_reference(seed, num_kv_heads, bias, padding, window, channels):
    model = tiny_llava(num_kv_heads=num_kv_heads, attention_bias=bias, seed=seed)
    batch = tiny_batch(padding=padding, seed=seed)
    plan = random_plan(seed, window=window, channels=channels)
    expected = reference_logits(model, batch, plan, IMAGE_TOKEN_ID, GRID)
    with torch.no_grad():
        base = model(**batch).logits
    apply_plan(model, plan)
    with torch.no_grad():
        gated = model(**batch).logits
    torch.testing.assert_close(valid_logits(gated, batch), valid_logits(expected, batch), atol=ATOL, rtol=0)
    assert (valid_logits(gated, batch) - valid_logits(base, batch)).abs().max() > 1e-3  # the plan did something


def test_visual_query_without_any_key_outputs_zeros_not_nan():
    """An image at position 0 in a layer whose visual heads are all closed: rule 6."""
    model = tiny_llava(attention_bias=True)
    ids = torch.tensor([[IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + [5, 6, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)}
    plan = Plan(family="llava", window=3, num_layers=3, num_heads=4,
                layers=(LayerPlan(heads=(), mlp=True), LayerPlan(heads=(1, 2), mlp=True), LayerPlan(heads=(), mlp=False)))
    expected = reference_logits(model, batch, plan, IMAGE_TOKEN_ID, GRID)
    apply_plan(model, plan)
    with torch.no_grad():
        gated = model(**batch).logits
    assert torch.isfinite(gated).all()
    torch.testing.assert_close(gated, expected, atol=ATOL, rtol=0)


def test_flex_forward_agrees_with_sdpa():
    plan = random_plan(5, window=3)
    batch = tiny_batch(padding="left")
    outputs = []
    for backend in ("sdpa", "flex"):
        model = tiny_llava(num_kv_heads=2)
        apply_plan(model, plan, backend=backend)
        assert model.config.text_config._attn_implementation == f"visprune_{backend}"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # eager flex warns that it is unfused
            outputs.append(valid_logits(model(**batch).logits, batch))
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)


def test_text_only_batch():
    model, batch = tiny_llava(), tiny_batch(images_per_sample=(0, 0))
    with torch.no_grad():
        base = model(**batch).logits
    apply_plan(model, random_plan(7))
    with torch.no_grad():
        gated = model(**batch).logits
    torch.testing.assert_close(valid_logits(gated, batch), valid_logits(base, batch), atol=ATOL, rtol=0)


def test_image_token_count_mismatch_is_a_clear_error():
    model = tiny_llava()
    attach_gates(model)
    batch = tiny_batch(images_per_sample=(1, 1))
    batch["input_ids"][1][batch["input_ids"][1] == IMAGE_TOKEN_ID] = 9  # sample 1 loses its image tokens
    with pytest.raises(ValueError, match=r"16 image tokens .*per sample \[16, 0\].*2 image\(s\) give 32"):
        model(**batch)
    batch = tiny_batch(images_per_sample=(1, 1))
    ids = batch["input_ids"]
    first = (ids[1] == IMAGE_TOKEN_ID).nonzero()[0, 0]
    ids[1, first] = 9  # 15 tokens in sample 1 ...
    ids[0, 0] = IMAGE_TOKEN_ID  # ... and 17 in sample 0: same total, an image would straddle two samples
    with pytest.raises(ValueError, match="would span samples 0 and 1"):
        model(**batch)


def test_gradients_reach_every_gate_parameter():
    model, batch = tiny_llava(), tiny_batch()
    gates = attach_gates(model, GateConfig(window=3, init_log_alpha=0.0))
    model.eval()  # deterministic gates at 0.5: every gate is inside (0, 1)
    model(**batch).logits.square().mean().backward()
    for name, param in gates.named_parameters():
        assert param.grad is not None and (param.grad != 0).all(), name
    model.zero_grad()
    model.train()  # sampled gates: over a few draws every element gets a gradient
    torch.manual_seed(0)
    total = {name: torch.zeros_like(p) for name, p in gates.named_parameters()}
    for _ in range(6):
        model(**batch).logits.square().mean().backward()
        for name, param in gates.named_parameters():
            total[name] += param.grad.abs()
        model.zero_grad()
    for name, grad in total.items():
        assert (grad > 0).all(), name


def test_eval_deterministic_train_sampled():
    model, batch = tiny_llava(), tiny_batch()
    attach_gates(model, GateConfig(window=3, init_log_alpha=0.0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)


def _gate_and_weight_grads(checkpointing: bool):
    model, batch = tiny_llava(), tiny_batch()
    attach_gates(model, GateConfig(window=3, init_log_alpha=0.0))
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # 5.x renames it activation_checkpointing_enable
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(3)
    model(**batch, use_cache=False).logits.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "language_model" in n
            or "visprune_gates" in n}


def test_gates_survive_gradient_checkpointing():
    plain, checkpointed = _gate_and_weight_grads(False), _gate_and_weight_grads(True)
    assert plain.keys() == checkpointed.keys() and any("visprune_gates" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_generate_and_cached_decoding_equals_recomputation(num_kv_heads):
    model = tiny_llava(num_kv_heads=num_kv_heads, attention_bias=True)
    batch = tiny_batch(images_per_sample=(1, 2, 0), padding="left")
    apply_plan(model, random_plan(11, window=3))
    steps = 6
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    sequences = out.sequences
    full_mask = torch.cat([batch["attention_mask"], torch.ones(sequences.shape[0], steps, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(input_ids=sequences, attention_mask=full_mask, pixel_values=batch["pixel_values"]).logits
    prompt_len = batch["input_ids"].shape[1]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, full[:, prompt_len - 1 + step], atol=1e-4, rtol=0)


def test_bf16_dense_plan_equals_base_and_closed_heads_stay_finite():
    model, batch = tiny_llava().to(torch.bfloat16), tiny_batch()
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with torch.no_grad():
        base = model(**batch).logits
    apply_plan(model, Plan.dense(3, 4))
    with torch.no_grad():
        gated = model(**batch).logits
    torch.testing.assert_close(valid_logits(gated, batch), valid_logits(base, batch), atol=1e-2, rtol=0)
    apply_plan(model, random_plan(3, window=3))  # replaces the fixed gates; bf16 lowest value on closed heads
    model.train()
    loss = model(**batch).logits.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("per_sample", [True, False])
def test_training_draws_gates_per_sample(per_sample):
    """Every sample of a batch gets its own hard-concrete draw in training (lower-variance gate
    gradients); with per_sample=False the batch shares one; eval is deterministic and shared."""
    model, one = tiny_llava(), tiny_batch(images_per_sample=(1,), padding="right")
    gates = attach_gates(model, GateConfig(window=3, init_log_alpha=0.0, per_sample=per_sample))
    twice = {k: torch.cat([v, v]) for k, v in one.items()}
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model(**twice).logits
        values = gates(batch_size=2)
    assert values.head.shape == ((2, 3, 4) if per_sample else (1, 3, 4))
    differ = (logits[0] - logits[1]).abs().max()
    assert (differ > 1e-2) if per_sample else (differ < 1e-5)
    model.eval()
    with torch.no_grad():
        logits = model(**twice).logits
        assert gates(batch_size=2).head.shape == (1, 3, 4)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def _additive_mask_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The gated rule written as one additive (B, H, Q, K) mask (window/causal + log e on visual keys)."""
    from visprune.modeling import gated_attention as ga

    ctx = ga._ctx_from(kwargs, module)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    allowed = ga._window_allowed(ctx, attention_mask[:, 0].bool(), ctx.window)
    low = torch.finfo(query.dtype).min
    log_gate = ctx.log_head_gates(module.layer_idx, query.dtype)
    key_gate = torch.where(ctx.layout.visual_mask[:, None, None, :], log_gate[:, :, None, None],
                           torch.zeros((), dtype=query.dtype))
    bias = (torch.where(allowed, 0.0, low).to(query.dtype)[:, None] + key_gate).clamp_min(low)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling)
    return ga._finish(ctx, module.layer_idx, out), None


@pytest.mark.parametrize("num_kv_heads, padding", [(4, "left"), (2, "right")])
def test_gate_channel_equals_an_additive_mask_in_training_forward_and_backward(num_kv_heads, padding):
    """Sampled per-sample gates in train mode: the log-gate channel gives the outputs and the gradients (gates,
    LoRA-free weights) of the additive (B, H, Q, K) mask it replaces."""
    from unittest import mock

    from visprune.modeling import gated_attention as ga

    results = []
    for impl in (ga.visprune_sdpa_attention, _additive_mask_attention):
        model, batch = tiny_llava(num_kv_heads=num_kv_heads), tiny_batch(padding=padding)
        gates = attach_gates(model, GateConfig(window=3, init_log_alpha=0.5))
        model.train()
        torch.manual_seed(5)
        from transformers import AttentionInterface

        with mock.patch.dict(AttentionInterface._global_mapping, {ga.SDPA_NAME: impl}):
            logits = model(**batch).logits
        loss = valid_logits(logits, batch).float().pow(2).mean()
        loss.backward()
        q_proj = next(p.grad for n, p in model.named_parameters() if "layers.1." in n and "q_proj.weight" in n).clone()
        results.append((valid_logits(logits, batch).detach(), gates.head.log_alpha.grad.clone(),
                        gates.router.log_alpha.grad.clone(), q_proj))
    for ours, theirs in zip(results[0], results[1]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert results[0][1].abs().sum() > 0
