"""Prepared datasets (`visprune data prepare` folders): the manifest, memory-mapped loading, and the
fingerprint of the processor and chat template that made the token ids, so a run never trains on
tokens its own processor and template would not have produced."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

from .records import COLUMNS, DataError
from .templates import ChatTemplate

logger = logging.getLogger(__name__)

# a folder written by `visprune data prepare`: the `datasets` folder plus this manifest, written last
MANIFEST_FILE = "visprune_data.json"
PREPARED_FORMAT = "visprune-data/2"  # 2: the fingerprint covers the chat template actually used
PREPARED_COLUMNS = ("input_ids", "labels", "length")  # beside the records' COLUMNS


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
    missing = [column for column in (*COLUMNS, *PREPARED_COLUMNS) if column not in dataset.column_names]
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


def processor_fingerprint(processor: Any, template: ChatTemplate) -> dict[str, Any]:
    """What decides a prepared dataset's token ids and label masks: the processor class, the chat template
    actually used (`template`: its name and everything it renders with), the tokenizer's vocabulary, the
    image token (and the text each `<image>` becomes) and the image processor's settings (which decide
    how many tokens an image takes); `fingerprint` hashes them all."""
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
        "template": template.name,
        "template_sha256": template.sha256,
        "vocab_size": len(tokenizer),
        "vocab_sha256": sha(vocab),
        "image_token_id": getattr(processor, "image_token_id", None),
        "image_text": template.image_text,
        "image_processor_sha256": sha(image_config),
    }
    return {**parts, "fingerprint": sha(parts)}


_FINGERPRINT_NAMES = {"class": "processor class", "template": "chat template name",
                      "template_sha256": "chat template",
                      "vocab_size": "tokenizer vocabulary size", "vocab_sha256": "tokenizer vocabulary",
                      "image_token_id": "image token id", "image_text": "text of an <image>",
                      "image_processor_sha256": "image processor settings"}


def check_prepared_matches(prepared: str | os.PathLike | dict, processor: Any, template: ChatTemplate,
                           max_length: int, image_folder: str | os.PathLike | None,
                           drop_overlong: bool = False) -> dict[str, Any]:
    """Refuse a prepared dataset (folder, manifest file or manifest dict) that the training run would not
    have produced itself: another processor or chat template (class, the template actually used,
    vocabulary, image token, text of an `<image>`, image processor settings), samples longer than the
    run's `max_length` (unless `drop_overlong`: they are dropped by the collator and counted), or another
    image folder. Returns the manifest.

    Raises:
        DataError: naming every mismatch and what to do.
    """
    manifest = prepared if isinstance(prepared, dict) else read_manifest(prepared)
    name = "the prepared dataset" if isinstance(prepared, dict) else str(prepared)
    problems = []
    stored, current = manifest.get("processor", {}), processor_fingerprint(processor, template)
    if stored.get("fingerprint") != current["fingerprint"]:
        differ = [label for key, label in _FINGERPRINT_NAMES.items() if stored.get(key) != current[key]]
        problems.append(f"it was prepared with another processor or chat template ({', '.join(differ) or 'fingerprint'} "
                        f"differ: prepared with {stored.get('class')} and template {stored.get('template')!r}, this run "
                        f"has {current['class']} and {current['template']!r})")
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
                        "processor, the recipe's data.template, max_length and image folder)")
    return manifest
