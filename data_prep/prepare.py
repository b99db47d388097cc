"""`visprune data prepare`: convert a LLaVA-format JSON + image folder into a training-ready `datasets`
folder, judging every sample with the pre-flight scan (`check.Judge`, the collator's own code) and
keeping what the collator computed for the good ones: token ids, label masks and lengths (image tokens
included), so training groups by length and never meets a bad sample.

The JSON is streamed (a few MB in memory at a time) in chunks to `num_proc` worker processes, each with
its own processor, collator and cache of image verdicts; the main process writes their Arrow tables in
input order, then `save_to_disk` shards them. Everything is written into `DIR.tmp-XXXX`; the manifest
`visprune_data.json` is written last (fsync + atomic rename) and the folder renamed to DIR, so a folder
without a manifest is an incomplete conversion.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Features, List, Value

from .check import REJECTED_FILE, CheckReport, Judge, write_rejected
from .collator import TOKEN_KEYS, ChatCollator, check_positive
from .files import fsync_dir, fsync_tree, write_atomic
from .images import MAX_IMAGE_PIXELS
from .prepared import MANIFEST_FILE, PREPARED_FORMAT, processor_fingerprint
from .processing import load_processor
from .records import DataError, check_regular_file, features, iter_records, quote, read_json, row_videos
from .templates import ChatTemplate, resolve_for_folder

logger = logging.getLogger(__name__)

SHARD_SIZE = 50_000  # rows per output shard (at least num_proc shards)
CHUNK_SIZE = 64  # records per task sent to a worker (and per processor call)
# what a prepared folder holds: the manifest, `save_to_disk`'s shards, dataset_info.json and state.json, and
# rejected.jsonl; `--overwrite` replaces a folder of these files only
PREPARED_FILES = {MANIFEST_FILE, "dataset_info.json", "state.json", REJECTED_FILE}
SHARD_NAME = re.compile(r"data-\d{5}-of-\d{5}\.arrow")


@dataclass
class PrepareReport:
    """`check`: the scan's verdicts (as `visprune data check` reports them); `out_dir` is None when bad
    samples stopped the conversion (no `skip_bad`)."""

    check: CheckReport
    out_dir: Path | None = None
    manifest: dict[str, Any] | None = None
    rejected_path: Path | None = None
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


def prepared_features(token_keys: tuple[str, ...] = ()) -> Features:
    """The columns of a prepared dataset: the records' `id`, `images`, `conversations`, `videos`, then `input_ids`,
    `labels` (list[int32], labels IGNORE_INDEX where not supervised), `length` (int32) and the
    processor's per-token columns (`mm_token_type_ids`: list[int8])."""
    columns = dict(features())
    columns.update({"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32")})
    columns.update({key: List(Value("int8")) for key in token_keys})
    return Features(columns)


# ---- workers ---------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _load_processor(spec: Any, trust_remote_code: bool) -> Any:
    if isinstance(spec, (str, os.PathLike)):
        return load_processor(spec, trust_remote_code=trust_remote_code)
    return spec


def _init_pool_worker(*args: Any) -> None:
    """A worker process: one torch thread (two workers on two cores), then `_init_worker`."""
    import torch

    torch.set_num_threads(1)
    _init_worker(*args)


def _init_worker(processor: Any, image_folder: str | None, max_length: int, template: ChatTemplate,
                 token_keys: tuple[str, ...], trust_remote_code: bool, max_image_pixels: int) -> None:
    """Once per worker process: its own processor (loaded from the folder, or unpickled) and judge."""
    _WORKER["judge"] = Judge(image_folder, _load_processor(processor, trust_remote_code), template,
                             max_length=max_length, max_image_pixels=max_image_pixels)
    _WORKER["token_keys"] = token_keys
    _WORKER["features"] = prepared_features(token_keys)


