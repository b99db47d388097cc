"""The work behind the lmms-eval plugin's requests: a request's images, batches of prompted requests,
generation with a task's settings and `until` strings, the log-likelihood of continuations, and the run's
report (one throughput entry per generation batch, a JSON file rewritten atomically). `lmms_plugin.VisPrune`
turns lmms-eval's requests into `Prompted` items and hands them here; lmms-eval itself is imported only for
its throughput log."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.files import write_atomic

from .generation import generate_ids
from .prompts import PromptEncoder, to_model
from .timing import PrefillTimer


@dataclass
class Prompted:
    """One request, prompted: its position among the requests, the chat-templated prompt, its images, and
    either its generation kwargs (`generate_until`) or its continuation's token ids (`loglikelihood`)."""

    index: int
    prompt: str
    images: list
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    continuation: list[int] = field(default_factory=list)


def request_images(visuals: Any, task: str) -> list:
    """The RGB images of a request (`doc_to_visual(doc)`: one image, a list, or nested lists of them).

    Raises:
        NotImplementedError: a visual is not a PIL image (video, audio, a file path).
    """
    from PIL import Image

    visuals = visuals or []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    flat = []
    for visual in visuals:
        flat += list(visual) if isinstance(visual, (list, tuple)) else [visual]
    for visual in flat:
        if not isinstance(visual, Image.Image):
            raise NotImplementedError(f"visprune: task {task!r} gives a {type(visual).__name__} visual; only "
                                      "images (PIL) are supported (no video, audio or file paths)")
    return [visual.convert("RGB") for visual in flat]


def _progress(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress)


