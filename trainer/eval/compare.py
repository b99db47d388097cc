"""`visprune compare DIR_A DIR_B --data FILE --images DIR`: two model folders (typically dense vs
pruned; a folder with a `pruning_plan.json` is loaded hardened) side by side on the same data, in one
process on this machine:

- accuracy: the metric's main number and per category (`--metric vqa|pope|mc` on greedy answers, or
  `teacher_forced`: `visprune eval`'s exact match);
- visual and prefill FLOPs of each plan (the FLOPs model) on the data's token layout;
- measured prefill latency: the same prompt batches through each model's forward (vision tower, LM,
  last-token logits, KV cache built), one warm-up pass, then `repeats` timed passes alternating A/B;
  the median pass, in ms per sample, and the ratio B/A;
- KV-cache bytes after the prefill, measured per sample (batch 1, no padding) on the first
  `kv_samples` samples, beside the FLOPs model's visual KV bytes;
- answer agreement: the fraction of samples whose two greedy answers are equal after VQA
  normalisation (per category too).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.templates import resolve_for_model
from visprune.modeling import TokenLayout, cache_nbytes, default_layout
from visprune.modeling.flops import dims_from_config

from .generation import generate, read_samples, score_answers
from .loading import is_hardened, load_for_eval, plan_report
from .prompts import PromptEncoder, batches, to_model
from .scoring import METRIC_NAMES, METRICS, answers_agree, breakdown
from .teacher_forced import evaluate
from .timing import time_alternating


def data_layout(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TokenLayout | None:
    """The median token layout of a batch's prompts (text before the image, after it) when every prompt
    holds exactly one image's tokens in one run; None otherwise (multi-image prompts, tiled images)."""
    dims = dims_from_config(model.config)
    image_id = model.config.image_token_id
    systems, texts = [], []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = ids[mask.bool()]
        where = (ids == image_id).nonzero().squeeze(1)
        if where.numel() != dims.tokens_per_image + dims.non_grid_tokens or dims.extra_grids \
                or where.numel() == 0 or int(where[-1] - where[0]) + 1 != where.numel():
            return None
        systems.append(int(where[0]))
        texts.append(int(ids.numel() - where[-1] - 1))
    return default_layout(dims, system=int(statistics.median(systems)), text=int(statistics.median(texts)))


