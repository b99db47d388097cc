"""A tiny dense see-task model folder and a hardened copy (a plan, `load_pruned` applies it) plus VQA-,
POPE- and multiple-choice-style files over the see-task images: CPU, no downloads, seconds to build."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from visprune.data_prep.seetask import SeeTaskConfig, seetask_words, write_seetask
from visprune.data_prep.toy import build_processor, build_tokenizer
from visprune.experiments.seetask.base_model import BaseModelConfig, build_base_model
from visprune.modeling import PLAN_FILE, LayerPlan, Plan

PLAN = Plan(family="llava", window=3, num_layers=2, num_heads=4,
            layers=(LayerPlan(heads=(0, 1), mlp=True), LayerPlan(heads=(), mlp=False)))


def make_tiny(root: Path, num_test: int = 8) -> dict[str, Path]:
    """root/dense (plain), root/pruned (the same weights + PLAN), root/data/{test.json, images/}."""
    task = SeeTaskConfig(num_train=2, num_val=2, num_test=num_test, seed=0)
    paths = write_seetask(root / "data", task, progress=False)
    tokenizer = build_tokenizer(seetask_words(task))
    processor = build_processor(tokenizer, image_size=task.image_size, patch_size=task.patch_size)
    model = build_base_model(tokenizer, task, BaseModelConfig(text_hidden=32, text_layers=2, vision_hidden=32))
    model.save_pretrained(root / "dense")
    processor.save_pretrained(root / "dense")
    shutil.copytree(root / "dense", root / "pruned")
    PLAN.to_json(root / "pruned" / PLAN_FILE)
    return {"dense": root / "dense", "pruned": root / "pruned", "test": Path(paths["test"]),
            "images": Path(paths["image_folder"])}


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def records_with(tiny: dict[str, Path], answers: list[str], **extra) -> list[dict]:
    """The test split's prompts with `answers` as the gpt turns (and `extra` fields on every record)."""
    base = json.loads(tiny["test"].read_text())
    out = []
    for record, answer in zip(base, answers):
        record = dict(record)
        record["conversations"] = [record["conversations"][0], {"from": "gpt", "value": answer}]
        record.update(extra)
        out.append(record)
    return out


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
    spinning against other processes make every small matmul ~100x slower: run these tests on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
