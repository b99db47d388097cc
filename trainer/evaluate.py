"""`visprune eval`: score a model folder on LLaVA-format data with one teacher-forced forward per
batch. A sample's answer tokens (and its end-of-turn token) are predicted from the correct prefix:

- token accuracy = correct answer tokens / answer tokens (the see-task's describe metric);
- exact match = every answer token correct, which is exactly when greedy decoding reproduces the
  answer and stops (so no generation loop is needed).

Results are broken down by the records' `qtype` (see-task) or reported overall. A folder with a
`pruning_plan.json` is loaded hardened (`load_pruned`); its plan's visual FLOPs are reported
beside the dense model's.

`evaluate_dir(..., metric="vqa" | "pope" | "mc")` generates the answers instead and scores them the
way VQA benchmarks do (`vqa_eval`, `scoring`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.collator import LlavaCollator
from visprune.data_prep.processing import load_processor
from visprune.data_prep.records import IGNORE_INDEX, build_dataset, read_records
from visprune.data_prep.templates import ChatTemplate, resolve_for_model
from visprune.modeling import (
    PLAN_FILE,
    GateProbs,
    default_layout,
    flops_report,
    load_pruned,
)
from visprune.modeling.flops import dims_from_config

from .vqa_eval import METRIC_NAMES, METRICS, evaluate_generation, write_predictions

logger = logging.getLogger(__name__)


def load_for_eval(model_dir: str | Path, trust_remote_code: bool = False):
    """(model, processor): hardened when the folder has a plan, else the plain model; eval mode.

    Args:
        model_dir: a model folder (e.g. one `visprune harden` wrote).
        trust_remote_code: let the folder's own model and processor code run; only ever from the caller.

    Raises:
        FileNotFoundError: `model_dir` is not a model folder.
        ValueError: the folder's model needs its own code and `trust_remote_code` is off.
    """
    from transformers import AutoModelForImageTextToText

    if not isinstance(trust_remote_code, bool):  # a string "false" is truthy
        raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    try:
        if (model_dir / PLAN_FILE).is_file():
            model = load_pruned(model_dir, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForImageTextToText.from_pretrained(str(model_dir),
                                                                trust_remote_code=trust_remote_code).eval()
    except ValueError as exc:
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        raise ValueError(f"{model_dir} can only be loaded by running its own code (auto_map in its config): pass "
                         "--trust-remote-code if you trust it") from exc
    return model, load_processor(model_dir, trust_remote_code=trust_remote_code)


def plan_flops(model: torch.nn.Module) -> dict[str, float]:
    """Visual FLOPs of the model's plan (dense when it has none) under the default layout."""
    dims = dims_from_config(model.config)
    layout = default_layout(dims)
    dense = flops_report(dims, layout)
    plan = getattr(model, "visprune_plan", None)
    if plan is None:
        pruned = dense
    else:
        pruned = flops_report(dims, layout, GateProbs.from_plan(plan, dims.intermediate_size), window=plan.window)
    return {"dense": dense["visual_flops"], "model": pruned["visual_flops"],
            "ratio": pruned["visual_flops"] / dense["visual_flops"]}


