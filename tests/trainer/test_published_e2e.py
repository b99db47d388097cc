"""The first real checkpoint a user brings: through the processor files llava-hf publishes for LLaVA-1.5 and
LLaVA-NeXT (tests/fixtures/processors, a local tokenizer carrying their special tokens, a tiny model whose
vision geometry is the published one), every verb runs: `data check`, `data prepare`, `train`, `harden`,
`load_pruned` + `generate` and `eval`, prompting exactly as training did.

Qwen2-VL and InternVL are not here: their published processors need torchvision, which cannot be installed
beside the CPU torch of this machine (tests/data_prep/test_templates.py checks their templates on their
published tokenizers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from visprune.data_prep.templates import TEMPLATE_FILE, ChatTemplate
from visprune.modeling import load_pruned
from visprune.trainer.cli import main


@pytest.mark.parametrize(("name", "family"), [("llava-1.5", "llava"), ("llava-next", "llava_next")])
def test_published_processor_end_to_end(name, family, tmp_path, capsys):
    from published import write_published_assets

    paths = write_published_assets(name, tmp_path / "assets", num_samples=6)
    data = ["--json", paths["data"], "--images", paths["image_folder"], "--processor", paths["model"],
            "--max-length", "4096"]
    assert main(["data", "check", *data]) == 0
    assert "6 of 6 samples ok" in capsys.readouterr().out
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", *data, "--out", str(prepared), "--num-proc", "1"]) == 0
    manifest = json.loads((prepared / "visprune_data.json").read_text())
    assert manifest["family"] == family and manifest["template"]["name"] == "llava_v1"
    assert "renders no end-of-turn token" in manifest["template"]["reason"]

    run = tmp_path / "run"
    assert main(["train", "recipes/toy/flops25.yaml", f"model.family={family}", f"model.path={paths['model']}",
                 f"data.path={prepared}", f"data.image_folder={paths['image_folder']}", "data.max_length=4096",
                 f"output.dir={run}", "train.max_steps=2", "train.micro_batch_size=2", "output.save_steps=2",
                 "budget.warmup_steps=0", "output.heatmap_steps=0"]) == 0
    template = ChatTemplate.load(run / "checkpoint-2")
    assert template is not None and template.name == "llava_v1" and ChatTemplate.load(run) == template

    out = tmp_path / "export"
    assert main(["harden", str(run / "checkpoint-2"), "--out", str(out), "--budget", "0.5"]) == 0
    assert json.loads((out / "pruning_report.json").read_text())["template"] == "llava_v1"
    assert ChatTemplate.load(out) == template and (out / TEMPLATE_FILE).is_file()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template == template.source  # apply_chat_template prompts as training did

    model = load_pruned(out)
    image = Image.open(next(Path(paths["image_folder"]).iterdir())).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\nwhat colour is it? ASSISTANT:") and prompt.startswith("A chat between")
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3 or processor.tokenizer.eos_token_id in generated
    assert not (generated[:, inputs["input_ids"].shape[1]:] == processor.image_token_id).any()

    capsys.readouterr()
    assert main(["eval", str(out), "--data", paths["data"], "--images", paths["image_folder"], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["template"] == "llava_v1" and result["hardened"] and result["samples"] == 6
    assert main(["eval", str(out), "--data", paths["data"], "--images", paths["image_folder"], "--metric", "vqa",
                 "--max-new-tokens", "2", "--batch-size", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "llava_v1"
