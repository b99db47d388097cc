"""`visprune eval`: teacher-forced scoring, per-type breakdown, hardened loading and FLOPs of the plan."""

import json

import pytest
import torch
from visprune.data_prep.seetask import SeeTaskConfig, seetask_words, write_seetask
from visprune.data_prep.toy import build_processor, build_tokenizer
from visprune.experiments.seetask.base_model import BaseModelConfig, build_base_model
from visprune.modeling import LayerPlan, Plan
from visprune.trainer.cli import main
from visprune.trainer.eval.teacher_forced import answer_scores


def test_answer_scores_shift_and_mask():
    labels = torch.tensor([[-100, -100, 5, 6, 2], [-100, 7, 8, -100, -100]])
    logits = torch.zeros(2, 5, 10)
    # position t predicts labels[t + 1]
    for b, t, token in [(0, 1, 5), (0, 2, 6), (0, 3, 3), (1, 0, 7), (1, 1, 8)]:
        logits[b, t, token] = 1.0
    correct, total = answer_scores(logits, labels)
    assert correct.tolist() == [2, 2] and total.tolist() == [3, 2]


@pytest.fixture(scope="module")
def see_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("see")
    task = SeeTaskConfig(num_train=4, num_val=4, num_test=12, seed=0)
    paths = write_seetask(root / "data", task, progress=False)
    tokenizer = build_tokenizer(seetask_words(task))
    processor = build_processor(tokenizer, image_size=task.image_size, patch_size=task.patch_size)
    model = build_base_model(tokenizer, task, BaseModelConfig(text_hidden=32, text_layers=2, vision_hidden=32))
    model.save_pretrained(root / "dense")
    processor.save_pretrained(root / "dense")
    return root, paths


def test_eval_dense_and_hardened_folders(see_model, capsys):
    root, paths = see_model
    assert main(["eval", str(root / "dense"), "--data", paths["test"], "--images", paths["image_folder"],
                 "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert dense["samples"] == 12 and not dense["hardened"] and dense["visual_flops"]["ratio"] == 1.0
    assert set(dense["by_type"]) <= {"describe", "colour_at", "shape_at", "count", "exists"}
    assert sum(entry["samples"] for entry in dense["by_type"].values()) == 12
    assert 0.0 <= dense["describe_token_accuracy"] <= 1.0 and "ask_exact_match" in dense

    # the same folder with a plan is loaded hardened and reports the plan's FLOPs
    import shutil

    shutil.copytree(root / "dense", root / "pruned")
    Plan(family="llava", window=3, num_layers=2, num_heads=4,
         layers=(LayerPlan(heads=(0, 1), mlp=True), LayerPlan(heads=(), mlp=False))).to_json(root / "pruned" /
                                                                                            "pruning_plan.json")
    assert main(["eval", str(root / "pruned"), "--data", paths["test"], "--images", paths["image_folder"]]) == 0
    out = capsys.readouterr().out
    assert "hardened model" in out and "describe token accuracy" in out and "exact match" in out


def test_eval_missing_folder_is_a_clean_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--data", str(tmp_path / "x.json")]) == 2
