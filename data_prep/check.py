"""The pre-flight scan of a LLaVA-format JSON + image folder (`visprune data check`): every sample is
judged once, before training, by the same code the trainer's collator runs, so no bad sample is found
at step 20,000. Converting to a training-ready dataset is left to `data prepare` (not built yet)."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from visprune.trainer.config import DataConfig
from visprune.trainer.data import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    DataError,
    LlavaCollator,
    image_path_problem,
    normalize_record,
    read_records,
)

REJECTED_FILE = "rejected.jsonl"
# what each file ending must decode as (content, not name, decides the format: a GIF named .jpg is mislabelled)
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".webp": "WEBP", ".bmp": "BMP"}


@dataclass
class CheckReport:
    """The scan's result: `rejected` holds one {"id", "index", "reason", "detail"} per bad sample."""

    num_samples: int = 0
    num_ok: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(item["reason"] for item in self.rejected).most_common())

    def summary(self, limit: int | None = None) -> str:
        lines = [f"{self.num_ok} of {self.num_samples} samples ok, {len(self.rejected)} bad"]
        lines += [f"  {reason}: {count}" for reason, count in self.counts.items()]
        shown = self.rejected if limit is None else self.rejected[:limit]
        lines += [f"  sample {item['id']}: {item['reason']}: {item['detail']}" for item in shown]
        if len(shown) < len(self.rejected):
            lines.append(f"  ... and {len(self.rejected) - len(shown)} more")
        return "\n".join(lines)


def image_problem(folder: Path, image: str) -> tuple[str, str] | None:
    """(reason, detail) when `image` is not a decodable regular file inside `folder`; None when it is.

    Checked without opening anything that is not a regular file (a FIFO would block the reader)."""
    problem = image_path_problem(image)
    if problem:
        return "image_path", f"{image!r}: {problem}"
    path = (folder / image).resolve()
    if not path.is_relative_to(folder):
        return "image_outside_folder", f"{image!r} resolves to {path}, outside {folder}"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "image_missing", f"{image!r} not found in {folder}"
    if not stat.S_ISREG(mode):
        return "image_not_a_file", f"{image!r} is not a regular file"
    try:
        with Image.open(path) as opened:
            found = opened.format
            opened.load()  # decode every pixel: a truncated file fails here, not in training
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return "image_undecodable", f"{image!r}: {exc}"
    expected = FORMATS.get(path.suffix.lower())
    if expected is not None and found != expected:
        return "image_mislabelled", f"{image!r} is {found} data named {path.suffix}"
    return None


def check_records(records: list[Any], image_folder: str | Path | None, processor: Any,
                  max_length: int = 2048, progress: bool = True) -> CheckReport:
    """Judge every record: its structure and turns, its placeholders against its images, every image,
    then the collator's encoding (template, length with image tokens counted, supervised tokens)."""
    from tqdm.auto import tqdm

    folder = None if image_folder is None else Path(image_folder).resolve()
    collator = LlavaCollator(processor, DataConfig(path="-", image_folder=None if folder is None else str(folder),
                                                   max_length=max_length))
    report = CheckReport(num_samples=len(records))

    def reject(index: int, name: str, reason: str, detail: str) -> None:
        report.rejected.append({"id": name, "index": index, "reason": reason, "detail": detail})

    for index, record in enumerate(tqdm(records, desc="check", disable=not progress)):
        name, row, reasons = normalize_record(record, index)
        if row is None:
            reject(index, name, "malformed_record", "; ".join(reasons))
            continue
        num_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in row["conversations"])
        if num_placeholders != len(row["images"]):
            reject(index, name, "placeholder_count",
                   f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(row['images'])} images")
            continue
        if row["images"] and folder is None:
            reject(index, name, "no_image_folder", "the sample has images but no image folder was given")
            continue
        bad_image = next((p for p in (image_problem(folder, image) for image in row["images"]) if p), None)
        if bad_image:
            reject(index, name, *bad_image)
            continue
        if reasons:  # roles and turn order (path and placeholder reasons were judged above)
            reject(index, name, "conversation", "; ".join(reasons))
            continue
        try:
            sample = collator.encode(row)
        except DataError as exc:
            reject(index, name, "encoding", str(exc))
            continue
        length = int(sample["input_ids"].numel())
        if length > max_length:
            reject(index, name, "over_length", f"{length} tokens (image tokens included) > max length {max_length}")
        elif not bool((sample["labels"] != IGNORE_INDEX).any()):
            reject(index, name, "no_supervised_tokens",
                   "no answer token is supervised (does the chat template match the data?)")
        else:
            report.num_ok += 1
    return report


def check_file(data_path: str | Path, image_folder: str | Path | None, processor: Any, max_length: int = 2048,
               progress: bool = True) -> CheckReport:
    return check_records(read_records(Path(data_path)), image_folder, processor, max_length, progress)


def write_rejected(report: CheckReport, out_dir: str | Path) -> Path:
    """`out_dir/rejected.jsonl`: one line per bad sample, then a last line with the counts per reason."""
    path = Path(out_dir) / REJECTED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(item) for item in report.rejected]
    lines.append(json.dumps({"counts": report.counts, "num_samples": report.num_samples, "num_ok": report.num_ok}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = ["FORMATS", "REJECTED_FILE", "CheckReport", "check_file", "check_records", "image_problem",
           "write_rejected"]