# ---- generate_until ----------------------------------------------------------------------------------
def generation_batches(items: list[Prompted], batch_size: int) -> Iterator[list[Prompted]]:
    """Batches of items with equal generation kwargs, longest prompts first within each group."""
    groups: dict[str, list[Prompted]] = defaultdict(list)
    for item in items:
        groups[json.dumps(item.gen_kwargs, sort_keys=True, default=str)].append(item)
    for group in groups.values():
        group.sort(key=lambda item: -len(item.prompt))
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def generation_settings(gen_kwargs: dict[str, Any], max_new_tokens: int) -> tuple[int, list[str], dict[str, Any]]:
    """(max new tokens, `until` strings, `generate` settings) of a task's generation kwargs: greedy unless it
    sets a temperature (then sampling, with its `top_p`); `max_new_tokens` when the task sets none."""
    gen_kwargs = dict(gen_kwargs)
    until = gen_kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    max_new = int(gen_kwargs.pop("max_new_tokens", max_new_tokens))
    temperature = float(gen_kwargs.pop("temperature", 0) or 0)
    settings: dict[str, Any] = {"do_sample": temperature > 0, "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1)}
    if temperature > 0:
        settings["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return max_new, until, settings


def generate_batch(model: torch.nn.Module, encoder: PromptEncoder, chunk: list[Prompted],
                   max_new_tokens: int) -> tuple[list[str], int]:
    """The answers of one batch of equal generation kwargs (cut at the first `until` string, stripped) and
    the number of tokens generated."""
    max_new, until, settings = generation_settings(chunk[0].gen_kwargs, max_new_tokens)
    batch = encoder.encode([item.prompt for item in chunk], [image for item in chunk for image in item.images])
    tokenizer = encoder.processor.tokenizer
    new = generate_ids(model, tokenizer, batch, max_new, encoder.stop_ids, **settings).cpu()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    for stop in until:
        texts = [text.split(stop)[0] if stop else text for text in texts]
    return [text.strip() for text in texts], int((new != tokenizer.pad_token_id).sum())


def answer_generation(model: torch.nn.Module, encoder: PromptEncoder, items: list[Prompted], batch_size: int,
                      max_new_tokens: int, timer: PrefillTimer, visual_flops_ratio: float,
                      progress: bool = True) -> list[str]:
    """The answer of every item, in item order (`batch_size` at a time, see `generation_batches`); each batch's
    prefill is timed by `timer` (watching `model`) and goes into lmms-eval's throughput log."""
    results: list[str | None] = [None] * len(items)
    timer.label = "generate"
    with _progress(len(items), "visprune generate", progress) as bar:
        for chunk in generation_batches(items, batch_size):
            prefill_before = timer.seconds("generate")
            start = time.perf_counter()
            texts, new_tokens = generate_batch(model, encoder, chunk, max_new_tokens)
            log_throughput(time.perf_counter() - start, new_tokens, len(chunk),
                           timer.seconds("generate") - prefill_before, visual_flops_ratio)
            for item, text in zip(chunk, texts):
                results[item.index] = text
            bar.update(len(chunk))
    return results  # type: ignore[return-value]


# ---- loglikelihood -----------------------------------------------------------------------------------
def continuation_ids(encoder: PromptEncoder, prompt: str, continuation: str) -> list[int]:
    """The token ids of `continuation` after `prompt`: those the tokenizer gives prompt + continuation beyond
    the prompt's own (the continuation alone when the boundary merges into one token)."""
    tokenizer = encoder.processor.tokenizer
    # lm-eval's convention: a context's trailing spaces belong to the continuation
    spaces = len(prompt) - len(prompt.rstrip(" "))
    if spaces:
        prompt, continuation = prompt[:-spaces], prompt[-spaces:] + continuation
    special = encoder.add_special_tokens(prompt)
    whole = tokenizer(prompt + continuation, add_special_tokens=special)["input_ids"]
    alone = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    if whole[:len(alone)] != alone:
        return tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return whole[len(alone):]


def _append_continuations(batch: dict[str, torch.Tensor], chunk: list[Prompted], pad_token_id: int
                          ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A right-padded prompt batch with each item's continuation ids after its prompt (per-token tensors such
    as the attention mask re-padded to match); also where each continuation starts."""
    mask = batch["attention_mask"].bool()
    token_keys = [key for key, value in batch.items() if key != "input_ids" and value.dim() == 2
                  and value.shape == batch["input_ids"].shape]
    rows, starts = [], []
    for b, item in enumerate(chunk):
        prompt_ids = batch["input_ids"][b][mask[b]]
        starts.append(prompt_ids.numel())
        rows.append(torch.cat([prompt_ids, torch.tensor(item.continuation, dtype=torch.long)]))
    length = max(row.numel() for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # (B, T)
    full = {key: torch.zeros((len(rows), length), dtype=batch[key].dtype) for key in token_keys}
    for b, row in enumerate(rows):
        ids[b, :row.numel()] = row
        for key in token_keys:
            values = batch[key][b][mask[b]]
            full[key][b, :values.numel()] = values
            if key == "attention_mask":
                full[key][b, :row.numel()] = 1
    rest = {key: value for key, value in batch.items() if key not in token_keys and key != "input_ids"}
    return {**rest, **full, "input_ids": ids}, starts


def loglikelihood_batch(model: torch.nn.Module, encoder: PromptEncoder, chunk: list[Prompted]
                        ) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether greedy decoding produces it) per item: one
    forward over prompt + continuation ids, right-padded."""
    batch = encoder.encode([item.prompt for item in chunk], [image for item in chunk for image in item.images],
                           padding_side="right")
    inputs, starts = _append_continuations(batch, chunk, encoder.processor.tokenizer.pad_token_id)
    length = inputs["input_ids"].shape[1]
    keep = length - min(starts) + 1  # logits from the first continuation's predicting position on
    with torch.no_grad():
        logits = model(**to_model(inputs, model), logits_to_keep=keep).logits.float().cpu()  # (B, keep, V)
    offset = length - keep
    results = []
    for b, (item, start) in enumerate(zip(chunk, starts)):
        target = torch.tensor(item.continuation, dtype=torch.long)
        if not target.numel():
            results.append((0.0, True))
            continue
        rows_logits = logits[b, start - 1 - offset:start - 1 - offset + target.numel()]
        logprobs = torch.log_softmax(rows_logits, dim=-1)
        total = float(logprobs.gather(1, target[:, None]).sum())
        results.append((total, bool((rows_logits.argmax(dim=-1) == target).all())))
    return results


def answer_loglikelihood(model: torch.nn.Module, encoder: PromptEncoder, items: list[Prompted], batch_size: int,
                         timer: PrefillTimer, progress: bool = True) -> list[tuple[float, bool]]:
    """`loglikelihood_batch` of every item, in item order; batches of the longest prompt + continuation first,
    their forwards timed by `timer` under "loglikelihood"."""
    order = sorted(items, key=lambda item: -len(item.prompt) - len(item.continuation))
    results: list[tuple[float, bool] | None] = [None] * len(items)
    timer.label = "loglikelihood"
    try:
        with _progress(len(items), "visprune loglikelihood", progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                for item, result in zip(chunk, loglikelihood_batch(model, encoder, chunk)):
                    results[item.index] = result
                bar.update(len(chunk))
    finally:
        timer.label = "generate"
    return results  # type: ignore[return-value]


# ---- the report ----------------------------------------------------------------------------------------
def log_throughput(seconds: float, new_tokens: int, samples: int, prefill_seconds: float,
                   visual_flops_ratio: float) -> None:
    """One entry of lmms-eval's throughput log per generation batch; its results JSON then carries
    `throughput.avg_prefill_ms_per_sample` (the mean over batches) and `avg_visual_flops_ratio`."""
    extra = {"prefill_ms_per_sample": 1000 * prefill_seconds / samples, "visual_flops_ratio": visual_flops_ratio,
             "batch_samples": samples}
    try:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
    except ImportError:  # another lmms-eval layout: the report file still has everything
        return
    log_metrics(total_elapsed_time=seconds, total_gen_tokens=new_tokens,
                avg_speed=new_tokens / seconds if seconds > 0 else 0.0, additional_metrics=extra)


def report_headline(report: dict[str, Any]) -> str:
    """One line of a report: the plan's visual FLOPs and the mean prefill time so far."""
    prefill = report["prefill"].get("generate") or report["prefill"].get("loglikelihood") or {}
    return (f"visprune: visual FLOPs {report['visual_flops']['ratio']:.1%} of dense; mean prefill "
            f"{prefill.get('ms_per_sample', 0.0):.2f} ms/sample over {int(prefill.get('samples', 0))} samples")


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """The report as JSON at `path`, replaced atomically (a reader sees the previous report or the whole new one)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=1))


__all__ = ["Prompted", "answer_generation", "answer_loglikelihood", "continuation_ids", "generate_batch",
           "generation_batches", "generation_settings", "log_throughput", "loglikelihood_batch", "report_headline",
           "request_images", "write_report"]
