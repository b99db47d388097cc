"""`model.train_projector` for every family: `prepare_model` trains exactly LoRA + the projector (or the
LM + the projector without LoRA) + gates + λ, one optimizer step moves the projector, and the projector
peft saves comes back from `PeftModel.from_pretrained(...).merge_and_unload()` as harden loads it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, tiny_batch, tiny_llava
from peft import PeftModel
from tiny_families import TINY_FAMILIES
from visprune.modeling import GateConfig, attach_gates
from visprune.trainer.build import prepare_model
from visprune.trainer.config import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy" / "flops25.yaml"
FAMILY_NAMES = ["llava", *sorted(TINY_FAMILIES)]
# where each family's projector is: stated here independently of the family code
PROJECTOR = {"llava": "model.multi_modal_projector", "llava_next": "model.multi_modal_projector",
             "internvl": "model.multi_modal_projector", "qwen2_vl": "model.visual.merger",
             "qwen2_5_vl": "model.visual.merger"}
LANGUAGE_MODEL = "model.language_model."
VISION = ("model.vision_tower.", "model.visual.")
GATES_AND_LAMBDA = ("visprune_gates.", "visprune_sparsity.")


def tiny_model_and_batch(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny model of the family and a training batch (several images, a text-only sample, padding),
    supervised on every text token."""
    if name == "llava":
        model, batch = tiny_llava(num_kv_heads=2), tiny_batch(images_per_sample=(1, 2, 0), padding="right")
    else:
        tiny = TINY_FAMILIES[name]()
        model, (batch, _) = tiny.model, tiny.batch(padding="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model, {**batch, "labels": labels.masked_fill(labels == IMAGE_TOKEN_ID, -100)}


def recipe_for(name: str, *overrides: str):
    return load_recipe(RECIPE, [f"model.family={name}", "model.path=unused", "data.path=unused.json",
                                "model.train_projector=true", *overrides])


def projector_state(model: torch.nn.Module, path: str) -> dict[str, torch.Tensor]:
    """The projector weights the model computes with (peft's trained copy when it wraps the module)."""
    module = model.get_submodule(path)
    copies = getattr(module, "modules_to_save", None)
    module = copies["default"] if copies is not None else module
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def one_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()


def assert_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys() and before
    assert all(not torch.equal(before[key], after[key]) for key in before if key.endswith("weight")), \
        [key for key in before if torch.equal(before[key], after[key])]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_trains_the_projector_and_harden_restores_it(name, tmp_path):
    model, batch = tiny_model_and_batch(name)
    fresh = copy.deepcopy(model)
    recipe = recipe_for(name)
    model, _, _ = prepare_model(model, recipe)
    projector = PROJECTOR[name]

    prefix = "base_model.model."
    names = {n: p.requires_grad for n, p in model.named_parameters()}
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    copy_prefix = f"{prefix}{projector}.modules_to_save.default."
    projector_copy = {n for n in names if n.startswith(copy_prefix)}
    gated = {n for n in names if n.startswith(tuple(prefix + p for p in GATES_AND_LAMBDA))}
    assert lora and all(n.startswith(prefix + LANGUAGE_MODEL) for n in lora)
    assert len(projector_copy) == len(list(fresh.get_submodule(projector).parameters()))
    assert {n for n, trainable in names.items() if trainable} == lora | projector_copy | gated
    assert not any(names[n] for n in names if n.startswith(tuple(prefix + v for v in VISION))
                   and not n.startswith(copy_prefix))  # never the rest of the vision tower

    before = projector_state(model.get_base_model(), projector)
    one_step(model, batch)
    trained = projector_state(model.get_base_model(), projector)
    assert_changed(before, trained)

    model.save_pretrained(tmp_path / "adapter")
    g = recipe.gates  # as `visprune harden` loads a checkpoint: gates first, then the adapter, merged
    attach_gates(fresh, GateConfig(heads=g.heads, visual_skip=g.visual_skip, visual_mlp=g.visual_mlp,
                                   window=recipe.window, init_log_alpha=g.init_log_alpha))
    merged = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).merge_and_unload()
    assert not hasattr(merged.get_submodule(projector), "modules_to_save")  # unwrapped: a plain HF model again
    restored = projector_state(merged, projector)
    assert restored.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(restored[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_full_fine_tuning_trains_the_language_model_and_projector(name):
    model, batch = tiny_model_and_batch(name)
    model, _, _ = prepare_model(model, recipe_for(name, "lora=null"))
    projector = PROJECTOR[name]
    names = {n: p.requires_grad for n, p in model.named_parameters()}
    expected = {n for n in names if n.startswith((LANGUAGE_MODEL, projector + ".", *GATES_AND_LAMBDA))}
    assert any(n.startswith(LANGUAGE_MODEL) for n in expected) and any(n.startswith(projector) for n in expected)
    assert {n for n, trainable in names.items() if trainable} == expected

    before = projector_state(model, projector)
    one_step(model, batch)
    assert_changed(before, projector_state(model, projector))
