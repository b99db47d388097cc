"""The pre-flight scan of a LLaVA-format JSON + image folder (`visprune data check`): every sample is
judged once, before training, by the same code the trainer's collator runs, so no bad sample is found
at step 20,000. `Judge` judges one record at a time; `visprune data prepare` (`prepare.py`) runs it in
worker processes and keeps the encodings of the good samples."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .collator import LlavaCollator
from .records import IGNORE_INDEX, IMAGE_PLACEHOLDER, DataError, image_path_problem, iter_records, normalize_record
from .templates import ChatTemplate

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
    return open_checked_image(folder, image)[0]


def open_checked_image(folder: Path, image: str) -> tuple[tuple[str, str] | None, Image.Image | None]:
    """`image_problem`'s verdict and, when there is none, the image fully decoded as RGB (what
    `LlavaCollator.load_image` returns), so a checked image is decoded once."""
    problem = image_path_problem(image)
    if problem:
        return ("image_path", f"{image!r}: {problem}"), None
    path = (folder / image).resolve()
    if not path.is_relative_to(folder):
        return ("image_outside_folder", f"{image!r} resolves to {path}, outside {folder}"), None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ("image_missing", f"{image!r} not found in {folder}"), None
    if not stat.S_ISREG(mode):
        return ("image_not_a_file", f"{image!r} is not a regular file"), None
    try:
        with Image.open(path) as opened:
            found = opened.format
            opened.load()  # decode every pixel: a truncated file fails here, not in training
            rgb = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return ("image_undecodable", f"{image!r}: {exc}"), None
    expected = FORMATS.get(path.suffix.lower())
    if expected is not None and found != expected:
        return ("image_mislabelled", f"{image!r} is {found} data named {path.suffix}"), None
    return None, rgb


class Judge:
    """Judges records one at a time: structure and turns, placeholders against images, every image, then
    the collator's encoding (the chat template, length with image tokens counted, supervised tokens).

    The verdict on each distinct image path is remembered (up to `cache_images` paths, oldest forgotten
    first): LLaVA mixtures reuse images, and files do not change during a scan.
    """

    def __init__(self, image_folder: str | Path | None, processor: Any, template: ChatTemplate,
                 max_length: int = 2048, cache_images: int = 200_000):
        self.folder = None if image_folder is None else Path(image_folder).resolve()
        self.collator = LlavaCollator(processor, template, image_folder=self.folder, max_length=max_length)
        self.max_length = max_length
        self.cache_images = cache_images
        self.verdicts: dict[str, tuple[str, str] | None] = {}

    def check_image(self, image: str) -> tuple[tuple[str, str] | None, Image.Image | None]:
        """(verdict, the decoded image or None when the verdict was remembered or is bad)."""
        if image in self.verdicts:
            return self.verdicts[image], None
        verdict, opened = open_checked_image(self.folder, image)
        if len(self.verdicts) >= self.cache_images:
            del self.verdicts[next(iter(self.verdicts))]
        self.verdicts[image] = verdict
        return verdict, opened

    def __call__(self, index: int, record: Any) -> tuple[tuple[dict, dict] | None, dict[str, Any] | None]:
        """((normalised row, its `LlavaCollator.encode` tokens) or None, reject or None): exactly one is set.

        A reject is {"id", "index", "reason", "detail"}."""
        return self.judge_many(index, [record])[0]

    def judge_many(self, start: int, records: list[Any]) -> list[tuple[tuple[dict, dict] | None, dict | None]]:
        """`__call__` for records at indices start, start + 1, ...: the encodings are computed together
        (`LlavaCollator.encode_tokens`, one processor call), the verdicts are the same."""
        results: list[Any] = [None] * len(records)
        todo = []  # (position, row, images decoded by the check or None)

        def reject(pos: int, name: str, reason: str, detail: str) -> None:
            results[pos] = (None, {"id": name, "index": start + pos, "reason": reason, "detail": detail})

        for pos, record in enumerate(records):
            name, row, reasons = normalize_record(record, start + pos)
            if row is None:
                reject(pos, name, "malformed_record", "; ".join(reasons))
                continue
            num_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in row["conversations"])
            if num_placeholders != len(row["images"]):
                reject(pos, name, "placeholder_count",
                       f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(row['images'])} images")
                continue
            if row["images"] and self.folder is None:
                reject(pos, name, "no_image_folder", "the sample has images but no image folder was given")
                continue
            opened, bad = [], None
            for image in row["images"]:
                verdict, decoded = self.check_image(image)
                if verdict:
                    bad = verdict
                    break
                opened.append(decoded)
            if bad:
                reject(pos, name, *bad)
                continue
            if reasons:  # roles and turn order (path and placeholder reasons were judged above)
                reject(pos, name, "conversation", "; ".join(reasons))
                continue
            todo.append((pos, name, row, opened))
        images = []
        for pos, name, row, opened in todo:  # images whose verdict was remembered are opened as in training
            try:
                images.append([decoded if decoded is not None else self.collator.load_image(row["id"], image)
                               for image, decoded in zip(row["images"], opened)])
            except DataError as exc:
                images.append(exc)
        usable = [(item, opened) for item, opened in zip(todo, images) if not isinstance(opened, DataError)]
        for (pos, name, _, _), opened in zip(todo, images):
            if isinstance(opened, DataError):
                reject(pos, name, "encoding", str(opened))
        encoded = self.collator.encode_tokens([item[2] for item, _ in usable], [opened for _, opened in usable])
        for ((pos, name, row, _), _), sample in zip(usable, encoded):
            if isinstance(sample, DataError):
                reject(pos, name, "encoding", str(sample))
                continue
            length = int(sample["input_ids"].numel())
            if length > self.max_length:
                reject(pos, name, "over_length", f"{length} tokens (image tokens included) > max length {self.max_length}")
            elif not bool((sample["labels"] != IGNORE_INDEX).any()):
                reject(pos, name, "no_supervised_tokens",
                       "no answer token is supervised (does the chat template match the data?)")
            else:
                results[pos] = ((row, sample), None)
        return results


def check_records(records: Iterable[Any], image_folder: str | Path | None, processor: Any, template: ChatTemplate,
                  max_length: int = 2048, progress: bool = True, batch_size: int = 64) -> CheckReport:
    """Judge every record (see `Judge`; `batch_size` records at a time) as the trainer's collator would
    encode it with `template` (see `templates.resolve_template`)."""
    from tqdm.auto import tqdm

    judge = Judge(image_folder, processor, template, max_length=max_length)
    report = CheckReport()
    total = len(records) if hasattr(records, "__len__") else None
    with tqdm(total=total, desc="check", disable=not progress) as bar:
        for start, chunk in _chunked(records, batch_size):
            for _, rejected in judge.judge_many(start, chunk):
                report.num_samples += 1
                if rejected:
                    report.rejected.append(rejected)
                else:
                    report.num_ok += 1
            bar.update(len(chunk))
    return report


def _chunked(records: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    chunk, start = [], 0
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield start, chunk
            start, chunk = start + size, []
    if chunk:
        yield start, chunk


def check_file(data_path: str | Path, image_folder: str | Path | None, processor: Any, template: ChatTemplate,
               max_length: int = 2048, progress: bool = True) -> CheckReport:
    """`check_records` over a `.json` list or `.jsonl` file, streamed (a few MB of it in memory at a time)."""
    records = (record for record, _ in iter_records(Path(data_path)))
    return check_records(records, image_folder, processor, template, max_length, progress)


def write_rejected(report: CheckReport, out_dir: str | Path) -> Path:
    """`out_dir/rejected.jsonl`: one line per bad sample, then a last line with the counts per reason."""
    path = Path(out_dir) / REJECTED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(item) for item in report.rejected]
    lines.append(json.dumps({"counts": report.counts, "num_samples": report.num_samples, "num_ok": report.num_ok}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = ["FORMATS", "REJECTED_FILE", "CheckReport", "Judge", "check_file", "check_records", "image_problem",
           "open_checked_image", "write_rejected"]
