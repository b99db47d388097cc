"""The pre-flight scan of a LLaVA-format JSON + image folder (`visprune data check`): every sample is
judged once, before training, by the same code the trainer's collator runs, so no bad sample is found
at step 20,000. `Judge` judges one record at a time; `visprune data prepare` (`prepare.py`) runs it in
worker processes and keeps the encodings of the good samples."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .collator import ChatCollator, check_positive, frames_video
from .files import write_atomic
from .images import MAX_IMAGE_PIXELS, ImageLoader, ImageProblem
from .records import (
    DETAIL_CHARS,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    DataError,
    conversation_problems,
    image_path_problem,
    iter_records,
    normalize_record,
    quote,
    row_videos,
    shorten,
    video_paths,
)
from .templates import ChatTemplate

REJECTED_FILE = "rejected.jsonl"
COUNTS_KEYS = {"counts", "num_samples", "num_ok"}  # the last line of a rejected.jsonl visprune wrote
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


def image_problem(folder: Path, image: str, max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, str] | None:
    """(reason, detail) when `image` is not a decodable regular file inside `folder` of at most
    `max_image_pixels` pixels; None when it is.

    Checked without opening anything that is not a regular file (a FIFO would block the reader)."""
    return open_checked_image(ImageLoader(folder, max_image_pixels), image)[0]


def open_checked_image(loader: ImageLoader, image: str) -> tuple[tuple[str, str] | None, Image.Image | None]:
    """`image_problem`'s verdict on `image` in `loader`'s folder and, when there is none, the image fully
    decoded as RGB (what `ChatCollator.load_image` returns), so a checked image is decoded once. The
    verdict is `ImageLoader.open`'s reason (an image over its pixel limit is `image_too_large`, judged
    from its header before any pixel is decoded) or `image_mislabelled`."""
    try:
        rgb, found, path = loader.open(image)
    except ImageProblem as exc:
        return (exc.reason, exc.detail), None
    expected = FORMATS.get(path.suffix.lower())
    if expected is not None and found != expected:
        return ("image_mislabelled", f"{quote(image)} is {found} data named {path.suffix}"), None
    return None, rgb


class Judge:
    """Judges records one at a time: structure and turns, placeholders against images, every image, then
    the collator's encoding (the chat template, length with image tokens counted, supervised tokens).

    The verdict on each distinct image path is remembered (up to `cache_images` paths, oldest forgotten
    first): LLaVA mixtures reuse images, and files do not change during a scan. The cheap verdicts come
    first (structure, placeholders, turns, a length bound for very large records), so a record of 10,000
    images or 100,000 turns is judged without decoding its images or rendering every answer's prefix.
    Every detail is cut to `DETAIL_CHARS` characters.

    Raises:
        ValueError: `max_length` or `max_image_pixels` < 1.
        DataError: `image_folder` is not a folder.
    """

    def __init__(self, image_folder: str | Path | None, processor: Any, template: ChatTemplate,
                 max_length: int = 2048, cache_images: int = 200_000, max_image_pixels: int = MAX_IMAGE_PIXELS):
        check_positive("max_length", max_length)
        check_positive("max_image_pixels", max_image_pixels)
        if image_folder is not None and not Path(image_folder).is_dir():
            raise DataError(f"image folder {image_folder} is not a folder")
        self.folder = None if image_folder is None else Path(image_folder).resolve()
        self.collator = ChatCollator(processor, template, image_folder=self.folder, max_length=max_length,
                                     max_image_pixels=max_image_pixels)
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.cache_images = cache_images
        self.verdicts: dict[str, tuple[str, str] | None] = {}

    def check_image(self, image: str) -> tuple[tuple[str, str] | None, Image.Image | None]:
        """(verdict, the decoded image or None when the verdict was remembered or is bad)."""
        if image in self.verdicts:
            return self.verdicts[image], None
        verdict, opened = open_checked_image(self.collator.image_loader, image)
        if len(self.verdicts) >= self.cache_images:
            del self.verdicts[next(iter(self.verdicts))]
        self.verdicts[image] = verdict
        return verdict, opened

    def check_videos(self, sample_id: str, videos: list[dict]) -> tuple[tuple[str, str] | None, list]:
        """(the first (reason, detail) of a row's videos or None, per video its frames as the collator loads them
        when the check decoded every frame, else None): a frame judged as an image (`check_image`), a video file by
        `ImageLoader.video_file` (it is decoded when the row is encoded)."""
        loaded = []
        for video in videos:
            if not video["frames"]:  # a video file
                try:
                    self.collator.image_loader.video_file(video["file"])
                except ImageProblem as exc:
                    return (exc.reason, exc.detail), []
                loaded.append(None)
                continue
            frames = []
            for frame in video["frames"]:
                verdict, decoded = self.check_image(frame)
                if verdict:
                    return verdict, []
                frames.append(decoded)
            loaded.append(None if any(frame is None for frame in frames) else (video, frames))
        out = []
        for item in loaded:
            try:
                out.append(None if item is None else frames_video(sample_id, *item))
            except DataError:  # frames of different sizes: the encoding says so, naming the sample
                out.append(None)
        return None, out

    def __call__(self, index: int, record: Any) -> tuple[tuple[dict, dict] | None, dict[str, Any] | None]:
        """((normalised row, its `ChatCollator.encode` tokens) or None, reject or None): exactly one is set.

        A reject is {"id", "index", "reason", "detail"}."""
        return self.judge_many(index, [record])[0]

    def judge_many(self, start: int, records: list[Any]) -> list[tuple[tuple[dict, dict] | None, dict | None]]:
        """`__call__` for records at indices start, start + 1, ...: the encodings are computed together
        (`ChatCollator.encode_tokens`, one processor call), the verdicts are the same."""
        results: list[Any] = [None] * len(records)
        todo = []  # (position, name, row, images decoded by the check or None, videos loaded by the check or None)

        def reject(pos: int, name: str, reason: str, detail: str) -> None:
            results[pos] = (None, {"id": name, "index": start + pos, "reason": reason,
                                   "detail": shorten(detail, DETAIL_CHARS)})

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
            videos = row_videos(row)
            num_video_placeholders = sum(turn["value"].count(VIDEO_PLACEHOLDER) for turn in row["conversations"])
            if num_video_placeholders != len(videos):
                reject(pos, name, "placeholder_count",
                       f"{num_video_placeholders} {VIDEO_PLACEHOLDER} placeholders but {len(videos)} videos")
                continue
            if (row["images"] or videos) and self.folder is None:
                reject(pos, name, "no_image_folder", "the sample has images or videos but no image folder was given")
                continue
            path_problem = next(((path, problem) for video in videos for path in video_paths(video)
                                 for problem in [image_path_problem(path)] if problem), None)
            if path_problem:  # judged from the string, before anything else about the video
                reject(pos, name, "image_path", f"video {quote(path_problem[0])}: {path_problem[1]}")
                continue
            if videos and not self.collator.takes_videos:
                reject(pos, name, "video_unsupported", f"{len(videos)} video(s), but the processor "
                       f"({type(self.collator.processor).__name__}) takes no videos (Qwen2-VL / Qwen2.5-VL do)")
                continue
            problems = conversation_problems(row["conversations"])  # roles and turn order
            if problems:
                reject(pos, name, "conversation", "; ".join(problems))
                continue
            floor = self.collator.length_floors([row])[0]
            if floor is not None and floor > self.max_length:
                reject(pos, name, "over_length", f"at least {floor} tokens (its text alone, before image tokens) > "
                                                 f"max length {self.max_length}")
                continue
            opened, bad = [], None
            for image in row["images"]:
                verdict, decoded = self.check_image(image)
                if verdict:
                    bad = verdict
                    break
                opened.append(decoded)
            video_verdict, loaded = self.check_videos(row["id"], videos) if not bad else (None, [])
            bad = bad or video_verdict
            if bad:
                reject(pos, name, *bad)
                continue
            todo.append((pos, name, row, opened, loaded))
        images = []
        for pos, name, row, opened, _ in todo:  # images whose verdict was remembered are opened as in training
            try:
                images.append([decoded if decoded is not None else self.collator.load_image(row["id"], image)
                               for image, decoded in zip(row["images"], opened)])
            except DataError as exc:
                images.append(exc)
        usable = [(item, opened) for item, opened in zip(todo, images) if not isinstance(opened, DataError)]
        for (pos, name, _, _, _), opened in zip(todo, images):
            if isinstance(opened, DataError):
                reject(pos, name, "encoding", str(opened))
        encoded = self.collator.encode_tokens([item[2] for item, _ in usable], [opened for _, opened in usable],
                                              [item[4] for item, _ in usable])
        for ((pos, name, row, _, _), _), sample in zip(usable, encoded):
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
                  max_length: int = 2048, progress: bool = True, batch_size: int = 64,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> CheckReport:
    """Judge every record (see `Judge`; `batch_size` records at a time) as the trainer's collator would
    encode it with `template` (see `templates.resolve_template`); images over `max_image_pixels` pixels
    are `image_too_large`."""
    from tqdm.auto import tqdm

    judge = Judge(image_folder, processor, template, max_length=max_length, max_image_pixels=max_image_pixels)
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
               max_length: int = 2048, progress: bool = True, max_image_pixels: int = MAX_IMAGE_PIXELS) -> CheckReport:
    """`check_records` over a `.json` list or `.jsonl` file, streamed (a few MB of it in memory at a time).

    Raises:
        DataError: the file is not a readable JSON list / JSON lines (see `records.iter_records`) or has no
            record; the image folder is not a folder.
    """
    records = (record for record, _ in iter_records(Path(data_path)))
    report = check_records(records, image_folder, processor, template, max_length, progress,
                           max_image_pixels=max_image_pixels)
    if not report.num_samples:
        raise DataError(f"{data_path}: no samples")
    return report


def check_rejected_target(out_dir: str | Path) -> Path:
    """The `rejected.jsonl` path in `out_dir`, refused before a scan when writing it could destroy a file
    visprune did not write: `out_dir` must be a folder (or not exist yet) and an existing rejected.jsonl must
    be a regular file whose last line is the counts record `write_rejected` ends with.

    Raises:
        DataError: naming the path and why.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is not a folder (rejected.jsonl is written inside it)")
    path = out_dir / REJECTED_FILE
    if not os.path.lexists(path):
        return path
    if path.is_symlink() or not path.is_file():
        raise DataError(f"{path} exists and is not a regular file: refusing to replace it")
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 65536))
            last = handle.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        written = set(json.loads(last)) == COUNTS_KEYS
    except (OSError, ValueError, TypeError):
        written = False
    if not written:
        raise DataError(f"{path} exists and was not written by `visprune data check` (its last line is not the "
                        "counts record): refusing to replace it; choose another --out")
    return path


def write_rejected(report: CheckReport, out_dir: str | Path) -> Path:
    """`out_dir/rejected.jsonl`: one line per bad sample, then a last line with the counts per reason.

    The file replaces an earlier rejected.jsonl only when visprune wrote that one (`check_rejected_target`)
    and is written atomically (a temporary file renamed over it): nothing else in `out_dir` is touched.
    """
    path = check_rejected_target(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(item) for item in report.rejected]
    lines.append(json.dumps({"counts": report.counts, "num_samples": report.num_samples, "num_ok": report.num_ok}))
    return write_atomic(path, "\n".join(lines) + "\n")


__all__ = ["FORMATS", "REJECTED_FILE", "CheckReport", "Judge", "check_file", "check_records", "check_rejected_target",
           "image_problem", "open_checked_image", "write_rejected"]
