"""Generation-based scoring of local VQA-style files (`visprune eval --metric vqa|pope|mc`): greedy
decoding in left-padded batches, then the answers scored by `scoring` (VQAv2 accuracy, POPE, letter
matching), overall and per category.

The file format (docs/evaluation.md) is LLaVA's: a JSON list (or JSON lines) of records with `id`,
optional `image` (a path or list of paths inside the image folder) and `conversations`; the prompt is
every turn before the last `gpt` turn (rendered with the model's chat template, see
`data_prep.templates.resolve_for_model`, and its generation prompt), the last `gpt` turn is the reference.
Optional fields: `answers` (vqa: the list of human answers, strings or VQAv2 `{"answer": ...}` dicts),
`category` (else `qtype`, else "all"), `options` (mc: a list, lettered A, B, ..., or a {letter: text}
mapping; the prompt must show them itself) and `answer` (mc: the reference letter or option text; pope: the
reference yes/no).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.records import DataError, normalize_record, read_records
from visprune.data_prep.templates import ChatTemplate, resolve_for_model

from .prompts import PromptEncoder, batches, to_model
from .scoring import (
    GENERATION_METRICS,
    breakdown,
    category_of,
    mc_letter,
    mc_reference,
    option_letters,
    pope_answer,
    pope_metrics,
    vqa_accuracy,
)


@dataclass
class EvalSample:
    """One scored record: `row` holds the prompt turns only (the dataset row format of `data_prep.records`)."""

    id: str
    row: dict[str, Any]
    reference: str  # the last gpt turn
    category: str
    answers: list[str] = field(default_factory=list)  # vqa: the references scored against
    options: dict[str, str] | None = None  # mc: {letter: text}
    target: str | None = None  # mc: the reference letter; pope: yes / no


def _answers(record: dict, reference: str) -> list[str]:
    raw = record.get("answers")
    if raw is None:
        return [reference]
    if not isinstance(raw, list) or not raw:
        raise ValueError("'answers' must be a non-empty list")
    answers = []
    for item in raw:
        if isinstance(item, dict):
            item = item.get("answer")
        if not isinstance(item, str):
            raise TypeError("'answers' items must be strings or {'answer': str} objects")
        answers.append(item)
    return answers


def read_samples(path: str | Path, metric: str, limit: int | None = None) -> list[EvalSample]:
    """The first `limit` records of a VQA-style file, checked for `metric` (see the module docstring).

    Raises:
        DataError: the file cannot be read, or records are malformed (every bad id is listed).
    """
    if metric not in GENERATION_METRICS:
        raise ValueError(f"metric must be one of {GENERATION_METRICS}, got {metric!r}")
    path = Path(path)
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    samples, problems = [], []
    for index, record in enumerate(records):
        name, row, reasons = normalize_record(record, index)
        if reasons:
            problems.append(f"  {name}: {'; '.join(reasons)}")
            continue
        turns = row["conversations"]
        last = max(idx for idx, turn in enumerate(turns) if turn["from"] == "gpt")
        if last == 0 or turns[last - 1]["from"] != "human":
            problems.append(f"  {name}: the last gpt turn must follow a human turn")
            continue
        reference = turns[last]["value"]
        prompt_row = {"id": row["id"], "images": row["images"], "conversations": turns[:last]}
        sample = EvalSample(id=row["id"], row=prompt_row, reference=reference, category=category_of(record))
        try:
            if metric == "vqa":
                sample.answers = _answers(record, reference)
            elif metric == "pope":
                raw = record.get("answer", reference)
                sample.target = pope_answer(str(raw))
                if sample.target == "other":
                    raise ValueError(f"POPE reference {raw!r} is neither yes nor no")
            else:
                if not isinstance(record.get("options"), (list, dict)) or not record["options"]:
                    raise ValueError("mc records need 'options' (a list or a {letter: text} mapping)")
                sample.options = option_letters(record["options"])
                sample.target = mc_reference(str(record.get("answer", reference)), sample.options)
        except (ValueError, TypeError) as exc:
            problems.append(f"  {name}: {exc}")
            continue
        samples.append(sample)
    if problems:
        raise DataError(f"{path}: {len(problems)} of {len(records)} samples cannot be scored with --metric "
                        f"{metric}:\n" + "\n".join(problems))
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def generate_ids(model: torch.nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], max_new_tokens: int,
                 stop_ids: list[int] | None = None, **settings: Any) -> torch.Tensor:
    """The new token ids (B, <= max_new_tokens) `model.generate` appends to a left-padded batch: greedy unless
    `settings` say otherwise (`do_sample`, `temperature`, `num_beams`, ...); decoding stops at `stop_ids`
    (default: the tokenizer's EOS)."""
    settings = {"do_sample": False, "num_beams": 1, **settings}
    with torch.no_grad():
        out = model.generate(**to_model(batch, model), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids or tokenizer.eos_token_id,
                             **settings)
    return out[:, batch["input_ids"].shape[1]:]


def generate(model: torch.nn.Module, processor: Any, batch: dict[str, torch.Tensor], max_new_tokens: int,
             stop_ids: list[int] | None = None) -> list[str]:
    """Greedy answers of one left-padded batch (the new tokens decoded, special tokens dropped, stripped);
    decoding stops at `stop_ids` (default: the tokenizer's EOS)."""
    tokenizer = processor.tokenizer
    new = generate_ids(model, tokenizer, batch, max_new_tokens, stop_ids)
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def generate_answers(model: torch.nn.Module, processor: Any, rows: list[dict], image_folder: str | Path | None,
                     batch_size: int = 8, max_new_tokens: int = 64, template: ChatTemplate | None = None,
                     progress: bool = True) -> list[str]:
    """Greedy answers to prompt rows, in order, `batch_size` at a time, prompted with `template`
    (default: `resolve_for_model(model, processor)`)."""
    from tqdm.auto import tqdm

    encoder = PromptEncoder(processor, image_folder, template or resolve_for_model(model, processor))
    model.eval()
    answers: list[str] = []
    with tqdm(total=len(rows), desc="generate", disable=not progress) as bar:
        for chunk in batches(rows, batch_size):
            answers += generate(model, processor, encoder.batch(chunk), max_new_tokens, encoder.stop_ids)
            bar.update(len(chunk))
    return answers


def score_answers(metric: str, samples: list[EvalSample], predictions: list[str]) -> dict[str, Any]:
    """The metric's numbers over `predictions` (one per sample): `score` (the main number: VQA accuracy,
    POPE accuracy or multiple-choice accuracy), `by_category`, POPE's precision / recall / F1 / yes-ratio
    (overall and per category), and `per_sample` records for a predictions file."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    per_sample, scores = [], []
    for sample, pred in zip(samples, predictions):
        entry: dict[str, Any] = {"id": sample.id, "category": sample.category, "prediction": pred,
                                 "reference": sample.reference}
        if metric == "vqa":
            score = vqa_accuracy(pred, sample.answers)
            if len(sample.answers) > 1:
                entry["answers"] = sample.answers
        elif metric == "pope":
            entry["parsed"] = pope_answer(pred)
            entry["target"] = sample.target
            score = float(entry["parsed"] == sample.target)
        elif metric == "mc":
            entry["letter"] = mc_letter(pred, sample.options)
            entry["target"] = sample.target
            score = float(entry["letter"] == sample.target)
        else:
            raise ValueError(f"metric must be one of {GENERATION_METRICS}, got {metric!r}")
        entry["score"] = score
        scores.append(score)
        per_sample.append(entry)
    categories = [sample.category for sample in samples]
    result: dict[str, Any] = {"metric": metric, "samples": len(samples), "score": sum(scores) / len(scores),
                              "by_category": breakdown(scores, categories)}
    if metric == "pope":
        parsed, targets = [e["parsed"] for e in per_sample], [e["target"] for e in per_sample]
        result.update(pope_metrics(parsed, targets))
        for category, entry in result["by_category"].items():
            picked = [i for i, c in enumerate(categories) if c == category]
            entry.update(pope_metrics([parsed[i] for i in picked], [targets[i] for i in picked]))
    result["per_sample"] = per_sample
    return result


def evaluate_generation(model: torch.nn.Module, processor: Any, data_path: str | Path,
                        image_folder: str | Path | None, metric: str = "vqa", batch_size: int = 8,
                        max_new_tokens: int = 64, limit: int | None = None, progress: bool = True,
                        template: ChatTemplate | None = None) -> dict[str, Any]:
    """Generate an answer to every sample and score them (`score_answers`); also the generation settings."""
    samples = read_samples(data_path, metric, limit)
    predictions = generate_answers(model, processor, [s.row for s in samples], image_folder, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, template=template, progress=progress)
    result = score_answers(metric, samples, predictions)
    result.update({"max_new_tokens": max_new_tokens, "batch_size": batch_size})
    return result


def write_predictions(path: str | Path, per_sample: list[dict[str, Any]]) -> None:
    """One JSON object per line: id, category, prediction, reference, score (+ the metric's fields)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in per_sample)


__all__ = ["EvalSample", "evaluate_generation", "generate", "generate_answers", "generate_ids", "read_samples",
           "score_answers", "write_predictions"]
