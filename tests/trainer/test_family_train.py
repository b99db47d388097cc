"""Every family beyond LLaVA-1.5 trains a few CPU steps through the real trainer: the tiny model is
saved and loaded with `from_pretrained` as `build_model` does, `prepare_model` attaches gates and
LoRA, and `VispruneTrainer` runs the LM loss + Lagrangian FLOPs constraint on batches collated by
`ChatCollator.pad` (images of mixed sizes and text-only samples in one batch).

The Qwen2-VL and InternVL processors (`Qwen2VLProcessor`, `InternVLProcessor`) cannot be built in this
environment: transformers 5.x processors with a video processor need torchvision
(huggingface/transformers#48556), which visprune does not depend on; their samples are therefore
encoded here as the processor would encode them. LLaVA-NeXT's processor needs no torchvision, so it
also runs the whole `train()` (recipe -> from_pretrained model + processor -> collator -> checkpoint)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tiny_families import TINY_FAMILIES
from transformers import AutoModelForImageTextToText
from visprune.data_prep.collator import ChatCollator, cat_images
from visprune.trainer.build import build_training_args, prepare_model
from visprune.trainer.config import load_recipe
from visprune.trainer.trainer import VispruneTrainer

ENCODED_FAMILIES = ["qwen2_vl", "internvl", "llava_next"]
VISION_TOWER = {"qwen2_vl": "visual", "internvl": "vision_tower", "llava_next": "vision_tower"}  # attribute of the multimodal core


def family_recipe(family: str, model_dir, out_dir, *overrides):
    return load_recipe("recipes/toy/flops25.yaml", [
        f"model.family={family}", f"model.path={model_dir}", "data.path=unused.json", f"output.dir={out_dir}",
        "train.max_steps=4", "train.micro_batch_size=3", "budget.warmup_steps=0", "output.save_steps=4",
        "output.heatmap_steps=0", "budget.system_tokens=4", "budget.text_tokens=6", *overrides])


@pytest.mark.parametrize("family", ENCODED_FAMILIES)
def test_family_trains_a_few_steps(family, tmp_path):
    tiny = TINY_FAMILIES[family]()
    tiny.model.save_pretrained(tmp_path / "model")
    recipe = family_recipe(family, tmp_path / "model", tmp_path / "run")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model", dtype=torch.float32,
                                                        attn_implementation="sdpa")  # as build_model loads it
    assert model.config.model_type == family
    model, gates, controller = prepare_model(model, recipe)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    assert all("language_model" in n or "visprune_" in n for n in trainable), trainable  # never the vision tower
    before = gates.head.log_alpha.detach().clone()

    collate = ChatCollator.pad.__get__(SimpleNamespace(pad_token_id=0))  # the real collator's batching
    samples = tiny.samples(12)
    trainer = VispruneTrainer(model=model, args=build_training_args(recipe, None), train_dataset=samples,
                              data_collator=collate, recipe=recipe, gates=gates, controller=controller)
    text_only = collate([s for s in samples if "pixel_values" not in s][:2])
    calls = []
    tower = getattr(trainer.model.get_base_model().model, VISION_TOWER[family])
    hook = tower.register_forward_hook(lambda *args: calls.append(1))
    anchor = trainer._vision_anchor(trainer.model, text_only)  # text-only batches still run the vision tower
    hook.remove()
    assert calls and float(anchor) == 0.0
    trainer.train()

    history = [e for e in trainer.state.log_history if "visprune/expected_visual_flops" in e]
    assert len(history) == 4 and all(math.isfinite(e["loss"]) for e in history)
    flops = [e["visprune/expected_visual_flops"] for e in history]
    assert flops[-1] < flops[0] - 0.01, flops  # the constraint pulls ŝ towards the 0.25 budget
    assert not torch.equal(gates.head.log_alpha.detach(), before)
    assert (tmp_path / "run" / "checkpoint-4" / "gates.safetensors").is_file()


def test_llava_next_trains_through_visprune_train(tmp_path):
    """The whole `train()` path with LLaVA-NeXT's real processor (anyres tiles, newlines) and the real
    collator: images of two aspect ratios (5 and 3 tiles) in one batch, text-only samples too."""
    import json

    from toy_families import write_toy_llava_next
    from visprune.trainer.trainer import train

    inputs = write_toy_llava_next(tmp_path / "inputs", num_samples=24)
    recipe = family_recipe("llava_next", inputs["model"], tmp_path / "run", f"data.path={inputs['data']}",
                           f"data.image_folder={inputs['image_folder']}", "train.micro_batch_size=4")
    run_dir = train(recipe, resume="never")
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    history = [e for e in state["log_history"] if "visprune/expected_visual_flops" in e]
    assert len(history) == 4 and all(math.isfinite(e["loss"]) for e in history)
    assert (run_dir / "checkpoint-4" / "gates.safetensors").is_file()


def test_tile_stacks_of_different_sizes_are_zero_padded():
    five, three = torch.ones(1, 5, 3, 2, 2), 2 * torch.ones(2, 3, 3, 2, 2)
    out = cat_images([five, three])
    assert out.shape == (3, 5, 3, 2, 2)
    assert (out[0] == 1).all() and (out[1:, :3] == 2).all() and (out[1:, 3:] == 0).all()
    flat = cat_images([torch.ones(4, 24), torch.ones(2, 24)])  # Qwen2-VL patch rows: plain concatenation
    assert flat.shape == (6, 24)
