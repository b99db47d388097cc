"""Training data: `build_dataset` reads and validates a LLaVA-format JSON file into a `datasets.Dataset`
(images are not opened) or loads a folder written by `visprune data prepare` (token ids and label masks
already rendered), and `LlavaCollator` loads the images safely, renders the processor's chat template
and supervises only the assistant answers and their end-of-turn tokens."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from datasets import Dataset, Features, List, Value
from PIL import Image

from .config import DataConfig

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # the LLaVA JSON convention, whatever the processor's own image token is
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA "from" -> chat-template role
IGNORE_INDEX = -100
FEATURES = Features({
    "id": Value("string"),
    "images": List(Value("string")),
    "conversations": List({"from": Value("string"), "value": Value("string")}),
})
# a folder written by `visprune data prepare`: the `datasets` folder plus this manifest, written last
MANIFEST_FILE = "visprune_data.json"
PREPARED_FORMAT = "visprune-data/1"
PREPARED_COLUMNS = ("input_ids", "labels", "length")  # beside FEATURES' columns
_TEXT_KEYS = {"input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets", "token_type_ids"}
_TOKEN_KEYS = ("mm_token_type_ids",)  # per-token tensors beside input_ids (Qwen2-VL's M-RoPE needs it): padded with 0


class DataError(ValueError):
    """Data that cannot be used for training; the message names the sample id (or file) and the reason."""


# ---- reading and validation ------------------------------------------------------------------------

def build_dataset(cfg: DataConfig) -> Dataset:
    """Read `cfg.path` (a JSON list of LLaVA records, or JSON lines) into a Dataset with columns
    `id` (str), `images` (list[str], [] for text-only) and `conversations` (list of {"from", "value"}).

    A folder written by `visprune data prepare` is loaded memory-mapped instead (`load_prepared`), with
    the columns `input_ids`, `labels` (list[int32]) and `length` (int32) besides those (plus any per-token
    column of the processor, e.g. `mm_token_type_ids`); the trainer should also call
    `check_prepared_matches` with its processor.

    Raises:
        DataError: the file cannot be read, or some records are malformed; the message lists every bad
            sample id with its reason. For a folder: it is not a complete prepared dataset.
    """
    path = Path(cfg.path)
    if path.is_dir():
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
    return Dataset.from_list(rows, features=FEATURES)


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


# ---- prepared folders (`visprune data prepare`) -------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared folder (or the manifest file itself), its format checked.

    Raises:
        DataError: no manifest (an incomplete conversion, or not a prepared folder) or another format.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    if not manifest_path.is_file():
        raise DataError(f"{path} has no {MANIFEST_FILE}: not a folder written by `visprune data prepare`, or an "
                        "incomplete one (the manifest is written last); prepare the data again")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{manifest_path}: format {found!r}, this visprune reads {PREPARED_FORMAT!r}; "
                        "prepare the data again")
    return manifest


def load_prepared(path: str | os.PathLike) -> Dataset:
    """A prepared folder as a memory-mapped Dataset (`datasets.load_from_disk`), manifest and columns checked."""
    from datasets import load_from_disk

    path = Path(path)
    manifest = read_manifest(path)
    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        raise DataError(f"{path}: cannot load the prepared dataset: {exc}") from exc
    missing = [column for column in (*FEATURES, *PREPARED_COLUMNS) if column not in dataset.column_names]
    if missing:
        raise DataError(f"{path}: the prepared dataset lacks the columns {missing}")
    if len(dataset) != manifest.get("counts", {}).get("ok"):
        raise DataError(f"{path}: {len(dataset)} rows but the manifest says {manifest.get('counts', {}).get('ok')}")
    logger.info("%s: %d prepared samples (%s)", path, len(dataset), manifest.get("source", {}).get("path"))
    return dataset


def prepared_lengths(dataset: Dataset) -> list[int] | None:
    """The `length` column (tokens, image tokens included) as a list, or None for raw rows: what
    `LengthGroupedSampler(lengths=...)` needs. Not `dataset["length"]`: in datasets 5 that is a lazy
    Column, which the sampler indexes one element at a time (about 15 s per 20K rows; 665K: minutes)."""
    return dataset["length"][:] if "length" in dataset.column_names else None


def processor_fingerprint(processor: Any, image_text: str | None = None) -> dict[str, Any]:
    """What decides a prepared dataset's token ids and label masks: the processor class, its chat template,
    the tokenizer's vocabulary, the image token (and the text each `<image>` becomes) and the image
    processor's settings (which decide how many tokens an image takes); `fingerprint` hashes them all."""
    tokenizer = processor.tokenizer
    vocab = sorted(tokenizer.get_vocab().items())
    image_config = {key: value for key, value in processor.image_processor.to_dict().items()
                    if not key.startswith("_") and key not in ("image_processor_type", "processor_class")} \
        if getattr(processor, "image_processor", None) is not None else None

    def sha(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    parts = {
        "class": type(processor).__name__,
        "chat_template_sha256": sha(processor.chat_template or ""),
        "vocab_size": len(tokenizer),
        "vocab_sha256": sha(vocab),
        "image_token_id": getattr(processor, "image_token_id", None),
        "image_text": image_text or getattr(processor, "image_token", IMAGE_PLACEHOLDER),
        "image_processor_sha256": sha(image_config),
    }
    return {**parts, "fingerprint": sha(parts)}


_FINGERPRINT_NAMES = {"class": "processor class", "chat_template_sha256": "chat template",
                      "vocab_size": "tokenizer vocabulary size", "vocab_sha256": "tokenizer vocabulary",
                      "image_token_id": "image token id", "image_text": "text of an <image>",
                      "image_processor_sha256": "image processor settings"}


def check_prepared_matches(prepared: str | os.PathLike | dict, processor: Any, max_length: int,
                           image_folder: str | os.PathLike | None, image_text: str | None = None,
                           drop_overlong: bool = False) -> dict[str, Any]:
    """Refuse a prepared dataset (folder, manifest file or manifest dict) that the training run would not
    have produced itself: another processor (class, chat template, vocabulary, image token, text of an
    `<image>` — pass the family's `image_text` — or image processor settings), samples longer than the
    run's `max_length` (unless `drop_overlong`: they are dropped by the collator and counted), or another
    image folder. Returns the manifest.

    Raises:
        DataError: naming every mismatch and what to do.
    """
    manifest = prepared if isinstance(prepared, dict) else read_manifest(prepared)
    name = "the prepared dataset" if isinstance(prepared, dict) else str(prepared)
    problems = []
    stored, current = manifest.get("processor", {}), processor_fingerprint(processor, image_text)
    if stored.get("fingerprint") != current["fingerprint"]:
        differ = [label for key, label in _FINGERPRINT_NAMES.items() if stored.get(key) != current[key]]
        problems.append(f"it was prepared with another processor ({', '.join(differ) or 'fingerprint'} differ: "
                        f"prepared with {stored.get('class')}, this run has {current['class']})")
    longest = manifest.get("lengths", {}).get("max", 0)
    if longest > max_length and not drop_overlong:
        problems.append(f"its longest sample has {longest} tokens (prepared with --max-length "
                        f"{manifest.get('max_length')}) > data.max_length {max_length}; prepare again with "
                        f"--max-length {max_length} or set data.drop_overlong")
    prepared_folder = manifest.get("image_folder")
    run_folder = None if image_folder is None else os.path.realpath(image_folder)
    if manifest.get("counts", {}).get("with_images", 0) and prepared_folder != run_folder:
        problems.append(f"its images were checked in {prepared_folder} but data.image_folder is {run_folder}")
    if problems:
        raise DataError(f"{name}: " + "; ".join(problems) + " (run `visprune data prepare` with this model's "
                        "processor and the recipe's max_length and image folder)")
    return manifest


# ---- collation ---------------------------------------------------------------------------------------

class LlavaCollator:
    """Turn dataset rows into a right-padded training batch.

    Output: `input_ids`, `attention_mask`, `labels` (B, T) long, per-token tensors the processor
    returns beside them (`mm_token_type_ids`, padded with 0), and `pixel_values` with every image of
    the batch in sample order when there is at least one (plus any other per-image tensor the
    processor returns; LLaVA-NeXT's per-image tile stacks of different sizes are zero-padded). Labels are
    IGNORE_INDEX except on each assistant answer and its end-of-turn token. Nothing is truncated: an
    over-long sample is an error or, with `cfg.drop_overlong`, dropped and counted in `num_dropped`
    (per process: DataLoader workers count in their own copy). `image_text` is what each `<image>` of
    the data becomes in the prompt (default: the processor's image token; see `Family.image_text`).
    """

    def __init__(self, processor: Any, cfg: DataConfig, image_text: str | None = None):
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("LlavaCollator: the processor's tokenizer has no pad token")
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("LlavaCollator: the processor has no chat template")
        self.processor = processor
        self.cfg = cfg
        self.pad_token_id = tokenizer.pad_token_id
        self.bos_token = tokenizer.bos_token
        self.image_token_id = getattr(processor, "image_token_id", None)
        self.image_text = image_text or getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.image_folder = Path(cfg.image_folder).resolve() if cfg.image_folder is not None else None
        self.num_dropped = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        samples, dropped = [], []
        for row in rows:
            sample = self.encode(row)
            length = sample["input_ids"].numel()
            if length <= self.cfg.max_length:
                samples.append(sample)
            elif not self.cfg.drop_overlong:
                raise DataError(f"sample {row['id']!r}: {length} tokens (image tokens included) > data.max_length "
                                f"{self.cfg.max_length}; raise max_length or set data.drop_overlong")
            else:
                self.num_dropped += 1
                dropped.append(row["id"])
                logger.warning("dropping over-long sample %r: %d tokens > data.max_length %d (%d dropped so far)",
                               row["id"], length, self.cfg.max_length, self.num_dropped)
        if not samples:
            raise DataError(f"every sample of the batch is over-long (> data.max_length {self.cfg.max_length}) "
                            f"and was dropped: {dropped}")
        return self.pad(samples)

    def encode(self, row: dict, images: list[Image.Image] | None = None) -> dict[str, torch.Tensor]:
        """One row -> `input_ids`, `labels` (T,) long, and the processor's image tensors if it has images.

        A prepared row (`visprune data prepare`: it has `input_ids` and `labels`) is not rendered or
        tokenized again; see `encode_prepared`. `images`: the row's images already opened (as RGB, by a
        caller that checked them the way `load_image` does); default: `load_image` opens them.
        """
        if row.get("input_ids") is not None:
            return self.encode_prepared(row, images)
        sample_id = row["id"]
        reasons = validate_row(row)
        if reasons:
            raise DataError(f"sample {sample_id!r}: {'; '.join(reasons)}")
        if images is None:
            images = [self.load_image(sample_id, image) for image in row["images"]]
        text, spans = self.render(sample_id, self.messages(row))
        out = self._process([sample_id], [text], images)
        sample = self._token_sample(out, 0, spans)
        if images:
            sample.update(self._image_tensors(out))
        return sample

    def encode_tokens(self, rows: list[dict], images: list[list[Image.Image] | None] | None = None
                      ) -> list[dict[str, torch.Tensor] | DataError]:
        """The token side of `encode` (`input_ids`, `labels` and per-token tensors, no image tensors) for
        many raw rows with one chat-template render and one processor call for all of them, which is
        several times cheaper per row than `encode` (`visprune data prepare` uses it; equal to `encode`
        row by row, tested). A row that cannot be encoded gets its DataError in its place; when the
        processor rejects the batch, every row is encoded alone so the error lands on its own row."""
        results: list[Any] = [None] * len(rows)
        todo = []  # (position, row, images)
        for pos, row in enumerate(rows):
            try:
                reasons = validate_row(row)
                if reasons:
                    raise DataError(f"sample {row['id']!r}: {'; '.join(reasons)}")
                opened = images[pos] if images is not None and images[pos] is not None else \
                    [self.load_image(row["id"], image) for image in row["images"]]
                todo.append((pos, row, opened))
            except DataError as exc:
                results[pos] = exc
        rendered = self.render_many([row["id"] for _, row, _ in todo], [self.messages(row) for _, row, _ in todo])
        ready = []
        for (pos, row, opened), result in zip(todo, rendered):
            if isinstance(result, DataError):
                results[pos] = result
            else:
                ready.append((pos, row, opened, *result))
        # texts that start with the template's own BOS are tokenized without adding one: one call per kind
        for add_bos in (False, True):
            group = [item for item in ready if self._add_special_tokens(item[3]) == add_bos]
            if not group:
                continue
            flat = [image for item in group for image in item[2]]
            try:
                out = self._process([item[1]["id"] for item in group], [item[3] for item in group], flat)
            except DataError as exc:
                if len(group) == 1:
                    results[group[0][0]] = exc
                    continue
                for pos, row, opened, _, _ in group:  # find the row the processor rejects
                    results[pos] = self.encode_tokens([row], [opened])[0]
                continue
            for index, (pos, _, _, _, spans) in enumerate(group):
                results[pos] = self._token_sample(out, index, spans)
        return results

    def messages(self, row: dict) -> list[dict]:
        """A row's turns as chat-template messages, each `<image>` replaced by `image_text`."""
        return [{"role": ROLES[turn["from"]], "content": turn["value"].replace(IMAGE_PLACEHOLDER, self.image_text)}
                for turn in row["conversations"]]

    def _add_special_tokens(self, text: str) -> bool:
        return not (self.bos_token and text.startswith(self.bos_token))

    def _process(self, sample_ids: list[str], texts: list[str], images: list[Image.Image]) -> Any:
        """The processor on `texts` (one add_special_tokens choice for all) and their images in order;
        image tensors as "pt" (what the model gets), the text as lists (converting offsets is slow)."""
        kwargs = {"images": images, "images_kwargs": {"return_tensors": "pt"}} if images else {}
        try:
            out = self.processor(text=texts, return_offsets_mapping=True, return_text_replacement_offsets=True,
                                 add_special_tokens=self._add_special_tokens(texts[0]), **kwargs)
        except ValueError as exc:
            name = repr(sample_ids[0]) if len(sample_ids) == 1 else f"{sample_ids[0]!r} (of {len(sample_ids)})"
            raise DataError(f"sample {name}: the processor rejected it: {exc}") from exc
        if "offset_mapping" not in out:
            raise ValueError("LlavaCollator needs a fast (tokenizers) tokenizer that returns offset mappings")
        if images and "text_replacement_offsets" not in out:  # without them the spans would silently shift
            raise ValueError("LlavaCollator needs a processor that returns text_replacement_offsets")
        return out

    def _token_sample(self, out: Any, index: int, spans: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Text `index` of a processor output -> `input_ids`, `labels` and per-token tensors."""
        replacements = (out.get("text_replacement_offsets") or [[]] * (index + 1))[index]
        spans = [(shift_char(start, replacements), shift_char(end, replacements)) for start, end in spans]
        input_ids = torch.tensor(out["input_ids"][index], dtype=torch.long)
        offsets = torch.tensor(out["offset_mapping"][index], dtype=torch.long).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        # a token is supervised when it overlaps an assistant span; zero-width (added) tokens never do
        supervised = torch.zeros_like(input_ids, dtype=torch.bool)
        for span_start, span_end in spans:
            supervised |= (starts < span_end) & (ends > span_start)
        supervised &= ends > starts
        if self.image_token_id is not None:
            supervised &= input_ids != self.image_token_id
        sample = {"input_ids": input_ids, "labels": torch.where(supervised, input_ids, IGNORE_INDEX)}
        sample.update({key: torch.tensor(out[key][index], dtype=torch.long) for key in _TOKEN_KEYS if key in out})
        return sample

    def _image_tensors(self, out: Any) -> dict[str, torch.Tensor]:
        """The processor output's image entries, converted as the processor converts for return_tensors="pt"."""
        from transformers import BatchFeature

        images = {key: value for key, value in out.items() if key not in _TEXT_KEYS and key not in _TOKEN_KEYS}
        return dict(BatchFeature(images, tensor_type="pt",
                                 skip_tensor_conversion=getattr(self.processor, "skip_tensor_conversion", None)))

    def encode_prepared(self, row: dict, images: list[Image.Image] | None = None) -> dict[str, torch.Tensor]:
        """A prepared row -> the stored `input_ids`, `labels` (and per-token columns) as long tensors, plus
        the image tensors of its images.

        The image tensors come from the processor called on the images with a minimal prompt (one image
        token per image): the same `_process_images` call with the same image kwargs `encode` makes, so
        the same tensors for any processor whose image tensors do not depend on the text (LLaVA,
        LLaVA-NeXT, Qwen2-VL, InternVL in transformers 5.x; tested equal to `encode` for LLaVA and
        LLaVA-NeXT). The prompt's image tokens must number those stored for the row: otherwise the images
        or the processor changed since the folder was prepared, and that is an error, never re-encoded.
        """
        sample_id = row["id"]
        input_ids = torch.tensor(row["input_ids"], dtype=torch.long)
        labels = torch.tensor(row["labels"], dtype=torch.long)
        if labels.shape != input_ids.shape:
            raise DataError(f"sample {sample_id!r}: prepared labels and input_ids differ in length")
        sample = {"input_ids": input_ids, "labels": labels}
        sample.update({key: torch.tensor(row[key], dtype=torch.long) for key in _TOKEN_KEYS if row.get(key) is not None})
        if images is None:
            images = [self.load_image(sample_id, image) for image in row["images"]]
        if not images:
            return sample
        image_token = getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)
        try:
            out = self.processor(text=[image_token * len(images)], images=images, return_tensors="pt")
        except ValueError as exc:
            raise DataError(f"sample {sample_id!r}: the processor rejected its images: {exc}") from exc
        if self.image_token_id is not None:
            expected = int((out["input_ids"] == self.image_token_id).sum())
            stored = int((input_ids == self.image_token_id).sum())
            if expected != stored:
                raise DataError(f"sample {sample_id!r}: its images now take {expected} image tokens but the prepared "
                                f"dataset has {stored}; the images or the processor changed since "
                                "`visprune data prepare`: prepare the data again")
        sample.update(self._image_tensors(out))
        return sample

    def render(self, sample_id: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The chat-template text and the character spans of each assistant turn (answer + end of turn).

        A span is what rendering the conversation through that answer adds to rendering it up to the
        generation prompt, so any template that renders a conversation's prefixes as text prefixes works
        (LLaVA-1.5, Llama, ChatML); others are rejected rather than mislabelled. A template that raises
        (e.g. on a role it does not support) is a DataError naming the sample.
        """
        result = self.render_many([sample_id], [messages])[0]
        if isinstance(result, DataError):
            raise result
        return result

    def render_many(self, sample_ids: list[str], conversations: list[list[dict]]
                    ) -> list[tuple[str, list[tuple[int, int]]] | DataError]:
        """`render` for many conversations with two batched template calls (every prefix of every
        conversation at once) instead of 1 + 2 per answer each: the same strings, less overhead. A
        conversation that ends with an answer is its own last prefix. When the template raises, each
        conversation is rendered alone so the error lands on its own sample."""
        from jinja2 import TemplateError

        if not conversations:
            return []
        throughs, befores, plan = [], [], []
        for messages in conversations:
            answers = [idx for idx, message in enumerate(messages) if message["role"] == "assistant"]
            ends_with_answer = bool(answers) and answers[-1] == len(messages) - 1
            plan.append((len(throughs), len(befores), len(answers), ends_with_answer))
            throughs += [messages[:idx + 1] for idx in answers] + ([] if ends_with_answer else [messages])
            befores += [messages[:idx] for idx in answers]
        try:
            throughs = self.processor.apply_chat_template(throughs, tokenize=False)
            befores = self.processor.apply_chat_template(befores, tokenize=False,
                                                         add_generation_prompt=True) if befores else []
        except TemplateError as exc:
            if len(conversations) > 1:
                return [self.render_many([sample_id], [messages])[0]
                        for sample_id, messages in zip(sample_ids, conversations)]
            return [DataError(f"sample {sample_ids[0]!r}: the chat template rejected it: {exc}")]
        results: list[Any] = []
        for sample_id, (at, before_at, num_answers, ends_with_answer) in zip(sample_ids, plan):
            answer_texts = throughs[at:at + num_answers]
            text = answer_texts[-1] if ends_with_answer else throughs[at + num_answers]
            spans = []
            for before, through in zip(befores[before_at:before_at + num_answers], answer_texts):
                if not (through.startswith(before) and text.startswith(through)):
                    spans = DataError(f"sample {sample_id!r}: the chat template does not render conversation "
                                      "prefixes as text prefixes, so the assistant spans cannot be found")
                    break
                spans.append((len(before), len(through)))
            results.append(spans if isinstance(spans, DataError) else (text, spans))
        return results

    def load_image(self, sample_id: str, image: str) -> Image.Image:
        """Open `image` (relative to the image folder, which it may not leave) as RGB."""
        path = self.resolve_image_path(sample_id, image)
        if not path.is_file():
            raise DataError(f"sample {sample_id!r}: image {image!r} not found in {self.image_folder}")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"sample {sample_id!r}: cannot decode image {image!r}: {exc}") from exc

    def resolve_image_path(self, sample_id: str, image: str) -> Path:
        """The real path of `image`; symlinks are followed and the target must stay inside the folder."""
        if self.image_folder is None:
            raise DataError(f"sample {sample_id!r} has image {image!r} but data.image_folder is not set")
        problem = image_path_problem(image)
        if problem:
            raise DataError(f"sample {sample_id!r}: image {image!r}: {problem}")
        path = (self.image_folder / image).resolve()
        if not path.is_relative_to(self.image_folder):
            raise DataError(f"sample {sample_id!r}: image {image!r} resolves outside data.image_folder "
                            f"({self.image_folder}); symlinks must point inside it")
        return path

    def pad(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad the text tensors to the longest sample; concatenate the image tensors in sample order."""
        length = max(sample["input_ids"].numel() for sample in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for b, sample in enumerate(samples):
            num_tokens = sample["input_ids"].numel()
            input_ids[b, :num_tokens] = sample["input_ids"]
            attention_mask[b, :num_tokens] = 1
            labels[b, :num_tokens] = sample["labels"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in _TOKEN_KEYS:
            if any(key in sample for sample in samples):
                batch[key] = torch.zeros((len(samples), length), dtype=torch.long)
                for b, sample in enumerate(samples):
                    if key in sample:
                        batch[key][b, :sample[key].numel()] = sample[key]
        image_keys = dict.fromkeys(key for sample in samples for key in sample if key not in batch)
        for key in image_keys:
            batch[key] = cat_images([sample[key] for sample in samples if key in sample])
        return batch


def cat_images(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample image tensors along dim 0; LLaVA-NeXT's (images, tiles, 3, H, W) stacks
    with different tile counts are zero-padded along dim 1 first (the model reads only each image's
    own tiles, from `image_sizes`)."""
    if parts[0].dim() == 5 and len({part.shape[1] for part in parts}) > 1:
        tiles = max(part.shape[1] for part in parts)
        parts = [torch.nn.functional.pad(part, (0, 0, 0, 0, 0, 0, 0, tiles - part.shape[1])) for part in parts]
    return torch.cat(parts)


def shift_char(char: int, replacements: list[dict]) -> int:
    """Map a character position of the rendered text into the text after the processor expanded its
    image placeholders (`text_replacement_offsets`: each entry's `new_span` end minus `span` end is the
    growth so far)."""
    shift = 0
    for replacement in replacements:
        if replacement["span"][1] <= char:
            shift = replacement["new_span"][1] - replacement["span"][1]
    return char + shift