def _prefill(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    return model(**batch, use_cache=True, logits_to_keep=1)


def _prefill_pass(model: torch.nn.Module, inputs: list[dict[str, torch.Tensor]]):
    """One prefill of every batch of `inputs`, outputs dropped as it goes: what one timed pass runs."""
    def run() -> None:
        for batch in inputs:
            _prefill(model, batch)
    return run


def kv_bytes_per_sample(model: torch.nn.Module, encoder: PromptEncoder, rows: list[dict]) -> list[int]:
    """The KV cache's bytes after each row's prefill alone (batch 1: no padding slots)."""
    sizes = []
    with torch.no_grad():
        for row in rows:
            out = _prefill(model, to_model(encoder.batch([row]), model))
            sizes.append(cache_nbytes(out.past_key_values))
            del out
    return sizes


def compare_dirs(dir_a: str | Path, dir_b: str | Path, data: str | Path, images: str | Path | None,
                 metric: str = "vqa", batch_size: int = 8, max_new_tokens: int = 64, limit: int | None = None,
                 repeats: int = 5, time_samples: int | None = 64, kv_samples: int = 16,
                 progress: bool = True, trust_remote_code: bool = False) -> dict[str, Any]:
    """Compare two model folders on `data` (see the module docstring); returns one JSON-able dict.

    `time_samples`: prefill latency is timed on the first N samples (None: all of them); `kv_samples`:
    KV bytes are measured on the first N. `trust_remote_code`: let both folders' own code run (off unless
    the caller says so).
    """
    from tqdm.auto import tqdm

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    # teacher_forced still generates (for the answer agreement); its references are the gpt turns
    samples = read_samples(data, "vqa" if metric == "teacher_forced" else metric, limit)
    rows = [sample.row for sample in samples]
    dirs = {"a": Path(dir_a), "b": Path(dir_b)}
    sides: dict[str, dict[str, Any]] = {}
    models, encoders, processors = {}, {}, {}
    for key, folder in dirs.items():
        model, processor = load_for_eval(folder, trust_remote_code=trust_remote_code)
        models[key], processors[key] = model, processor
        encoders[key] = PromptEncoder(processor, images, resolve_for_model(model, processor, folder))
        sides[key] = {"model": str(folder), "hardened": is_hardened(model)}

    answers: dict[str, list[str]] = {}
    with tqdm(total=2 * len(rows), desc="generate", disable=not progress) as bar:
        for key, model in models.items():
            answers[key] = []
            for chunk in batches(rows, batch_size):
                answers[key] += generate(model, processors[key], encoders[key].batch(chunk), max_new_tokens,
                                         encoders[key].stop_ids)
                bar.update(len(chunk))

    for key, model in models.items():
        side = sides[key]
        if metric == "teacher_forced":
            scores = evaluate(model, processors[key], data, images, batch_size=batch_size, limit=limit,
                              progress=False)
            side.update({"score": scores["exact_match"], "by_category": {
                q: {"score": e["exact_match"], "token_accuracy": e["token_accuracy"], "samples": e["samples"]}
                for q, e in scores["by_type"].items()}, "token_accuracy": scores["token_accuracy"]})
        else:
            scored = score_answers(metric, samples, answers[key])
            scored.pop("per_sample")
            side.update({k: v for k, v in scored.items() if k not in ("metric", "samples")})

    timed = rows if time_samples is None else rows[:time_samples]
    inputs = {key: [to_model(encoders[key].batch(chunk), models[key]) for chunk in batches(timed, batch_size)]
              for key in models}
    device = next(models["a"].parameters()).device
    times = time_alternating({key: _prefill_pass(models[key], inputs[key]) for key in models}, repeats, device)
    for key, model in models.items():
        seconds = statistics.median(times[key])
        sides[key]["flops"] = plan_report(model, _batches_layout(model, inputs[key]))
        sides[key]["prefill_ms_per_sample"] = 1000 * seconds / len(timed)
        sides[key]["prefill_ms_passes"] = [1000 * t for t in times[key]]
        kv = kv_bytes_per_sample(model, encoders[key], rows[:kv_samples])
        sides[key]["kv_bytes_per_sample"] = sum(kv) / len(kv)

    same = answers_agree(answers["a"], answers["b"])
    a, b = sides["a"], sides["b"]
    return {
        "metric": metric, "metric_name": METRIC_NAMES[metric], "data": str(data), "samples": len(samples),
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "repeats": repeats, "timed_samples": len(timed),
        "kv_samples": min(kv_samples, len(rows)), "device": str(device),
        "threads": torch.get_num_threads(), "a": a, "b": b,
        "agreement": sum(same) / len(same),
        "agreement_by_category": breakdown(same, [sample.category for sample in samples]),
        "ratios": {
            "score": b["score"] / a["score"] if a["score"] else None,
            "visual_flops": b["flops"]["visual_flops"] / a["flops"]["visual_flops"],
            "prefill_flops": b["flops"]["prefill_flops"] / a["flops"]["prefill_flops"],
            "prefill_latency": b["prefill_ms_per_sample"] / a["prefill_ms_per_sample"],
            "kv_bytes": b["kv_bytes_per_sample"] / a["kv_bytes_per_sample"],
        },
    }


def _batches_layout(model: torch.nn.Module, inputs: list[dict[str, torch.Tensor]]) -> TokenLayout | None:
    """`data_layout` over every timed batch (None when any batch has no single-image layout)."""
    layouts = [data_layout(model, batch) for batch in inputs]
    return None if any(layout is None for layout in layouts) else layouts[len(layouts) // 2]


def _units(value: float, unit: str, base: float = 1000.0) -> str:
    prefixes = ["", "K", "M", "G", "T", "P"] if base == 1000.0 else ["", "Ki", "Mi", "Gi", "Ti"]
    idx = 0
    while abs(value) >= base and idx < len(prefixes) - 1:
        value /= base
        idx += 1
    return f"{value:.3g} {prefixes[idx]}{unit}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def format_compare(result: dict[str, Any]) -> str:
    """A Markdown table: rows = quantities, columns = A, B, B / A; then the agreement per category."""
    a, b, r = result["a"], result["b"], result["ratios"]
    kind = lambda side: "hardened: its pruning plan" if side["hardened"] else "plain"
    layout = a["flops"]["layout"]
    vis_kv = b["flops"]["visual_kv_bytes"] / a["flops"]["visual_kv_bytes"] if a["flops"]["visual_kv_bytes"] else None
    lines = [
        (f"**{result['metric_name']}** on `{result['data']}`: {result['samples']} samples; greedy answers, batch "
        f"{result['batch_size']}, max {result['max_new_tokens']} new tokens; {result['device']}, "
        f"{result['threads']} thread(s)."),
        "",
        "| | A | B | B / A |",
        "| --- | --- | --- | --- |",
        f"| model | `{a['model']}` ({kind(a)}) | `{b['model']}` ({kind(b)}) | |",
        f"| {result['metric_name']} | {a['score']:.2%} | {b['score']:.2%} | {_ratio(r['score'])} |",
    ]
    for category in sorted(set(a["by_category"]) | set(b["by_category"])):
        ea, eb = a["by_category"].get(category), b["by_category"].get(category)
        ratio = eb["score"] / ea["score"] if ea and eb and ea["score"] else None
        lines.append(f"| &nbsp;&nbsp;{category} ({(ea or eb)['samples']}) | "
                     f"{'—' if ea is None else format(ea['score'], '.2%')} | "
                     f"{'—' if eb is None else format(eb['score'], '.2%')} | {_ratio(ratio)} |")
    if result["metric"] == "pope":
        lines.append(f"| POPE F1 | {a['f1']:.2%} | {b['f1']:.2%} | {_ratio(b['f1'] / a['f1'] if a['f1'] else None)} |")
        lines.append(f"| yes-ratio | {a['yes_ratio']:.2%} | {b['yes_ratio']:.2%} | |")
    lines += [
        (f"| visual FLOPs (FLOPs model) | {_units(a['flops']['visual_flops'], 'FLOP')} | "
        f"{_units(b['flops']['visual_flops'], 'FLOP')} | {_ratio(r['visual_flops'])} |"),
        (f"| prefill FLOPs (FLOPs model) | {_units(a['flops']['prefill_flops'], 'FLOP')} | "
        f"{_units(b['flops']['prefill_flops'], 'FLOP')} | {_ratio(r['prefill_flops'])} |"),
        (f"| prefill latency (measured, median of {result['repeats']}) | {a['prefill_ms_per_sample']:.2f} ms/sample | "
        f"{b['prefill_ms_per_sample']:.2f} ms/sample | {_ratio(r['prefill_latency'])} |"),
        (f"| KV cache after prefill (measured) | {_units(a['kv_bytes_per_sample'], 'B', 1024.0)}/sample | "
        f"{_units(b['kv_bytes_per_sample'], 'B', 1024.0)}/sample | {_ratio(r['kv_bytes'])} |"),
        (f"| visual KV cache (FLOPs model, bf16) | {_units(a['flops']['visual_kv_bytes'], 'B', 1024.0)} | "
        f"{_units(b['flops']['visual_kv_bytes'], 'B', 1024.0)} | {_ratio(vis_kv)} |"),
        f"| answer agreement (normalised) | | | {result['agreement']:.2%} |",
    ]
    for category, entry in result["agreement_by_category"].items():
        lines.append(f"| &nbsp;&nbsp;agreement: {category} ({entry['samples']}) | | | {entry['score']:.2%} |")
    lines += ["", (f"FLOPs on the token layout {layout['system']} system + {layout['num_images']} image(s) "
              f"{layout['image_grid'][0]}x{layout['image_grid'][1]} + {layout['text']} text tokens; latency over "
              f"the first {result['timed_samples']} samples (one warm-up pass, passes alternating A/B), KV bytes "
              f"over the first {result['kv_samples']} (batch 1).")]
    return "\n".join(lines)


__all__ = ["compare_dirs", "data_layout", "format_compare", "kv_bytes_per_sample"]