def _run_chunk(start: int, records: list[Any]) -> tuple[pa.Table | None, list[dict], np.ndarray]:
    """Judge `records` (input indices from `start`): (Arrow table of the good ones in order, rejects,
    their lengths)."""
    judge, token_keys = _WORKER["judge"], _WORKER["token_keys"]
    good, rejected = [], []
    for ok, reject in judge.judge_many(start, records):
        if reject:
            rejected.append(reject)
        else:
            good.append(ok)
    lengths = np.array([sample["input_ids"].numel() for _, sample in good], dtype=np.int32)
    if not good:
        return None, rejected, lengths
    return _to_table(good, lengths, token_keys, _WORKER["features"]), rejected, lengths


def _to_table(good: list[tuple[dict, dict]], lengths: np.ndarray, token_keys: tuple[str, ...],
              features: Features) -> pa.Table:
    import torch

    schema = features.arrow_schema
    extra = [key for key in TOKEN_KEYS if key in good[0][1] and key not in token_keys]
    if extra or any(key not in sample for key in token_keys for _, sample in good):
        raise RuntimeError(f"the processor returned per-token columns {extra or 'inconsistently'} that the "
                           f"dataset schema ({list(token_keys)}) lacks")
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))

    def tokens(key: str, dtype: Any) -> pa.Array:
        values = torch.cat([sample[key].reshape(-1) for _, sample in good]).numpy().astype(dtype)
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    columns = {
        "id": pa.array([row["id"] for row, _ in good], type=schema.field("id").type),
        "images": pa.array([row["images"] for row, _ in good], type=schema.field("images").type),
        "conversations": pa.array([row["conversations"] for row, _ in good], type=schema.field("conversations").type),
        "videos": pa.array([row_videos(row) for row, _ in good], type=schema.field("videos").type),
        "input_ids": tokens("input_ids", np.int32),
        "labels": tokens("labels", np.int32),
        "length": pa.array(lengths),
    }
    columns.update({key: tokens(key, np.int8) for key in token_keys})
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


# ---- the conversion ----------------------------------------------------------------------------------------

def _chunks(path: Path, digest: Any, size: int) -> Iterator[tuple[int, list[Any], int]]:
    """(index of the first record, records, bytes of the file read so far)."""
    chunk, start, done = [], 0, 0
    for record, done in iter_records(path, digest):
        chunk.append(record)
        if len(chunk) == size:
            yield start, chunk, done
            start, chunk = start + size, []
    if chunk:
        yield start, chunk, done


