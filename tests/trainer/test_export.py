"""`visprune harden`: checkpoint -> merged HF folder + plan within the budget + report."""

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from visprune.data_prep.records import build_dataset
from visprune.data_prep.toy import write_toy_inputs
from visprune.modeling import LayerPlan, Plan, apply_plan, load_pruned
from visprune.trainer.build import build_collator
from visprune.trainer.cli import main
from visprune.trainer.config import load_recipe
from visprune.trainer.export import PLAN_FILE, REPORT_FILE, HardenError, harden, load_checkpoint
from visprune.trainer.trainer import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden")
    inputs = write_toy_inputs(root / "inputs", num_samples=32, seed=0)
    recipe = load_recipe("recipes/toy/flops25.yaml", [
        f"model.path={inputs['model']}", f"data.path={inputs['data']}", f"data.image_folder={inputs['image_folder']}",
        f"output.dir={root / 'run'}", "train.max_steps=6", "output.save_steps=6", "budget.warmup_steps=3"])
    return train(recipe, resume="never") / "checkpoint-6", recipe


def test_harden_exports_a_plain_model_with_plan_and_report(checkpoint, tmp_path, capsys):
    ckpt, recipe = checkpoint
    assert main(["harden", str(ckpt), "--out", str(tmp_path / "v12"), "--budget", "0.12"]) == 0
    assert "visual FLOPs" in capsys.readouterr().out
    out = tmp_path / "v12"
    plan = Plan.from_json(out / PLAN_FILE)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["budget"] == 0.12 and report["visual_flops"]["ratio"] <= 0.12
    assert report["heads_kept_per_layer"] == [len(layer.heads) for layer in plan.layers]
    assert set(report) >= {"visual_kv_bytes", "prefill_flops", "visual_layers_kept"}
    # stock transformers loads it as a dense model: the merged weights, plain module names
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.text_config._attn_implementation != "visprune_sdpa"
    assert list(out.glob("model*.safetensors"))
    batch = build_collator(recipe, model, processor)([build_dataset(recipe.data.path)[i] for i in range(2)])
    with torch.no_grad():
        dense = model(**batch).logits
    apply_plan(model, plan)  # and executes its plan in gated mode
    with torch.no_grad():
        gated = model(**batch).logits
    assert torch.isfinite(gated).all() and not torch.allclose(dense, gated)


def test_merged_weights_differ_from_base_and_same_run_any_budget(checkpoint, tmp_path):
    ckpt, recipe = checkpoint
    small = harden(ckpt, tmp_path / "a", budget=0.12)
    large = harden(ckpt, tmp_path / "b", budget=0.25)
    assert small["visual_flops"]["pruned"] <= large["visual_flops"]["pruned"]
    base = LlavaForConditionalGeneration.from_pretrained(recipe.model.path)
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(base.named_parameters())[name], dict(merged.named_parameters())[name])


def test_given_plan_over_budget_is_refused_with_numbers(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    Plan.dense(3, 4, window=3).to_json(tmp_path / "dense.json")
    with pytest.raises(HardenError, match=r"keeps 0\.\d+ of the dense visual FLOPs .* over the budget 0.25"):
        harden(ckpt, tmp_path / "x", budget=0.25, plan_path=str(tmp_path / "dense.json"))
    small = Plan(family="llava", window=3, num_layers=3, num_heads=4,
                 layers=(LayerPlan(heads=(0,), mlp=False),) + (LayerPlan(heads=(), mlp=False),) * 2)
    small.to_json(tmp_path / "small.json")
    assert harden(ckpt, tmp_path / "y", budget=0.25, plan_path=str(tmp_path / "small.json"))["visual_layers_kept"] == 1


def test_harden_then_load_pruned_reproduces_in_memory_hardened_and_gated(checkpoint, tmp_path):
    ckpt, recipe = checkpoint
    out = tmp_path / "v25"
    harden(ckpt, out, budget=0.25)
    plan = Plan.from_json(out / PLAN_FILE)
    processor = AutoProcessor.from_pretrained(out)
    batch = build_collator(recipe, load_pruned(out), processor)([build_dataset(recipe.data.path)[i] for i in range(3)])
    batch.pop("labels")
    valid = batch["attention_mask"].bool()

    in_memory, _, _, _ = load_checkpoint(ckpt)  # base + LoRA merged, never saved
    apply_plan(in_memory, plan, mode="hardened")
    loaded = load_pruned(out)
    assert loaded.visprune_plan == plan and not loaded.training
    stock = LlavaForConditionalGeneration.from_pretrained(out).eval()
    apply_plan(stock, plan)  # gated reference on the exported weights
    with torch.no_grad():
        expected = in_memory.eval()(**batch).logits[valid]
        got = loaded(**batch).logits[valid]
        gated = stock(**batch).logits[valid]
        generated = loaded.generate(**batch, max_new_tokens=4, do_sample=False)
        reference = stock.generate(**batch, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, gated, atol=1e-4, rtol=0)
    assert torch.equal(generated, reference)


def test_load_pruned_needs_a_plan(tmp_path):
    with pytest.raises(FileNotFoundError, match="pruning_plan.json"):
        load_pruned(tmp_path)


def test_fill_rule_uses_more_of_the_budget_and_is_reported(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    prefix = harden(ckpt, tmp_path / "prefix", budget=0.25)
    assert main(["harden", str(ckpt), "--out", str(tmp_path / "fill"), "--budget", "0.25", "--fill"]) == 0
    assert "plan rule fill" in capsys.readouterr().out
    filled = json.loads((tmp_path / "fill" / REPORT_FILE).read_text())
    assert prefix["plan_rule"] == "prefix" and filled["plan_rule"] == "fill"
    assert prefix["visual_flops"]["ratio"] <= filled["visual_flops"]["ratio"] <= 0.25


def test_select_on_picks_the_lowest_loss_candidate_and_reports_every_one(checkpoint, tmp_path):
    ckpt, recipe = checkpoint
    argv = ["harden", str(ckpt), "--out", str(tmp_path / "sel"), "--budget", "0.25", "--fill",
            "--select-on", recipe.data.path, "--select-images", recipe.data.image_folder, "--candidates", "4",
            "--select-samples", "8"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "sel" / REPORT_FILE).read_text())
    selection = report["plan_selection"]
    assert report["plan_rule"] == "fill, selected" and selection["samples"] == 8
    tried = selection["candidates"]
    assert 1 <= len(tried) <= 4 and tried[0]["source"] == "scores"
    assert all(t["visual_flops_ratio"] <= 0.25 for t in tried)
    best = min(tried, key=lambda t: t["loss"])
    assert selection["chosen"] == best["source"]
    assert report["visual_flops"]["ratio"] == pytest.approx(best["visual_flops_ratio"])


def test_select_on_bad_data_is_one_line(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"id\": 1")
    assert main(["harden", str(ckpt), "--out", str(tmp_path / "x"), "--select-on", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
