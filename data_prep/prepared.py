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

from .records import COLUMNS, DataError, read_json
from .templates import ChatTemplate

logger = logging.getLogger(__name__)

# a folder written by `visprune data prepare`: the `datasets` folder plus this manifest, written last
MANIFEST_FILE = "visprune_data.json"
PREPARED_FORMAT = "visprune-data/2"  # 2: the fingerprint covers the chat template actually used
PREPARED_COLUMNS = ("input_ids", "labels", "length")  # beside the records' COLUMNS


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared folder (or the manifest file itself), its format and the fields visprune
    relies on checked (`check_manifest`).

    Raises:
        DataError: no manifest (an incomplete conversion, or not a prepared folder), another format, or a
            manifest that is not one `visprune data prepare` writes (edited or damaged).
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    if not manifest_path.is_file():
        raise DataError(f"{path} has no {MANIFEST_FILE}: not a folder written by `visprune data prepare`, or an "
                        "incomplete one (the manifest is written last); prepare the data again")
    manifest = read_json(manifest_path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{manifest_path}: format {found!r}, this visprune reads {PREPARED_FORMAT!r}; "
                        "prepare the data again")
    check_manifest(manifest, manifest_path)
    return manifest


def check_manifest(manifest: dict[str, Any], where: str | os.PathLike) -> None:
    """Refuse a manifest whose counts, lengths, columns or settings are not what a conversion writes: the
    types, and counts that add up (ok + rejected = samples, with_images <= ok, lengths within max_length).

    Raises:
        DataError: naming the first field that is wrong.
    """
    def natural(value: Any, low: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    counts, lengths, columns = manifest.get("counts"), manifest.get("lengths"), manifest.get("columns")
    problem = None
    if not natural(manifest.get("max_length"), 1):
        problem = "max_length is not a whole number >= 1"
    elif "max_image_pixels" in manifest and not natural(manifest["max_image_pixels"], 1):
        problem = "max_image_pixels is not a whole number >= 1"
    elif not natural(manifest.get("num_shards"), 1):
        problem = "num_shards is not a whole number >= 1"
    elif not isinstance(counts, dict) or not all(natural(counts.get(key)) for key in
                                                 ("samples", "ok", "rejected", "with_images")):
        problem = "counts must hold whole numbers samples, ok, rejected and with_images"
    elif counts["ok"] + counts["rejected"] != counts["samples"] or counts["with_images"] > counts["ok"] \
            or counts["ok"] < 1:
        problem = f"counts do not add up (ok {counts['ok']} + rejected {counts['rejected']} vs samples " \
                  f"{counts['samples']}, with_images {counts['with_images']})"
    elif not isinstance(lengths, dict) or not all(natural(lengths.get(key), 1) for key in ("min", "max")) \
            or not lengths["min"] <= lengths["max"] <= manifest["max_length"]:
        problem = "lengths must hold whole numbers 1 <= min <= max <= max_length"
    elif not isinstance(columns, list) or not all(isinstance(column, str) for column in columns):
        problem = "columns must be a list of column names"
    elif not (manifest.get("image_folder") is None or isinstance(manifest.get("image_folder"), str)):
        problem = "image_folder must be a path or null"
    elif not isinstance(manifest.get("processor"), dict) or not isinstance(manifest.get("template"), dict):
        problem = "processor and template must be objects"
    if problem:
        raise DataError(f"{where}: {problem}; the manifest was edited or damaged: prepare the data again")


def load_prepared(path: str | os.PathLike) -> Dataset:
    """A prepared folder as a memory-mapped Dataset (`datasets.load_from_disk`), checked against its
    manifest: the columns, the number of shards and rows, the longest and shortest sample.

    Raises:
        DataError: the folder is not a complete prepared dataset, or its files and manifest disagree.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import load_from_disk

    path = Path(path)
    manifest = read_manifest(path)
    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError, pa.ArrowException) as exc:  # FileNotFoundError is an OSError
        raise DataError(f"{path}: cannot load the prepared dataset: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                        "prepare the data again") from exc
    missing = [column for column in (*COLUMNS, *PREPARED_COLUMNS) if column not in dataset.column_names]
    if missing:
        raise DataError(f"{path}: the prepared dataset lacks the columns {missing}")
    problems = []
    if list(dataset.column_names) != manifest["columns"]:
        problems.append(f"columns {dataset.column_names} but the manifest says {manifest['columns']}")
    if len(dataset.cache_files) != manifest["num_shards"]:
        problems.append(f"{len(dataset.cache_files)} shards but the manifest says {manifest['num_shards']}")
    if len(dataset) != manifest["counts"]["ok"]:
        problems.append(f"{len(dataset)} rows but the manifest says {manifest['counts']['ok']}")
    elif len(dataset):
        span = pc.min_max(dataset.data.column("length"))
        stored = {"min": span["min"].as_py(), "max": span["max"].as_py()}
        if stored != {key: manifest["lengths"][key] for key in ("min", "max")}:
            problems.append(f"lengths {stored['min']}-{stored['max']} but the manifest says "
                            f"{manifest['lengths']['min']}-{manifest['lengths']['max']}")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems) + "; the folder was changed since `visprune data prepare`: "
                        "prepare the data again")
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
                           drop_overlong: bool = False, max_image_pixels: int | None = None) -> dict[str, Any]:
    """Refuse a prepared dataset (folder, manifest file or manifest dict) that the training run would not
    have produced itself: another processor or chat template (class, the template actually used,
    vocabulary, image token, text of an `<image>`, image processor settings), samples longer than the
    run's `max_length` (unless `drop_overlong`: they are dropped by the collator and counted), another
    image folder, or images allowed up to more pixels than the run's `max_image_pixels` (when given; the
    collator would refuse them mid-run). Returns the manifest.

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
    prepared_pixels = manifest.get("max_image_pixels")
    if max_image_pixels is not None and manifest.get("counts", {}).get("with_images", 0) \
            and prepared_pixels is not None and prepared_pixels > max_image_pixels:
        problems.append(f"its images were checked up to {prepared_pixels} pixels but "
                        f"data.max_image_pixels is {max_image_pixels}; prepare again with --max-image-pixels "
                        f"{max_image_pixels}")
    if problems:
        raise DataError(f"{name}: " + "; ".join(problems) + " (run `visprune data prepare` with this model's "
                        "processor, the recipe's data.template, max_length and image folder)")
    return manifest
