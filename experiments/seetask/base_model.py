"""The dense toy base model of the see-task: a tiny LLaVA (small ViT, projector, small Llama LM,
vocabulary from a word-level tokenizer built here) trained from scratch on CPU and saved as a
standard HF folder with its processor, so every later step uses the real `from_pretrained` path."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.records import build_dataset
from visprune.data_prep.seetask import SeeTaskConfig, seetask_words
from visprune.data_prep.templates import resolve_template
from visprune.data_prep.toy import IMAGE, build_processor, build_tokenizer
from visprune.trainer.eval.teacher_forced import evaluate

logger = logging.getLogger(__name__)

BASE_REPORT = "base_report.json"


@dataclass
class BaseModelConfig:
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_feature_layer: int = -1  # the vision tower hidden state the projector reads (-(layers+1): patch embeddings only)
    text_hidden: int = 128
    text_layers: int = 4
    text_intermediate: int | None = None  # the language model's MLP width (default 4 x text_hidden)
    heads: int = 4
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    eval_samples: int = 200  # validation samples scored at the end


def build_base_model(tokenizer, task: SeeTaskConfig, cfg: BaseModelConfig):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    grid = task.patch_grid
    vision = CLIPVisionConfig(image_size=task.image_size, patch_size=task.patch_size, hidden_size=cfg.vision_hidden,
                              intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                              num_attention_heads=cfg.heads, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate or 4 * cfg.text_hidden,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                         image_seq_length=grid * grid, vision_feature_layer=cfg.vision_feature_layer,
                         vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")


def train_base(data_dir: str | Path, out_dir: str | Path, cfg: BaseModelConfig | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Train the dense base on `data_dir/train.json` (written by `write_seetask`) and save it to `out_dir`.

    Returns the report (also written to `out_dir/base_report.json`): config, minutes, final loss and
    the validation scores.
    """
    from tqdm.auto import tqdm

    cfg = cfg or BaseModelConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    task = SeeTaskConfig(**{k: v for k, v in json.loads((data_dir / "scenes.json").read_text())["config"].items()
                            if k not in ("colours", "shapes")})
    tokenizer = build_tokenizer(seetask_words(task))
    processor = build_processor(tokenizer, image_size=task.image_size, patch_size=task.patch_size)
    model = build_base_model(tokenizer, task, cfg).train()

    dataset = build_dataset(data_dir / "train.json")
    collator = ChatCollator(processor, resolve_template(processor, "auto", "llava"), image_folder=data_dir / "images",
                            max_length=512)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collator,
                                         generator=gen, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress_frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start = time.time()
    step, loss_value = 0, float("nan")
    bar = tqdm(total=cfg.steps, desc="dense base", disable=not progress)
    while step < cfg.steps:
        for batch in loader:
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"dense base: non-finite loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.update(1)
            if step >= cfg.steps:
                break
    bar.close()
    minutes = (time.time() - start) / 60
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    scores = evaluate(model, processor, data_dir / "val.json", data_dir / "images", limit=cfg.eval_samples,
                      progress=progress)
    report = {"config": asdict(cfg), "task": asdict(task), "train_minutes": minutes, "final_loss": loss_value,
              "val": scores}
    (out_dir / BASE_REPORT).write_text(json.dumps(report, indent=1) + "\n")
    logger.info("dense base: %.1f min, loss %.3f, val describe token accuracy %.2f%%, ask exact match %.2f%%",
                minutes, loss_value, 100 * scores.get("describe_token_accuracy", float("nan")),
                100 * scores.get("ask_exact_match", float("nan")))
    return report


__all__ = ["BASE_REPORT", "BaseModelConfig", "build_base_model", "train_base"]
