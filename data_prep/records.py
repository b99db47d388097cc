"""LLaVA-format records: `build_dataset` reads and validates a JSON list or JSON-lines file into a
`datasets.Dataset` (images are not opened) or loads a folder written by `visprune data prepare`;
`iter_records` streams a file of any size; `DataError` names the bad sample and the reason."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset, Features

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # the LLaVA JSON convention, whatever the processor's own image token is
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA "from" -> chat-template role
IGNORE_INDEX = -100
COLUMNS = ("id", "images", "conversations")


def features() -> Features:
    """The dataset columns of LLaVA records: `id` (str), `images` (list[str]), `conversations` (list of
    {"from", "value"})."""
    from datasets import Features, List, Value

    return Features({
        "id": Value("string"),
        "images": List(Value("string")),
        "conversations": List({"from": Value("string"), "value": Value("string")}),
    })


class DataError(ValueError):
    """Data that cannot be used for training; the message names the sample id (or file) and the reason."""


def build_dataset(path: str | os.PathLike) -> Dataset:
    """Read `path` (a JSON list of LLaVA records, or JSON lines) into a Dataset with columns
    `id` (str), `images` (list[str], [] for text-only) and `conversations` (list of {"from", "value"}).

    A folder written by `visprune data prepare` is loaded memory-mapped instead (`load_prepared`), with
    the columns `input_ids`, `labels` (list[int32]) and `length` (int32) besides those (plus any per-token
    column of the processor, e.g. `mm_token_type_ids`); the trainer should also call
    `prepared.check_prepared_matches` with its processor and template.

    Raises:
        DataError: the file cannot be read, or some records are malformed; the message lists every bad
            sample id with its reason. For a folder: it is not a complete prepared dataset.
    """
    path = Path(path)
    if path.is_dir():
        from .prepared import load_prepared

        return load_prepared(path)
    records = read_records(path)
    rows, problems = [], []
    for index, record in enumerate(records):
        name, row, reasons = normalize_record(record, index)
        if reasons:
            problems.append(f"  {name}: {'; '.join(reasons)}")
        else:
            rows.append(row)
    if problems:
        raise DataError(f"{path}: {len(problems)} of {len(records)} samples are invalid:\n" + "\n".join(problems))
    if not rows:
        raise DataError(f"{path}: no samples")
    duplicates = [sample_id for sample_id, count in Counter(row["id"] for row in rows).items() if count > 1]
    if duplicates:  # LLaVA mixtures do reuse ids; errors then name an id that is not unique
        logger.warning("%s: %d ids occur more than once (first: %r)", path, len(duplicates), duplicates[0])
    logger.info("%s: %d samples, %d with images", path, len(rows), sum(bool(row["images"]) for row in rows))
    from datasets import Dataset

    return Dataset.from_list(rows, features=features())


def read_records(path: Path) -> list[Any]:
    """The raw records of a `.json` file (a list) or a `.jsonl` file (one record per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    return records


def iter_records(path: Path, digest: Any = None, chunk_bytes: int = 1 << 22) -> Iterator[tuple[Any, int]]:
    """Stream the raw records of a `.json` list or `.jsonl` file as (record, bytes read so far), holding
    only a few MB of text at a time (a 665K-sample LLaVA JSON is about 1 GB). Every byte read is fed to
    `digest` (a `hashlib` object) when given, so the file is hashed in the same pass.

    Raises:
        DataError: the file cannot be read or is not a JSON list / JSON lines (naming the record or line).
    """
    try:
        with open(path, "rb") as handle:
            if path.suffix != ".jsonl":
                yield from _iter_json_list(path, handle, digest, chunk_bytes)
                return
            done = 0
            for line_no, line in enumerate(handle, 1):
                done += len(line)
                if digest is not None:
                    digest.update(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DataError(f"{path}: line {line_no} is not valid JSON: {exc}") from exc
                yield record, done
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc


def _iter_json_list(path: Path, handle: Any, digest: Any, chunk_bytes: int) -> Iterator[tuple[Any, int]]:
    import codecs

    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    text, pos, done, eof, index = "", 0, 0, False, 0

    def more() -> bool:  # append the next chunk; False at the end of the file
        nonlocal text, pos, done, eof
        if eof:
            return False
        raw = handle.read(chunk_bytes)
        done += len(raw)
        if digest is not None:
            digest.update(raw)
        try:
            piece = utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: not UTF-8 near byte {done}: {exc}") from exc
        text, pos = text[pos:] + piece, 0
        eof = not raw
        return True

    def skip_space() -> str:  # the next non-space character ("" at the end of the file)
        nonlocal pos
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text):
                return text[pos]
            if not more():
                return ""

    first = skip_space()
    if first.startswith("\ufeff"):  # a UTF-8 byte-order mark
        pos += 1
        first = skip_space()
    if first != "[":
        if not first:
            raise DataError(f"{path} is not valid JSON: the file is empty")
        kind = {"{": "an object", '"': "a string"}.get(first, repr(first))
        raise DataError(f"{path}: expected a JSON list of samples, got {kind} at the start")
    pos += 1
    if skip_space() == "]":
        pos += 1
    else:
        while True:
            skip_space()
            while True:
                try:
                    record, end = decoder.raw_decode(text, pos)
                    # a number cut near the chunk's end ("1.5e-7" as "1.5e") decodes too early: read on
                    if end > len(text) - 32 and not eof and not isinstance(record, (dict, list, str)):
                        raise json.JSONDecodeError("cut", text, len(text))
                    break
                except json.JSONDecodeError as exc:
                    # read on only when more text could complete the record (the error is at its cut
                    # end, or an open string), and not past 256 MB for one record
                    cut = exc.pos >= len(text) - 10 or exc.msg.startswith("Unterminated string")
                    if cut and len(text) - pos < 1 << 28 and more():
                        continue
                    raise DataError(f"{path} is not valid JSON: record #{index}: {exc.msg}") from exc
            pos = end
            yield record, done
            index += 1
            sep = skip_space()
            pos += 1
            if sep == "]":
                break
            if sep != ",":
                raise DataError(f"{path} is not valid JSON: expected ',' or ']' after record #{index - 1}, "
                                f"got {sep or 'the end of the file'!r}")
    if skip_space():
        raise DataError(f"{path} is not valid JSON: extra data after the closing ']'")


def normalize_record(record: Any, index: int) -> tuple[str, dict | None, list[str]]:
    """Bring one LLaVA record to the dataset columns.

    Returns:
        (name for messages: the id, or `#index` when it has none; the row or None; the reasons it is bad).
    """
    if not isinstance(record, dict):
        return f"#{index}", None, [f"expected an object, got {type(record).__name__}"]
    sample_id = record.get("id")
    name = repr(str(sample_id)) if isinstance(sample_id, (str, int)) else f"#{index}"
    reasons = []
    if sample_id is None:
        reasons.append("missing 'id'")
    elif not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        reasons.append(f"'id' must be a string, got {type(sample_id).__name__}")

    image = record.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(item, str) for item in image):
        images = list(image)
    else:
        images = []
        reasons.append("'image' must be a string or a list of strings")

    conversations = record.get("conversations")
    turns = []
    if conversations is None:
        reasons.append("missing 'conversations'")
    elif not isinstance(conversations, list):
        reasons.append("'conversations' must be a list")
    else:
        for turn_idx, turn in enumerate(conversations):
            if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) \
                    or not isinstance(turn.get("value"), str):
                reasons.append(f"conversations[{turn_idx}] must be {{'from': str, 'value': str}}")
            else:
                turns.append({"from": turn["from"], "value": turn["value"]})
    if reasons:
        return name, None, reasons
    row = {"id": str(sample_id), "images": images, "conversations": turns}
    return name, row, validate_row(row)


