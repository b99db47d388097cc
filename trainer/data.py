"""Training data: `build_dataset` reads and validates a LLaVA-format JSON file into a `datasets.Dataset`
(images are not opened), and `LlavaCollator` loads the images safely, renders the processor's chat
template and supervises only the assistant answers and their end-of-turn tokens."""

from __future__ import annotations

import json
import logging
from collections import Counter
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
_TEXT_KEYS = {"input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets", "token_type_ids"}
_TOKEN_KEYS = ("mm_token_type_ids",)  # per-token tensors beside input_ids (Qwen2-VL's M-RoPE needs it): padded with 0


class DataError(ValueError):
    """Data that cannot be used for training; the message names the sample id (or file) and the reason."""


# ---- reading and validation ------------------------------------------------------------------------

def build_dataset(cfg: DataConfig) -> Dataset:
    """Read `cfg.path` (a JSON list of LLaVA records, or JSON lines) into a Dataset with columns
    `id` (str), `images` (list[str], [] for text-only) and `conversations` (list of {"from", "value"}).

    Raises:
        DataError: the file cannot be read, or some records are malformed; the message lists every bad
            sample id with its reason.
    """
    path = Path(cfg.path)
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

    def encode(self, row: dict) -> dict[str, torch.Tensor]:
        """One row -> `input_ids`, `labels` (T,) long, and the processor's image tensors if it has images."""
        sample_id = row["id"]
        reasons = validate_row(row)
        if reasons:
            raise DataError(f"sample {sample_id!r}: {'; '.join(reasons)}")
        images = [self.load_image(sample_id, image) for image in row["images"]]
        messages = [{"role": ROLES[turn["from"]], "content": turn["value"].replace(IMAGE_PLACEHOLDER, self.image_text)}
                    for turn in row["conversations"]]
        text, spans = self.render(sample_id, messages)
        kwargs = {"images": images} if images else {}
        try:
            out = self.processor(text=[text], return_offsets_mapping=True, return_text_replacement_offsets=True,
                                 add_special_tokens=not (self.bos_token and text.startswith(self.bos_token)),
                                 return_tensors="pt", **kwargs)
        except ValueError as exc:
            raise DataError(f"sample {sample_id!r}: the processor rejected it: {exc}") from exc
        if "offset_mapping" not in out:
            raise ValueError("LlavaCollator needs a fast (tokenizers) tokenizer that returns offset mappings")
        if images and "text_replacement_offsets" not in out:  # without them the spans would silently shift
            raise ValueError("LlavaCollator needs a processor that returns text_replacement_offsets")
        replacements = (out.get("text_replacement_offsets") or [[]])[0]
        spans = [(shift_char(start, replacements), shift_char(end, replacements)) for start, end in spans]

        input_ids = out["input_ids"][0].long()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for pos, (start, end) in enumerate(out["offset_mapping"][0].tolist()):
            # a token is supervised when it overlaps an assistant span; zero-width (added) tokens never do
            if end > start and any(start < span_end and end > span_start for span_start, span_end in spans):
                labels[pos] = input_ids[pos]
        if self.image_token_id is not None:
            labels[input_ids == self.image_token_id] = IGNORE_INDEX
        sample = {"input_ids": input_ids, "labels": labels}
        sample.update({key: out[key][0] for key in _TOKEN_KEYS if key in out})
        if images:
            sample.update({key: value for key, value in out.items() if key not in _TEXT_KEYS and key not in _TOKEN_KEYS})
        return sample

    def render(self, sample_id: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The chat-template text and the character spans of each assistant turn (answer + end of turn).

        A span is what rendering the conversation through that answer adds to rendering it up to the
        generation prompt, so any template that renders a conversation's prefixes as text prefixes works
        (LLaVA-1.5, Llama, ChatML); others are rejected rather than mislabelled.
        """
        def apply(msgs: list[dict], add_generation_prompt: bool = False) -> str:
            return self.processor.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

        text = apply(messages)
        spans = []
        for turn_idx, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = apply(messages[:turn_idx], add_generation_prompt=True)
            through = apply(messages[:turn_idx + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(f"sample {sample_id!r}: the chat template does not render conversation prefixes "
                                "as text prefixes, so the assistant spans cannot be found")
            spans.append((len(before), len(through)))
        return text, spans

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
