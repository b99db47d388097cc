"""Checkpoints that are complete or invisible.

A checkpoint is written into `RUN_DIR/.staging/checkpoint-N`, every file and folder is fsync'ed, a
completeness marker (`visprune_checkpoint.json`: the step and every file with its size) is written
last, and only then is the folder renamed to `RUN_DIR/checkpoint-N` (one atomic rename on a POSIX file
system). A crash at any moment leaves either the finished checkpoint or a staging folder that nothing
reads. Auto-resume takes the newest checkpoint whose marker matches its files; keep-last-N counts only
such checkpoints.
"""

from __future__ import annotations

import contextlib
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
MARKER_FORMAT = "visprune-checkpoint/1"
STAGING_DIR = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder and what is wrong."""


# ---- writing ---------------------------------------------------------------------------------------

def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """Every file below `folder` (relative POSIX path -> size in bytes), the marker excluded."""
    folder = Path(folder)
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MARKER_FILE:
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return sizes


def write_marker(folder: str | os.PathLike, step: int) -> Path:
    """Write the completeness marker of a fully written checkpoint folder (last, atomically)."""
    folder = Path(folder)
    return write_atomic(folder / MARKER_FILE, json.dumps({"format": MARKER_FORMAT, "step": step,
                                                          "files": file_sizes(folder)}, indent=1))


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
    """Finish a save: fsync the staged folder, write the marker, rename it to `final` (a checkpoint-N or
    the run's final/ folder; an older folder of that name is replaced)."""
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
    """Why `folder` is not a complete checkpoint (None when it is): no marker, or a file that is missing
    or has another size than the marker records."""
    folder = Path(folder)
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} (the save did not finish, or an older visprune wrote it)"
    try:
        data = json.loads(marker.read_text())
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MARKER_FILE}: {exc}"
    if data.get("format") != MARKER_FORMAT:
        return f"{MARKER_FILE} has format {data.get('format')!r}, expected {MARKER_FORMAT!r}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker records {size}"
    return None


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
    """The complete checkpoints, oldest first; incomplete ones are skipped (with a warning if `warn`)."""
    out = []
    for _, path in checkpoints(run_dir):
        reason = incomplete_reason(path)
        if reason is None:
            out.append(path)
        elif warn:
            logger.warning("ignoring %s: %s", path, reason)
    return out


def latest_complete(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir, warn=True)
    return found[-1] if found else None


def rotate(run_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep`; incomplete ones are neither
    counted nor touched. Returns the deleted folders."""
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


__all__ = ["MARKER_FILE", "STAGING_DIR", "CheckpointError", "checkpoint_step", "checkpoints", "clear_staging",
           "complete_checkpoints", "copy_model_files", "deepspeed_weights_only",
           "incomplete_reason", "latest_complete", "publish", "rotate", "staging_folder",
           "write_marker"]
