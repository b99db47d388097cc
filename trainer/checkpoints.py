"""Checkpoints that are complete or invisible, and verified before they are read.

A checkpoint is written into `RUN_DIR/.staging/checkpoint-N`, every file and folder is fsync'ed, a
completeness marker (`visprune_checkpoint.json`, format `visprune-checkpoint/2`: the step and every file
with its size and sha256) is written last, and only then is the folder renamed to `RUN_DIR/checkpoint-N`
(one atomic rename on a POSIX file system). A crash at any moment leaves either the finished checkpoint or
a staging folder that nothing reads. `incomplete_reason` checks a folder against its marker (sizes first,
then every file's sha256) before resume, harden or `final/` read anything in it. Auto-resume takes the
newest checkpoint that verifies (a corrupted newer one is skipped, with the reason logged); keep-last-N
counts and deletes only verified checkpoints.

A `visprune-checkpoint/1` marker (written by an older visprune) records sizes only: such a checkpoint is
verified by its sizes alone, and a warning says so, so that runs started before the upgrade still resume.
Digests are cached per process by (device, inode, size, mtime), so one command reads each file once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from visprune.data_prep.files import fsync_dir, fsync_tree, write_atomic

logger = logging.getLogger(__name__)

MARKER_FILE = "visprune_checkpoint.json"
MARKER_FORMAT = "visprune-checkpoint/2"
SIZES_ONLY_FORMAT = "visprune-checkpoint/1"  # an older visprune's marker: file sizes, no digests
STAGING_DIR = ".staging"
HASH_CHUNK_BYTES = 4 << 20  # checkpoints are GBs: stream them
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_DIGESTS: dict[tuple[int, int, int, int], str] = {}  # (st_dev, st_ino, st_size, st_mtime_ns) -> sha256
_WARNED_SIZES_ONLY: set[str] = set()  # /1 checkpoints already reported in this process


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder and what is wrong."""


# ---- digests ---------------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in `HASH_CHUNK_BYTES` chunks; cached in this process while the file's
    inode, size and mtime stay the same (a rename keeps them: a staged checkpoint is hashed once)."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = _DIGESTS.get(key)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        buffer = bytearray(HASH_CHUNK_BYTES)
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


# ---- writing ---------------------------------------------------------------------------------------

def list_files(folder: str | os.PathLike) -> list[str]:
    """Every file below `folder` as a relative POSIX path, sorted, the marker excluded."""
    folder = Path(folder)
    return [path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != MARKER_FILE]


def file_records(folder: str | os.PathLike) -> dict[str, dict[str, int | str]]:
    """Every file below `folder` (relative POSIX path -> {"size", "sha256"}), the marker excluded."""
    folder = Path(folder)
    return {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
            for name in list_files(folder)}


def write_marker(folder: str | os.PathLike, step: int) -> Path:
    """Write the completeness marker of a fully written checkpoint folder (last, atomically): the step and
    every file's size and sha256."""
    folder = Path(folder)
    return write_atomic(folder / MARKER_FILE, json.dumps({"format": MARKER_FORMAT, "step": step,
                                                          "files": file_records(folder)}, indent=1))


