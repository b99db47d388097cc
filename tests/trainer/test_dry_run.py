"""`visprune train RECIPE --dry-run`: counts against hand-computed ones, model-state bytes against DeepSpeed's
own estimators, activations measured on the meta device against the same count on a real CPU forward, every
built-in recipe through the real CLI, and bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_hostile_inputs import assert_refused, run_cli, tree_digest
from visprune.data_prep.toy import write_toy_inputs
from visprune.trainer.build import add_trainable
from visprune.trainer.config import load_recipe
from visprune.trainer.dry_run import (
    _saved_bytes,
    _text_batch,
    activation_bytes,
    build_meta_model,
    dry_run,
    model_state_bytes,
)

REPO = Path(__file__).resolve().parents[2]
BUILTIN = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*/*.yaml") if p.parent.name != "toy")
KEYS = {"total_params", "trainable_params", "lora_params", "gate_params", "per_gpu_bytes", "flops_per_sample"}


def lora_params(layers, hidden, intermediate, kv_dim, rank):
    """LoRA on q/k/v/o/gate/up/down: rank x (in + out) per adapted linear layer."""
    attn = (hidden + hidden) + (hidden + kv_dim) * 2 + (hidden + hidden)
    mlp = (hidden + intermediate) * 3
    return layers * rank * (attn + mlp)


def test_llava_7b_counts_are_the_hand_computed_ones():
    recipe = load_recipe(REPO / "recipes/llava-1.5-7b/flops25.yaml")
    report = dry_run(recipe, REPO / "recipes/llava-1.5-7b/flops25.yaml", gpus=8)
    assert report["lora_params"] == lora_params(32, 4096, 11008, 4096, 128) == 319_815_680
    assert report["gate_params"] == 32 * 32 + 32 + 32
    assert report["trainable_params"] == report["lora_params"] + report["gate_params"] + 2  # + the 2 multipliers
    per_gpu = report["per_gpu_bytes"]
    assert per_gpu["total"] == sum(per_gpu[k] for k in ("weights", "grads", "optimizer", "activations"))
    assert per_gpu["weights"] == 2 * report["total_params"]  # ZeRO-2 keeps every bf16 weight on every GPU
    assert per_gpu["optimizer"] == 12 * report["trainable_params"] // 8
    assert report["activations"]["with_checkpointing"] < report["activations"]["without_checkpointing"]
    assert report["deepspeed_config"]["zero_optimization"]["stage"] == 2


def test_the_plan_loss_is_costed_until_plan_select_fixes_the_plan():
    from transformers import AutoConfig
    from visprune.trainer.dry_run import flops_per_sample

    path = REPO / "recipes/llava-1.5-7b/flops25.yaml"
    config = AutoConfig.from_pretrained(REPO / "recipes/llava-1.5-7b")
    base = ["plan_loss.weight=0", "distill.enabled=false"]
    plain = flops_per_sample(load_recipe(path, base), config, 0)
    forward = plain["language_model_forward"]
    step = plain["flops_per_sample"]  # forward + backward (+ recompute), nothing else
    to_end = flops_per_sample(load_recipe(path, [*base, "plan_loss.weight=1", "plan_loss.start=0.25"]), config, 0)
    fixed = flops_per_sample(load_recipe(path, [*base, "plan_loss.weight=1", "plan_loss.start=0.25",
                                                "plan_select.at=0.5", "budget.warmup_steps=0"]), config, 0)
    assert to_end["flops_per_sample"] == pytest.approx(step * 1.75, rel=1e-6)
    assert fixed["flops_per_sample"] == pytest.approx(step * 1.25, rel=1e-6) and forward < step


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_full_fine_tuning_states_equal_deepspeeds_estimators(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest = 6_738_415_616, 131_072_000  # every parameter trainable, as the estimators assume
    for offload in (False, True):
        zero2 = model_state_bytes(params, params, largest, 2, gpus, offload, 2)
        _, expected = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=offload)
        assert sum(zero2.values()) == pytest.approx(expected, abs=8)
        zero3 = model_state_bytes(params, params, largest, 3, gpus, offload, 2)
        _, expected, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpus,
                                                               cpu_offload=offload, cpu_offload_params=False)
        assert sum(zero3.values()) == pytest.approx(expected, abs=8)


def test_zero3_splits_the_weights_and_the_13b_recipe_fits_on_8_gpus():
    path = REPO / "recipes/llava-1.5-13b/flops25.yaml"
    report = dry_run(load_recipe(path), path, gpus=8)
    assert report["zero_stage"] == 3
    assert report["lora_params"] == lora_params(40, 5120, 13824, 5120, 128)
    assert report["per_gpu_bytes"]["weights"] < report["total_params"] * 2 // 4
    assert report["per_gpu_bytes"]["total"] < 80 * 2**30


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_inputs(tmp_path_factory.mktemp("toy"), num_samples=8, seed=0)


def toy_recipe(toy, *overrides):
    return load_recipe(REPO / "recipes/toy/flops25.yaml",
                       [f"model.path={toy['model']}", f"data.path={toy['data']}", "model.dtype=bf16",
                        f"data.image_folder={toy['image_folder']}", "train.micro_batch_size=2", "data.max_length=96",
                        *overrides])


def test_meta_measurement_equals_a_real_cpu_forward(toy):
    """What the meta device counts (attention as a fused kernel) is what a real bf16 forward on CPU keeps, where
    SDPA runs its fused kernel: embeddings/head/loss plus L x one layer."""
    from transformers import AutoModelForImageTextToText

    recipe = toy_recipe(toy)
    acts = activation_bytes(recipe, Path(toy["model"]), "flex")
    model = AutoModelForImageTextToText.from_pretrained(toy["model"], dtype=torch.bfloat16, attn_implementation="sdpa")
    layers = model.config.text_config.num_hidden_layers
    model = add_trainable(model, recipe)
    model.train()
    batch = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in _text_batch(model, 2, 96).items()}
    real = _saved_bytes(model, batch)
    predicted = acts["embeddings_head_loss"] + layers * acts["per_layer"]
    assert predicted == pytest.approx(real, rel=0.02)
    assert acts["without_checkpointing"] - acts["gated_attention_transient"] - 2 * layers * 4 * 3 >= predicted - 64


def test_the_sdpa_backend_counts_its_padded_heads_and_one_shared_mask(toy):
    flex = activation_bytes(toy_recipe(toy), Path(toy["model"]), "flex")
    sdpa = activation_bytes(toy_recipe(toy), Path(toy["model"]), "sdpa")
    text = build_meta_model(toy_recipe(toy), Path(toy["model"])).config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    padded = head_dim + 8 - head_dim % 8
    assert sdpa["gated_attention_per_layer"] == 3 * 2 * text.num_attention_heads * 96 * padded * 2  # q, k, v bf16
    assert sdpa["gated_attention_transient"] == 2 * 96 * 96 * (2 + 1)  # (B, 1, Q, K) bf16 mask + bool mask
    assert sdpa["with_checkpointing"] > flex["with_checkpointing"]


@pytest.mark.parametrize("recipe", BUILTIN)
def test_every_builtin_recipe_through_the_cli(recipe):
    result = run_cli("train", recipe, "--dry-run", "--gpus", "8", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert KEYS <= set(report) and report["lora_params"] > 0 and report["gate_params"] > 0
    assert set(report["per_gpu_bytes"]) == {"weights", "grads", "optimizer", "activations", "total"}
    assert report["per_gpu_bytes"]["total"] < 80 * 2**30, "a built-in recipe must fit an 80 GB GPU"


def test_the_toy_recipe_dry_runs_on_its_model_folder(toy):
    result = run_cli("train", "recipes/toy/flops25.yaml", f"model.path={toy['model']}", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LoRA" in result.stdout and "per GPU" in result.stdout


def test_bad_dry_runs_are_refused_in_one_line(tmp_path, toy):
    before = tree_digest(REPO / "recipes")
    assert_refused(run_cli("train", "recipes/toy/flops25.yaml", "--dry-run", "--gpus", "0"), "--gpus")
    assert_refused(run_cli("train", "recipes/toy/flops25.yaml", "--json"), "--dry-run")
    assert_refused(run_cli("train", "recipes/toy/flops25.yaml", "model.path=org/no-such-model", "--dry-run"),
                   "config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava", "text_config": {"num_hidden_layers": 1e9}')
    assert_refused(run_cli("train", "recipes/toy/flops25.yaml", f"model.path={broken}", "--dry-run"), "config.json")
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text('{"model_type": "llava", "pad": "' + "x" * (17 * 2**20) + '"}')
    assert_refused(run_cli("train", "recipes/toy/flops25.yaml", f"model.path={huge}", "--dry-run"), "config.json")
    layers = tmp_path / "layers"
    layers.mkdir()
    (layers / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"num_hidden_layers": 10**9}}))
    assert_refused(run_cli("train", "recipes/toy/flops25.yaml", f"model.path={layers}", "--dry-run"),
                   "num_hidden_layers")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((Path(toy["model"]) / "config.json").read_text())
    assert_refused(run_cli("train", "recipes/toy/flops25.yaml", f"model.path={other}", "model.family=qwen2_vl",
                           "--dry-run"), "model.family")
    assert tree_digest(REPO / "recipes") == before