def answer_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (correct answer tokens, answer tokens) under teacher forcing."""
    pred = logits[:, :-1].argmax(dim=-1)
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX
    return ((pred == target) & supervised).sum(dim=1), supervised.sum(dim=1)


def evaluate(model: torch.nn.Module, processor: Any, data_path: str | Path, image_folder: str | Path | None,
             batch_size: int = 32, max_length: int = 2048, limit: int | None = None,
             progress: bool = True, batch_kwargs: Any = None, template: ChatTemplate | None = None) -> dict[str, Any]:
    """Score `model` on a LLaVA-format JSON; see the module docstring. `batch_kwargs(batch, labels)`
    may add keyword arguments to each forward (baseline inference modes use it). The conversations are
    rendered with `template` (default: `resolve_for_model(model, processor)`)."""
    from tqdm.auto import tqdm

    dataset = build_dataset(data_path)
    path = Path(data_path)  # the records' extra fields (qtype); a prepared folder keeps none
    records = {} if path.is_dir() else {str(r.get("id")): r for r in read_records(path) if isinstance(r, dict)}
    collator = LlavaCollator(processor, template or resolve_for_model(model, processor), image_folder=image_folder,
                             max_length=max_length)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    stats: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # correct, tokens, exact, samples
    model.eval()
    with tqdm(total=total, desc="eval", disable=not progress) as bar:
        for start in range(0, total, batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, total))]
            batch = collator(rows)
            labels = batch.pop("labels")
            extra = batch_kwargs(batch, labels) if batch_kwargs is not None else {}
            with torch.no_grad():
                logits = model(**batch, **extra).logits
            correct, tokens = answer_scores(logits.float(), labels)
            for row, c, t in zip(rows, correct.tolist(), tokens.tolist()):
                qtype = records.get(str(row["id"]), {}).get("qtype", "all")
                entry = stats[qtype]
                entry[0] += c
                entry[1] += t
                entry[2] += int(c == t)
                entry[3] += 1
            bar.update(len(rows))

    by_type = {q: {"token_accuracy": c / t if t else 0.0, "exact_match": e / n, "samples": n}
               for q, (c, t, e, n) in sorted(stats.items())}
    ask = [v for q, v in stats.items() if q not in ("describe", "all")]
    ask_n = sum(v[3] for v in ask)
    result: dict[str, Any] = {
        "samples": total,
        "by_type": by_type,
        "token_accuracy": sum(v[0] for v in stats.values()) / max(1, sum(v[1] for v in stats.values())),
        "exact_match": sum(v[2] for v in stats.values()) / max(1, total),
    }
    if "describe" in stats:
        result["describe_token_accuracy"] = by_type["describe"]["token_accuracy"]
    if ask_n:
        result["ask_exact_match"] = sum(v[2] for v in ask) / ask_n
    return result


def evaluate_dir(model_dir: str | Path, data_path: str | Path, image_folder: str | Path | None,
                 batch_size: int = 32, limit: int | None = None, progress: bool = True,
                 metric: str = "teacher_forced", max_new_tokens: int = 64,
                 predictions: str | Path | None = None, template: str = "auto", max_length: int = 4096,
                 trust_remote_code: bool = False) -> dict[str, Any]:
    """`evaluate` (metric "teacher_forced") or `evaluate_generation` (vqa / pope / mc) of a model folder,
    plus the model's name, whether it is hardened, its plan's visual FLOPs and the chat template used
    (`template`: a `data.template` choice; `auto` takes the template an exported folder was trained with).
    `predictions`: write the per-sample answers there as JSON lines (generation metrics only).
    `trust_remote_code`: let the folder's own code run (`load_for_eval`); off unless the caller says so."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if predictions is not None and metric == "teacher_forced":
        raise ValueError("--predictions needs a generation metric (--metric vqa, pope or mc)")
    model, processor = load_for_eval(model_dir, trust_remote_code=trust_remote_code)
    chat_template = resolve_for_model(model, processor, model_dir, template)
    if metric == "teacher_forced":
        result = evaluate(model, processor, data_path, image_folder, batch_size=batch_size, limit=limit,
                          progress=progress, template=chat_template, max_length=max_length)
    else:
        result = evaluate_generation(model, processor, data_path, image_folder, metric=metric, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, limit=limit, progress=progress,
                                     template=chat_template)
        per_sample = result.pop("per_sample")
        if predictions is not None:
            write_predictions(predictions, per_sample)
            result["predictions"] = str(predictions)
    result["metric"] = metric
    result["template"] = chat_template.name
    result["model"] = str(model_dir)
    result["hardened"] = getattr(model, "visprune_plan", None) is not None
    result["visual_flops"] = plan_flops(model)
    return result


def format_eval(result: dict[str, Any]) -> str:
    lines = [(f"{result['model']}: {result['samples']} samples, "
             f"{'hardened' if result['hardened'] else 'plain'} model, visual FLOPs "
             f"{result['visual_flops']['ratio']:.1%} of dense")]
    if result.get("metric", "teacher_forced") != "teacher_forced":
        return "\n".join(lines + format_scores(result))
    if "describe_token_accuracy" in result:
        lines.append(f"describe token accuracy {result['describe_token_accuracy']:.2%}")
    if "ask_exact_match" in result:
        lines.append(f"ask exact match {result['ask_exact_match']:.2%}")
    for qtype, entry in result["by_type"].items():
        lines.append(f"  {qtype:10} exact match {entry['exact_match']:.2%}  token accuracy "
                     f"{entry['token_accuracy']:.2%}  ({entry['samples']} samples)")
    return "\n".join(lines)


def format_scores(result: dict[str, Any]) -> list[str]:
    """The lines of a generation metric's result: the main number, POPE's extra numbers, per category."""
    metric = result["metric"]
    lines = [f"{METRIC_NAMES[metric]} {result['score']:.2%} (greedy, max {result['max_new_tokens']} new tokens)"]
    if metric == "pope":
        lines.append(f"precision {result['precision']:.2%}  recall {result['recall']:.2%}  F1 {result['f1']:.2%}  "
                     f"yes-ratio {result['yes_ratio']:.2%}  neither yes nor no {result['other_ratio']:.2%}")
    for category, entry in result["by_category"].items():
        extra = f"  F1 {entry['f1']:.2%}" if metric == "pope" else ""
        lines.append(f"  {category:10} {entry['score']:.2%}{extra}  ({entry['samples']} samples)")
    if result.get("predictions"):
        lines.append(f"predictions: {result['predictions']}")
    return lines


__all__ = ["answer_scores", "evaluate", "evaluate_dir", "format_eval", "format_scores", "load_for_eval",
           "plan_flops"]