def staging_folder(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / STAGING_DIR / f"checkpoint-{step}"


def clear_staging(run_dir: str | os.PathLike, step: int | None = None) -> None:
    """Remove what a crashed save left in the staging folder (one step's folder, or all of them)."""
    target = Path(run_dir) / STAGING_DIR
    if step is not None:
        target = target / f"checkpoint-{step}"
    if target.exists():
        logger.warning("removing %s, left by a save that did not finish", target)
        shutil.rmtree(target)


def publish(staging: str | os.PathLike, final: str | os.PathLike, step: int) -> Path:
    """Finish a save: fsync the staged folder, write the marker (hashing every file), rename it to `final`
    (a checkpoint-N or the run's final/ folder; an older folder of that name is replaced)."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    write_marker(staging, step)
    if final.exists():  # a second save of the same step (e.g. the last step of a run that saves every step)
        old = staging.parent / f"replaced-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    with contextlib.suppress(OSError):  # leave no empty .staging/ behind
        staging.parent.rmdir()
    return final


MODEL_FILES_SKIPPED = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state", "global_step", "latest",
                       "zero_to_fp32.py", MARKER_FILE)


def copy_model_files(checkpoint: str | os.PathLike, staging: str | os.PathLike) -> None:
    """The adapter (or model), gates, recipe and processor files of a checkpoint, without the optimizer,
    scheduler, RNG and DeepSpeed state (what `final/` holds)."""
    checkpoint, staging = Path(checkpoint), Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        if path.is_file() and not path.name.startswith(MODEL_FILES_SKIPPED):
            shutil.copy2(path, staging / path.name)


# ---- reading ---------------------------------------------------------------------------------------

def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete, intact checkpoint (None when it is).

    Checks, in this order: the marker exists and parses; every file it lists is there with its size (cheap:
    catches a truncated copy without reading GBs); every file's sha256 matches (a flipped byte, a file edited
    or replaced after the save). A `visprune-checkpoint/1` marker is checked by sizes only (logged).
    """
    folder = Path(folder)
    marker = folder / MARKER_FILE
    if not folder.is_dir():
        return "no such folder"
    if not marker.is_file():
        return f"no {MARKER_FILE} (the save did not finish, or it is not a visprune checkpoint)"
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        files, marker_format = data["files"], data.get("format")
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable {MARKER_FILE}: {exc}"
    if marker_format not in (MARKER_FORMAT, SIZES_ONLY_FORMAT):
        return f"{MARKER_FILE} has format {marker_format!r}, expected {MARKER_FORMAT!r}"
    try:
        records = {name: _record(entry, marker_format) for name, entry in files.items()}
    except (TypeError, ValueError, KeyError) as exc:
        return f"unreadable {MARKER_FILE}: {exc}"
    for name, (size, _) in records.items():
        path = folder / name
        if not _inside(folder, path):
            return f"{MARKER_FILE} lists {name!r}, which is not inside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker records {size}"
    if marker_format == SIZES_ONLY_FORMAT:
        if str(folder) not in _WARNED_SIZES_ONLY:
            _WARNED_SIZES_ONLY.add(str(folder))
            logger.warning("%s was written by an older visprune (%s: sizes only): its files' sizes match, "
                           "their contents cannot be verified", folder, SIZES_ONLY_FORMAT)
        return None
    for name, (_, sha256) in records.items():
        if file_sha256(folder / name) != sha256:
            return (f"{name} does not match its sha256 in {MARKER_FILE} (changed after the save: a corrupted "
                    "disk or copy, or an edit)")
    return None


def _record(entry: object, marker_format: str) -> tuple[int, str | None]:
    """(size, sha256) of one marker entry; /1 markers hold the size alone."""
    if marker_format == SIZES_ONLY_FORMAT:
        if not isinstance(entry, int):
            raise TypeError(f"a size must be an integer, got {entry!r}")
        return entry, None
    size, sha256 = entry["size"], entry["sha256"]  # type: ignore[index]
    if not isinstance(size, int) or not isinstance(sha256, str):
        raise TypeError(f"a file entry must hold an integer size and a sha256 string, got {entry!r}")
    return size, sha256


def _inside(folder: Path, path: Path) -> bool:
    """A marker entry names a file inside its folder (never `../` or an absolute path)."""
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """N for a folder named `checkpoint-N`, else None."""
    match = _CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder of the run folder, oldest first (complete or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(checkpoint_step(path), path) for path in run_dir.iterdir() if path.is_dir()]
    return sorted((step, path) for step, path in found if step is not None)


def complete_checkpoints(run_dir: str | os.PathLike, warn: bool = False) -> list[Path]:
    """The complete, verified checkpoints, oldest first; the others are skipped (with a warning if `warn`).
    Reads every checkpoint: `latest_complete` stops at the newest one that verifies."""
    out = []
    for _, path in checkpoints(run_dir):
        reason = incomplete_reason(path)
        if reason is None:
            out.append(path)
        elif warn:
            logger.warning("ignoring %s: %s", path, reason)
    return out


def latest_complete(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is logged with its reason."""
    skipped = []
    for _, path in reversed(checkpoints(run_dir)):
        reason = incomplete_reason(path)
        if reason is None:
            if skipped:
                logger.warning("falling back to %s, the newest complete checkpoint", path)
            return path
        logger.warning("ignoring %s: %s", path, reason)
        skipped.append(path)
    return None


def rotate(run_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete the oldest verified checkpoints beyond the newest `keep` verified ones; checkpoints that do not
    verify are neither counted nor touched. Returns the deleted folders."""
    if keep is None or keep <= 0:
        return []
    found = complete_checkpoints(run_dir)
    doomed = found[:-keep] if len(found) > keep else []
    for path in doomed:
        logger.info("deleting %s (output.save_total_limit=%d)", path, keep)
        shutil.rmtree(path)
    return doomed


# ---- loading without pickle code execution -------------------------------------------------------------

def _deepspeed_safe_globals() -> list:
    """The only non-tensor classes a DeepSpeed ZeRO-2/3 checkpoint pickles (found by loading ours)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def deepspeed_weights_only() -> Iterator[None]:
    """Make DeepSpeed's checkpoint engine load with `torch.load(weights_only=True)` (it passes
    weights_only=False, which runs any pickled code in a checkpoint someone handed you). Only tensors,
    containers and DeepSpeed's own loss-scaler / ZeRO-stage / fragment-address classes are accepted."""
    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:
        yield
        return
    import torch

    original = TorchCheckpointEngine.load

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


__all__ = ["MARKER_FILE", "MARKER_FORMAT", "STAGING_DIR", "CheckpointError", "checkpoint_step", "checkpoints",
           "clear_staging", "complete_checkpoints", "copy_model_files", "deepspeed_weights_only", "file_records",
           "file_sha256", "incomplete_reason", "latest_complete", "list_files", "publish", "rotate",
           "staging_folder", "write_marker"]
