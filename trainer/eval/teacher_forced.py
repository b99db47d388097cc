"""Teacher-forced scoring (`visprune eval`, the default metric): one forward per batch, a sample's answer
tokens (and its end-of-turn token) predicted from the correct prefix:

- token accuracy = correct answer tokens / answer tokens (the see-task's describe metric);
- exact match = every answer token correct, which is exactly when greedy decoding reproduces the
  answer and stops (so no generation loop is needed).

Results are broken down by the records' `qtype` (see-task) or reported overall. Loading the model is
`loading.load_for_eval`'s job; generated answers are `generation`'s.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.records import IGNORE_INDEX, build_dataset, read_records
from visprune.data_prep.templates import ChatTemplate, resolve_for_model


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
    collator = ChatCollator(processor, template or resolve_for_model(model, processor), image_folder=image_folder,
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


__all__ = ["answer_scores", "evaluate"]