def validate_row(row: dict) -> list[str]:
    """Why a normalised row cannot be trained on ([] when it can): roles, turn order, placeholder count
    and image paths that could leave the image folder. Touches no file."""
    reasons = []
    turns = row["conversations"]
    if not turns:
        return ["empty conversation"]
    for turn_idx, turn in enumerate(turns):
        role = turn["from"]
        if role not in ROLES:
            reasons.append(f"conversations[{turn_idx}]: unknown role {role!r} (expected human, gpt or system)")
        elif role == "system" and turn_idx != 0:
            reasons.append(f"conversations[{turn_idx}]: a system turn may only come first")
        elif role != "human" and IMAGE_PLACEHOLDER in turn["value"]:
            reasons.append(f"conversations[{turn_idx}]: {IMAGE_PLACEHOLDER} outside a human turn")
    first = turns[1] if turns[0]["from"] == "system" and len(turns) > 1 else turns[0]
    if first["from"] != "human":
        reasons.append("the conversation must start with a human turn (after an optional system turn)")
    if not any(turn["from"] == "gpt" for turn in turns):
        reasons.append("no 'gpt' turn to supervise")
    num_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if num_placeholders != len(row["images"]):
        reasons.append(f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(row['images'])} images")
    for image in row["images"]:
        problem = image_path_problem(image)
        if problem:
            reasons.append(f"image {image!r}: {problem}")
    return reasons


@functools.lru_cache(maxsize=1 << 16)  # a pure function of the string, asked several times per image
def image_path_problem(image: str) -> str | None:
    """Why `image` is not an acceptable path relative to the image folder, judged from the string alone
    (symlinks are checked when the collator resolves the path)."""
    if not image or "\x00" in image:
        return "empty path or NUL byte"
    if PurePosixPath(image).is_absolute() or PureWindowsPath(image).is_absolute() or PureWindowsPath(image).drive:
        return "absolute paths are not allowed; give a path inside data.image_folder"
    if ".." in PurePosixPath(image.replace("\\", "/")).parts:
        return "'..' is not allowed in image paths"
    return None
