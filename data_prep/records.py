"""LLaVA-format records: `build_dataset` reads and validates a JSON list or JSON-lines file into a
`datasets.Dataset` (images are not opened) or loads a folder written by `visprune data prepare`; `iter_records`
streams a file of any size as strict, bounded JSON (`read_json`: other files); `DataError` names sample and reason."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset, Features

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # the LLaVA JSON convention, whatever the processor's own image token is
VIDEO_PLACEHOLDER = "<video>"  # one per video of a record's `video` entry (LLaVA-Video / lmms-finetune convention)
MAX_VIDEO_FRAMES = 4096  # frame files of one video given as a list
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA "from" -> chat-template role
IGNORE_INDEX = -100
COLUMNS = ("id", "images", "conversations")  # and `videos` (absent in folders prepared before videos: none)
MAX_RECORD_CHARS = 1 << 28  # one record (a JSON-list item or a JSON line) above 256 MB is refused, not read on
MAX_NESTING = 100  # containers inside containers (a LLaVA record has 4 levels; deeper ones cannot be pickled)
DETAIL_CHARS = 500  # an input's value quoted in a message is cut to this many characters
PROBLEMS_SHOWN = 20  # bad samples named in one error message


def features() -> Features:
    """The dataset columns of LLaVA records: `id` (str), `images` (list[str]), `conversations` (list of
    {"from", "value"}), `videos` (list of {"file": a video file or "", "frames": its frame files or []})."""
    from datasets import Features, List, Value

    return Features({
        "id": Value("string"),
        "images": List(Value("string")),
        "conversations": List({"from": Value("string"), "value": Value("string")}),
        "videos": List({"file": Value("string"), "frames": List(Value("string"))}),
    })


def row_videos(row: dict) -> list[dict]:
    """A row's videos ({"file", "frames"}); [] for rows without the column (folders prepared before videos)."""
    return row.get("videos") or []


def video_paths(video: dict) -> list[str]:
    """Every file a video reads: its frame files, or its video file (a video without frames is a file)."""
    return list(video["frames"]) or [video["file"]]


def _normalize_videos(value: Any) -> tuple[list[dict], list[str]]:
    """A record's `video` entry as rows' videos: a string is one video file, a list holds videos, each a video file
    (string) or a list of frame files (strings, in order). Returns (videos, reasons)."""
    expected = "'video' must be a video file, or a list of videos each a video file or a list of frame files"
    if isinstance(value, str):
        return [{"file": value, "frames": []}], []
    if not isinstance(value, list):
        return [], [f"{expected}, got {type(value).__name__}"]
    videos, reasons = [], []
    for pos, item in enumerate(value):
        if isinstance(item, str):
            videos.append({"file": item, "frames": []})
        elif isinstance(item, list) and all(isinstance(frame, str) for frame in item):
            if not item:
                reasons.append(f"video[{pos}] has no frames")
            elif len(item) > MAX_VIDEO_FRAMES:
                reasons.append(f"video[{pos}] has {len(item)} frame files; at most {MAX_VIDEO_FRAMES}")
            else:
                videos.append({"file": "", "frames": list(item)})
        else:
            reasons.append(f"video[{pos}]: {expected}, got {type(item).__name__}")
    return videos, _capped(reasons)


class DataError(ValueError):
    """Data that cannot be used for training; the message names the sample id (or file) and the reason."""