def _worker_context() -> Any:
    """Workers are forked from a fresh server process that has only imported torch and transformers
    ("forkserver"; once, not once per worker as with "spawn"), never from this process: a fork of a
    process running tokenizers / tqdm / OpenMP threads can deadlock. Like "spawn", it needs a script's
    work under `if __name__ == "__main__":`. Spawn where there is no forkserver."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["visprune.data_prep.prepare", "transformers.processing_utils",
                                    "transformers.image_processing_utils", "transformers.tokenization_utils_tokenizers"])
    return context


def _results(chunks: Iterator, num_proc: int, init_args: tuple) -> Iterator[tuple[tuple, int, int]]:
    """((table, rejects, lengths), records in the chunk, bytes read) per chunk, in input order; with
    `num_proc` > 1 at most 2 * num_proc + 2 chunks are in flight, so memory stays bounded."""
    if num_proc == 1:
        _init_worker(*init_args)
        try:
            for start, records, done in chunks:
                yield _run_chunk(start, records), len(records), done
        finally:
            _WORKER.clear()
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=num_proc, mp_context=_worker_context(),
                             initializer=_init_pool_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        try:
            for start, records, done in chunks:
                pending.append((pool.submit(_run_chunk, start, records), len(records), done))
                while len(pending) > 2 * num_proc + 1:
                    future, count, read = pending.popleft()
                    yield future.result(), count, read
            while pending:
                future, count, read = pending.popleft()
                yield future.result(), count, read
        finally:
            for future, _, _ in pending:
                future.cancel()


def check_output_dir(out_dir: Path, overwrite: bool, json_path: Path | None = None,
                     image_root: Path | None = None) -> None:
    """Refuse an output folder that could lose a file that `visprune data prepare` did not write.

    `out_dir` may not be or contain the data file's folder, nor be, contain or lie inside the image folder.
    A non-empty `out_dir` is refused unless `overwrite`, and even then unless it is a prepared folder: a
    visprune manifest and only the files a conversion writes (`PREPARED_FILES`, `data-NNNNN-of-NNNNN.arrow`).

    Raises:
        DataError: naming the folder and, for a foreign folder, one entry that is not ours.
    """
    out = os.path.realpath(out_dir)
    if json_path is not None:
        for data_dir in {os.path.realpath(json_path.parent), os.path.dirname(os.path.realpath(json_path))}:
            if _is_within(data_dir, out):
                raise DataError(f"output folder {out_dir} is or contains the folder of the data file {json_path}; "
                                "choose an output folder outside it")
    if image_root is not None:
        images = os.path.realpath(image_root)
        if _is_within(images, out) or _is_within(out, images):
            raise DataError(f"output folder {out_dir} is, contains or is inside the image folder {image_root}; "
                            "choose an output folder outside it")
    existing = next(path for path in (out_dir, *out_dir.parents) if os.path.lexists(path) or path == path.parent)
    if existing != out_dir:
        if existing.exists() and not existing.is_dir():
            raise DataError(f"output folder {out_dir} cannot be made: {existing} is not a folder")
        return
    if not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a folder")
    entries = sorted(out_dir.iterdir())
    if not entries:
        return
    if not overwrite:
        raise DataError(f"output folder {out_dir} exists and is not empty (--overwrite replaces a prepared folder)")
    try:
        manifest = read_json(out_dir / MANIFEST_FILE, "manifest")
    except DataError:
        manifest = None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("visprune-data/"):
        raise DataError(f"output folder {out_dir} is not a prepared dataset (no {MANIFEST_FILE} written by visprune): "
                        "refusing to replace it, even with --overwrite")
    for entry in entries:
        ours = entry.name in PREPARED_FILES or SHARD_NAME.fullmatch(entry.name)
        if not ours or not stat.S_ISREG(entry.lstat().st_mode):
            raise DataError(f"output folder {out_dir} holds {quote(entry.name, 100)}, which `visprune data prepare` "
                            "does not write: refusing to replace the folder, even with --overwrite")


def _is_within(path: str, folder: str) -> bool:
    """Whether the real path `path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def prepare_dataset(json_path: str | os.PathLike, image_root: str | os.PathLike | None, out_dir: str | os.PathLike,
                    processor: Any, max_length: int = 2048, num_proc: int | None = None, skip_bad: bool = False,
                    progress: bool = True, overwrite: bool = False, template: str | ChatTemplate = "auto",
                    family: str | None = None, trust_remote_code: bool = False, shard_size: int = SHARD_SIZE,
                    chunk_size: int = CHUNK_SIZE, max_image_pixels: int = MAX_IMAGE_PIXELS) -> PrepareReport:
    """Convert `json_path` (a LLaVA `.json` list or `.jsonl`) with images under `image_root` into the
    prepared folder `out_dir` (see the module docstring and `prepared_features` for the columns).

    `processor`: a processor or model folder (each worker loads it; `trust_remote_code` applies) or a
    processor object (pickled to the workers). `template`: the chat template (a `ChatTemplate`, or a
    `data.template` choice resolved with `family` or the folder's config.json and generation config, as
    the trainer resolves it); it is part of the manifest's fingerprint. Bad samples
    (the `visprune data check` reasons) stop the conversion: the report lists them and nothing is written;
    with `skip_bad` they go to `out_dir/rejected.jsonl` and the rest is converted. `num_proc` defaults to
    min(2, CPUs); the output does not depend on it. Images over `max_image_pixels` pixels are rejected
    (`image_too_large`) from their header; the manifest records the limit.

    Raises:
        ValueError: `max_length`, `max_image_pixels`, `num_proc`, `shard_size` or `chunk_size` < 1.
        DataError: unreadable JSON, a missing image folder, an output folder that is refused
            (`check_output_dir`), no good sample.
    """
    began = time.perf_counter()
    json_path, out_dir = Path(json_path), Path(out_dir)
    num_proc = num_proc or min(2, os.cpu_count() or 1)
    for name, value in (("max_length", max_length), ("max_image_pixels", max_image_pixels), ("num_proc", num_proc),
                        ("shard_size", shard_size), ("chunk_size", chunk_size)):
        check_positive(name, value)
    check_regular_file(json_path)
    if image_root is not None and not Path(image_root).is_dir():
        raise DataError(f"image folder {image_root} is not a folder")
    check_output_dir(out_dir, overwrite, json_path, None if image_root is None else Path(image_root))

    loaded = _load_processor(processor, trust_remote_code)
    processor_dir = processor if isinstance(processor, (str, os.PathLike)) else None
    if not isinstance(template, ChatTemplate):
        family, template = resolve_for_folder(loaded, processor_dir, template, family)
    fingerprint = processor_fingerprint(loaded, template)
    token_keys = _probe_token_keys(loaded, max_length, template)
    folder = None if image_root is None else os.path.realpath(image_root)
    # a folder is sent to the workers as its path (they load it), an object pickled
    init_args = (str(processor) if processor_dir is not None else loaded, folder, max_length, template,
                 token_keys, trust_remote_code, max_image_pixels)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp_dir.chmod(0o777 & ~umask)  # as mkdir would make it (mkdtemp's is private), so others can train on it
    try:
        report = _convert(json_path, tmp_dir, init_args, token_keys, num_proc, chunk_size, progress)
        report.check.rejected.sort(key=lambda item: item["index"])
        if report.check.rejected and not skip_bad:
            shutil.rmtree(tmp_dir)
            report.seconds = time.perf_counter() - began
            return report
        if not report.check.num_ok:
            raise DataError(f"{json_path}: no usable sample ({report.check.num_samples} samples, all rejected)")
        num_shards = _save_shards(tmp_dir, num_proc, shard_size, report.check.num_ok, progress)
        if report.check.rejected:
            write_rejected(report.check, tmp_dir)
        manifest = _manifest(json_path, folder, max_length, max_image_pixels, family, fingerprint, template,
                             processor_dir, token_keys, num_shards, report, time.perf_counter() - began)
        fsync_tree(tmp_dir)
        write_atomic(tmp_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
        _move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    report.out_dir, report.manifest = out_dir, manifest
    report.rejected_path = out_dir / REJECTED_FILE if report.check.rejected else None
    report.seconds = time.perf_counter() - began
    logger.info("%s: %d of %d samples prepared in %.1f s (%.0f samples/s), %d rejected", out_dir,
                report.check.num_ok, report.check.num_samples, report.seconds,
                report.check.num_samples / max(report.seconds, 1e-9), len(report.check.rejected))
    return report


def _probe_token_keys(processor: Any, max_length: int, template: ChatTemplate) -> tuple[str, ...]:
    """The per-token columns (`mm_token_type_ids`) the processor returns, from a text-only probe."""
    collator = ChatCollator(processor, template, max_length=max_length)
    probe = {"id": "probe", "images": [], "conversations": [{"from": "human", "value": "hi"},
                                                            {"from": "gpt", "value": "hi"}]}
    try:
        sample = collator.encode(probe)
    except DataError:  # a template that rejects the probe rejects the data too, and says so per sample
        return ()
    return tuple(key for key in TOKEN_KEYS if key in sample)


def _convert(json_path: Path, tmp_dir: Path, init_args: tuple, token_keys: tuple[str, ...], num_proc: int,
             chunk_size: int, progress: bool) -> PrepareReport:
    """Stream, judge and write every good sample to `tmp_dir/_work/encoded.arrow` in input order."""
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    work = tmp_dir / "_work"
    work.mkdir()
    digest = hashlib.sha256()
    report = PrepareReport(check=CheckReport())
    lengths, with_images, image_refs = [], 0, 0
    writer = ArrowWriter(features=prepared_features(token_keys), path=str(work / "encoded.arrow"))
    total = json_path.stat().st_size
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
        for (table, rejected, chunk_lengths), count, done in _results(_chunks(json_path, digest, chunk_size),
                                                                      num_proc, init_args):
            report.check.num_samples += count
            report.check.num_ok += len(chunk_lengths)
            report.check.rejected.extend(rejected)
            if table is not None:
                writer.write_table(table)
                counts = pc.list_value_length(table.column("images"))
                with_images += int(pc.sum(pc.greater(counts, 0)).as_py() or 0)
                image_refs += int(pc.sum(counts).as_py() or 0)
            lengths.append(chunk_lengths)
            bar.update(done - bar.n)
            bar.set_postfix(samples=report.check.num_samples, bad=len(report.check.rejected), refresh=False)
        bar.update(total - bar.n)
    writer.finalize()
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    report.stats = {"lengths": lengths, "with_images": with_images, "image_refs": image_refs,
                    "source_size": total, "source_sha256": digest.hexdigest()}
    return report


def _save_shards(tmp_dir: Path, num_proc: int, shard_size: int, num_rows: int, progress: bool) -> int:
    """`save_to_disk` the encoded rows into `tmp_dir` as max(num_proc, rows / shard_size) shards."""
    import datasets
    from datasets import Dataset

    num_shards = min(num_rows, max(num_proc, -(-num_rows // shard_size)))
    encoded = tmp_dir / "_work" / "encoded.arrow"
    enabled = not datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        dataset = Dataset.from_file(str(encoded))
        dataset.save_to_disk(str(tmp_dir), num_shards=num_shards)
        del dataset
    finally:
        if enabled:
            datasets.enable_progress_bars()
    shutil.rmtree(tmp_dir / "_work")
    return num_shards


def _manifest(json_path: Path, folder: str | None, max_length: int, max_image_pixels: int, family: str | None,
              fingerprint: dict, template: ChatTemplate, processor_dir: Any, token_keys: tuple[str, ...],
              num_shards: int, report: PrepareReport, seconds: float) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    stats, check = report.stats, report.check
    lengths = stats["lengths"]
    quantiles = {f"p{q}": int(np.percentile(lengths, q, method="higher")) for q in (50, 90, 99)}
    return {
        "format": PREPARED_FORMAT,
        "source": {"path": str(json_path.resolve()), "size": stats["source_size"], "sha256": stats["source_sha256"]},
        "image_folder": folder,
        "max_length": max_length,
        "max_image_pixels": max_image_pixels,
        "family": family,
        "processor": {**fingerprint, "path": None if processor_dir is None else os.path.realpath(processor_dir)},
        "template": {"name": template.name, "requested": template.requested, "reason": template.reason,
                     "end_of_turn": list(template.end_of_turn), "sha256": template.sha256},
        "columns": list(prepared_features(token_keys)),
        "num_shards": num_shards,
        "counts": {"samples": check.num_samples, "ok": check.num_ok, "rejected": len(check.rejected),
                   "with_images": stats["with_images"], "text_only": check.num_ok - stats["with_images"],
                   "image_refs": stats["image_refs"], "rejected_by_reason": check.counts},
        "lengths": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 2),
                    **quantiles, "tokens": int(lengths.sum(dtype=np.int64))},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "versions": {name: package(name) for name in ("visprune", "transformers", "tokenizers", "datasets")},
    }


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename the finished `tmp_dir` to `out_dir`; an empty `out_dir` is replaced, a prepared one (already
    allowed by `check_output_dir`) is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        else:
            out_dir.rmdir()
    os.replace(tmp_dir, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)


__all__ = ["CHUNK_SIZE", "SHARD_SIZE", "PrepareReport", "check_output_dir", "prepare_dataset",
           "prepared_features"]
