"""`visprune eval` on a model folder: `evaluate_dir` loads it (hardened when it has a `pruning_plan.json`),
scores it with one metric (`teacher_forced`, or generated answers scored as vqa / pope / mc) and reports its
plan's visual FLOPs beside the dense model's; `format_eval` is the text report. The scoring itself is
`teacher_forced`'s and `generation`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visprune.data_prep.templates import resolve_for_model

from .generation import evaluate_generation, write_predictions
from .loading import is_hardened, load_for_eval, plan_flops
from .scoring import METRIC_NAMES, METRICS
from .teacher_forced import evaluate


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
    result["hardened"] = is_hardened(model)
    result["visual_flops"] = plan_flops(model)
    return result


def format_eval(result: dict[str, Any]) -> str:
    """The text report of an `evaluate_dir` result."""
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


__all__ = ["evaluate_dir", "format_eval", "format_scores"]