def shorten(text: str, limit: int = DETAIL_CHARS) -> str:
    """`text`, cut to `limit` characters with its full length said: messages never quote unbounded input."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quote(value: Any, limit: int = 200) -> str:
    """`repr` of a string from the input (an id, an image path, a role), cut to about `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


class JSONContentError(ValueError):
    """Valid JSON syntax that the data layer refuses: a duplicate key, NaN or Infinity, a number out of range."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # a duplicate key: json.loads would silently keep the last value
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise JSONContentError(f"duplicate key {quote(duplicate, 100)}")
    return obj


def _constant(name: str) -> Any:
    raise JSONContentError(f"{name} is not a JSON value")


# refuses duplicate keys and NaN / Infinity; numbers that overflow to inf are caught by `check_json_value`
JSON_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant)


def check_json_value(value: Any, limit: int = MAX_NESTING) -> None:
    """Refuse a decoded value nested deeper than `limit` containers or holding a number that overflowed to
    inf (`1e999`). Level by level, so a 665K-record file costs about a second.

    Raises:
        JSONContentError: saying which.
    """
    level, depth = ([value] if type(value) in (dict, list) else []), 1
    if type(value) is float and not math.isfinite(value):
        raise JSONContentError("a number out of range (it overflows to infinity)")
    while level:
        deeper = []
        for item in level:
            for child in item.values() if type(item) is dict else item:
                kind = type(child)
                if kind is dict or kind is list:
                    deeper.append(child)
                elif kind is float and not math.isfinite(child):
                    raise JSONContentError("a number out of range (it overflows to infinity)")
        if deeper and depth >= limit:
            raise JSONContentError(f"nested deeper than {limit} levels")
        level, depth = deeper, depth + 1


def loads_json(text: str, where: str) -> Any:
    """`json.loads(text)`, refusing duplicate keys, NaN / Infinity, overflowing numbers and deep nesting.

    Raises:
        DataError: naming `where` (a file, a record) and the problem.
    """
    try:
        value = JSON_DECODER.decode(text)
        check_json_value(value)
    except RecursionError:
        raise DataError(f"{where}: nested too deeply to read") from None
    except ValueError as exc:  # JSONDecodeError or JSONContentError
        raise DataError(f"{where} is not valid JSON: {shorten(str(exc))}") from exc
    return value


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The JSON value of a small file (a manifest, a config), read with `loads_json`.

    Raises:
        DataError: the file is missing, not a regular file, unreadable, not UTF-8 or not valid JSON.
    """
    path = Path(path)
    check_regular_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc
    return loads_json(text, str(path))


def check_regular_file(path: Path, what: str = "data file") -> None:
    """Refuse anything but a readable regular file before it is opened (a FIFO would block the reader).

    Raises:
        DataError: missing (or a broken symlink), a folder, a FIFO / socket / device.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise DataError(f"{what} {path} not found" + (" (a broken symlink)" if broken else "")) from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise DataError(f"{what} {path} is not a regular file (a FIFO, socket or device)")


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
            problems.append(f"{name}: {shorten('; '.join(reasons), 300)}")
        else:
            rows.append(row)
    if problems:
        shown = problems[:PROBLEMS_SHOWN]
        if len(problems) > PROBLEMS_SHOWN:
            shown.append(f"... and {len(problems) - PROBLEMS_SHOWN} more (`visprune data check` lists them all)")
        raise DataError(f"{path}: {len(problems)} of {len(records)} samples are invalid: " + " | ".join(shown))
    if not rows:
        raise DataError(f"{path}: no samples")
    duplicates = [sample_id for sample_id, count in Counter(row["id"] for row in rows).items() if count > 1]
    if duplicates:  # LLaVA mixtures do reuse ids; errors then name an id that is not unique
        logger.warning("%s: %d ids occur more than once (first: %s)", path, len(duplicates), quote(duplicates[0]))
    logger.info("%s: %d samples, %d with images", path, len(rows), sum(bool(row["images"]) for row in rows))
    from datasets import Dataset

    return Dataset.from_list(rows, features=features())


def read_records(path: Path) -> list[Any]:
    """The raw records of a `.json` file (a list) or a `.jsonl` file (one record per line), read by
    `iter_records` (the same checks and messages)."""
    return [record for record, _ in iter_records(Path(path))]


def iter_records(path: Path, digest: Any = None, chunk_bytes: int = 1 << 22) -> Iterator[tuple[Any, int]]:
    """Stream the raw records of a `.json` list or `.jsonl` file as (record, bytes read so far), holding
    only a few MB of text at a time (a 665K-sample LLaVA JSON is about 1 GB). Every byte read is fed to
    `digest` (a `hashlib` object) when given, so the file is hashed in the same pass.

    Records are decoded by `JSON_DECODER` and checked by `check_json_value`: duplicate keys, NaN / Infinity,
    overflowing numbers and nesting deeper than `MAX_NESTING` are refused, and so is a record or line longer
    than `MAX_RECORD_CHARS`.

    Raises:
        DataError: the file is not a readable regular file or not a JSON list / JSON lines (naming the
            record or line).
    """
    check_regular_file(path)
    try:
        with open(path, "rb") as handle:
            if path.suffix != ".jsonl":
                yield from _iter_json_list(path, handle, digest, chunk_bytes)
            else:
                yield from _iter_json_lines(path, handle, digest)
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from exc


def _iter_json_lines(path: Path, handle: Any, digest: Any) -> Iterator[tuple[Any, int]]:
    done, line_no = 0, 0
    while True:
        line = handle.readline(MAX_RECORD_CHARS + 1)  # never more than one record's bound in memory
        if not line:
            if line_no == 0:
                raise DataError(f"{path}: the file is empty")
            return
        line_no += 1
        done += len(line)
        if digest is not None:
            digest.update(line)
        if len(line) > MAX_RECORD_CHARS:
            raise DataError(f"{path}: line {line_no} is longer than {MAX_RECORD_CHARS >> 20} MB (one record): "
                            "not JSON lines, or a record too large to train on")
        try:
            text = line.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: line {line_no} is not UTF-8 text ({exc.reason} at byte {exc.start} of the "
                            "line)") from None
        if not text.strip():
            continue
        yield loads_json(text, f"{path}: line {line_no}"), done


def _iter_json_list(path: Path, handle: Any, digest: Any, chunk_bytes: int) -> Iterator[tuple[Any, int]]:
    import codecs

    decoder = JSON_DECODER
    utf8 = codecs.getincrementaldecoder("utf-8")()
    text, pos, done, eof, index = "", 0, 0, False, 0

    def more(size: int = chunk_bytes) -> bool:  # append the next `size` bytes; False at the end of the file
        nonlocal text, pos, done, eof
        if eof:
            return False
        raw = handle.read(size)
        done += len(raw)
        if digest is not None:
            digest.update(raw)
        try:
            piece = utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: not UTF-8 near byte {done - len(raw) + exc.start} "
                            f"({exc.reason})") from None
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
        kind = {"{": "an object (JSON lines must be in a .jsonl file)", '"': "a string"}.get(first, repr(first))
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
                    # end, or an open string), and not past MAX_RECORD_CHARS for one record
                    cut = exc.pos >= len(text) - 10 or exc.msg.startswith("Unterminated string")
                    if cut and not eof and len(text) - pos > MAX_RECORD_CHARS:
                        raise DataError(f"{path}: record #{index} is longer than {MAX_RECORD_CHARS >> 20} MB: "
                                        "too large to train on, or not valid JSON") from None
                    held = len(text) - pos  # read as much again (a big record is parsed O(log n) times), not past the bound
                    if cut and more(max(chunk_bytes, min(held, MAX_RECORD_CHARS + 1 - held))):
                        continue
                    raise DataError(f"{path} is not valid JSON: record #{index}: {exc.msg}") from None
                except RecursionError:
                    raise DataError(f"{path}: record #{index} is nested too deeply to read") from None
                except ValueError as exc:  # JSONContentError (complete objects and literals: never a cut), an
                    # integer of more than 4300 digits
                    raise DataError(f"{path} is not valid JSON: record #{index}: {shorten(str(exc))}") from None
            if end - pos > MAX_RECORD_CHARS:
                raise DataError(f"{path}: record #{index} is longer than {MAX_RECORD_CHARS >> 20} MB: too large to "
                                "train on")
            try:
                check_json_value(record)
            except JSONContentError as exc:
                raise DataError(f"{path} is not valid JSON: record #{index}: {exc}") from None
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
        (name for messages: the id (`quote`d), or `#index` when it has none; the row or None; the reasons it
        is bad).
    """
    if not isinstance(record, dict):
        return f"#{index}", None, [f"expected an object, got {type(record).__name__}"]
    sample_id = record.get("id")
    valid_id = isinstance(sample_id, (str, int)) and not isinstance(sample_id, bool)
    name = quote(sample_id) if valid_id else f"#{index}"
    reasons = []
    if sample_id is None:
        reasons.append("missing 'id'")
    elif not valid_id:
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
        reasons.append(f"'image' must be a string or a list of strings, got {type(image).__name__}")
    videos, video_reasons = _normalize_videos(record["video"]) if record.get("video") is not None else ([], [])
    reasons += video_reasons

    conversations = record.get("conversations")
    turns = []
    if conversations is None:
        reasons.append("missing 'conversations'")
    elif not isinstance(conversations, list):
        reasons.append(f"'conversations' must be a list, got {type(conversations).__name__}")
    else:
        bad = [turn_idx for turn_idx, turn in enumerate(conversations)
               if not isinstance(turn, dict) or not isinstance(turn.get("from"), str)
               or not isinstance(turn.get("value"), str)]
        reasons += _capped([f"conversations[{turn_idx}] must be {{'from': str, 'value': str}}" for turn_idx in bad])
        if not bad:
            turns = [{"from": turn["from"], "value": turn["value"]} for turn in conversations]
    if reasons:
        return name, None, reasons
    row = {"id": str(sample_id), "images": images, "conversations": turns, "videos": videos}
    return name, row, validate_row(row)


def _capped(reasons: list[str], limit: int = 5) -> list[str]:
    """The first `limit` of many reasons of one kind, then how many more."""
    return reasons if len(reasons) <= limit else reasons[:limit] + [f"and {len(reasons) - limit} more like these"]


def conversation_problems(turns: list[dict]) -> list[str]:
    """Why normalised turns cannot be trained on ([] when they can): roles, turn order, an answer to supervise."""
    if not turns:
        return ["empty conversation"]
    reasons = []
    for turn_idx, turn in enumerate(turns):
        role = turn["from"]
        if role not in ROLES:
            reasons.append(f"conversations[{turn_idx}]: unknown role {quote(role, 50)} (expected human, gpt or system)")
        elif role == "system" and turn_idx != 0:
            reasons.append(f"conversations[{turn_idx}]: a system turn may only come first")
        elif role != "human" and IMAGE_PLACEHOLDER in turn["value"]:
            reasons.append(f"conversations[{turn_idx}]: {IMAGE_PLACEHOLDER} outside a human turn")
        elif role != "human" and VIDEO_PLACEHOLDER in turn["value"]:
            reasons.append(f"conversations[{turn_idx}]: {VIDEO_PLACEHOLDER} outside a human turn")
    reasons = _capped(reasons)
    first = turns[1] if turns[0]["from"] == "system" and len(turns) > 1 else turns[0]
    if first["from"] != "human":
        reasons.append("the conversation must start with a human turn (after an optional system turn)")
    if not any(turn["from"] == "gpt" for turn in turns):
        reasons.append("no 'gpt' turn to supervise")
    return reasons


def validate_row(row: dict) -> list[str]:
    """Why a normalised row cannot be trained on ([] when it can): roles, turn order, placeholder counts
    and image and video paths that could leave the image folder. Touches no file."""
    reasons = conversation_problems(row["conversations"])
    if reasons == ["empty conversation"]:
        return reasons
    num_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in row["conversations"])
    if num_placeholders != len(row["images"]):
        reasons.append(f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(row['images'])} images")
    videos = row_videos(row)
    num_video_placeholders = sum(turn["value"].count(VIDEO_PLACEHOLDER) for turn in row["conversations"])
    if num_video_placeholders != len(videos):
        reasons.append(f"{num_video_placeholders} {VIDEO_PLACEHOLDER} placeholders but {len(videos)} videos")
    paths = [f"image {quote(image)}: {problem}" for image in row["images"] for problem in [image_path_problem(image)]
             if problem]
    paths += [f"video {quote(path)}: {problem}" for video in videos for path in video_paths(video)
              for problem in [image_path_problem(path)] if problem]
    return reasons + _capped(paths)


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
