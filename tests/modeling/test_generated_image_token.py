"""A model that wants to generate its image (or video) placeholder token: `generate()` of gated and
hardened models of every family never emits it and runs to `max_new_tokens`, hardened == gated
(cached decoding), and the suppression merges with the model's own and survives export + `load_pruned`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_llava
from tiny_families import IMAGE_TOKEN_ID, TINY_FAMILIES
from transformers import GenerationConfig
from visprune.modeling import PLAN_FILE, LayerPlan, Plan, apply_plan, detach_gates, load_pruned

FAMILY_NAMES = ["llava", *sorted(TINY_FAMILIES)]
VIDEO_TOKEN_ID = 4  # Qwen2-VL's video placeholder in the tiny configs
PLACEHOLDERS = {name: (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID) if name.startswith("qwen") else (IMAGE_TOKEN_ID,)
                for name in FAMILY_NAMES}
STEPS = 6
ATOL = 1e-4


def some_heads_kept(family: str) -> Plan:
    return Plan(family=family, window=3, num_layers=3, num_heads=4,
                layers=(LayerPlan(heads=(0, 2), mlp=True), LayerPlan(heads=(), mlp=False),
                        LayerPlan(heads=(1,), mlp=False)))


def tiny_model_and_batch(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    if name == "llava":
        return tiny_llava(num_kv_heads=2), tiny_batch(images_per_sample=(1, 2, 0), padding="left")
    tiny = TINY_FAMILIES[name]()
    return tiny.model, tiny.batch(padding="left")[0]


def bias_towards(model: torch.nn.Module, token_ids: tuple[int, ...]) -> None:
    """An LM-head bias that makes `token_ids[0]` the argmax everywhere (then the next ones)."""
    bias = torch.zeros(model.lm_head.out_features)
    for rank, token_id in enumerate(token_ids):
        bias[token_id] = 50.0 - rank
    model.lm_head.bias = torch.nn.Parameter(bias)


def generate(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_gated_and_hardened_generate_never_emit_a_placeholder(name):
    model, batch = tiny_model_and_batch(name)
    placeholders = PLACEHOLDERS[name]
    bias_towards(model, placeholders)
    plan = some_heads_kept(name)
    gated, hardened = model, copy.deepcopy(model)
    apply_plan(gated, plan)
    apply_plan(hardened, plan, mode="hardened")
    outs = {"gated": generate(gated, batch), "hardened": generate(hardened, batch)}
    prompt = batch["input_ids"].shape[1]
    for label, out in outs.items():
        assert out.sequences.shape[1] == prompt + STEPS, label
        generated = out.sequences[:, prompt:]
        assert not torch.isin(generated, torch.tensor(placeholders)).any(), (label, generated)
        assert (out.logits[0].argmax(-1) == IMAGE_TOKEN_ID).all(), label  # the model did want to emit it
    assert torch.equal(outs["hardened"].sequences, outs["gated"].sequences)
    for step in range(STEPS):
        torch.testing.assert_close(outs["hardened"].logits[step], outs["gated"].logits[step], atol=ATOL, rtol=0)


def test_suppression_merges_and_survives_export_and_load_pruned(tmp_path):
    model = tiny_llava(num_kv_heads=2)
    model.generation_config.suppress_tokens = [7]  # the model's own
    plan = some_heads_kept("llava")
    apply_plan(model, plan)
    assert model.generation_config.suppress_tokens == [7, IMAGE_TOKEN_ID]
    detach_gates(model)  # as `visprune harden` exports: a plain HF folder + the plan
    model.save_pretrained(tmp_path)
    plan.to_json(tmp_path / PLAN_FILE)
    assert GenerationConfig.from_pretrained(tmp_path).suppress_tokens == [7, IMAGE_TOKEN_ID]

    loaded = load_pruned(tmp_path)
    assert loaded.generation_config.suppress_tokens == [7, IMAGE_TOKEN_ID]  # merged, no duplicate
    bias_towards(loaded, (IMAGE_TOKEN_ID, 7))
    batch = tiny_batch(images_per_sample=(1, 0), padding="left")
    out = generate(loaded, batch)
    generated = out.sequences[:, batch["input_ids"].shape[1]:]
    assert generated.shape[1] == STEPS and not torch.isin(generated, torch.tensor([IMAGE_TOKEN_ID, 7])).any()
