"""A run folder holds one run: the recipe it records, what visprune writes in it, a folder made by another
recipe or holding foreign files refused, and cleared only when asked (`--resume never --overwrite`)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.files import fsync_dir

from . import checkpoints as ckpt
from .config import Recipe, RecipeError, first_line, load_recipe, read_recipe_mapping, recipe_to_dict

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
FINAL_DIR = "final"  # RUN_DIR/final: the adapter (or model), gates and recipe after the last step
PLAN_CHOICE_FILE = "plan_select.json"  # plan_select: the plan chosen and trained fixed, what was tried
PLAN_CHOICE_MAX_BYTES = 16 << 20  # the largest plan_select.json resume and harden read
STATE_FILE = "visprune_state.json"  # skipped-step counters, beside trainer_state.json


TENSORBOARD_DIR = "tensorboard"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
# Recipe keys a run folder's runs may differ in: where the folder is, how often it saves, keeps and logs,
# data-loading processes, activation checkpointing (recomputed, same numbers), how many non-finite steps in a
# row stop it, and train.max_steps (to train longer; the learning-rate schedule follows the new value). Every
# other key changes what the run computes.
NON_RESULT_KEYS = frozenset({"output.dir", "output.save_steps", "output.save_total_limit", "output.heatmap_steps",
                             "train.logging_steps", "train.max_steps", "train.stop_after_nonfinite",
                             "train.gradient_checkpointing", "data.num_workers"})
PATH_KEYS = frozenset({"model.path", "data.path", "data.image_folder", "plan", "plan_select.data"})  # equal when they name one file


class RunFolderError(RecipeError):
    """A run folder this run must not write into (a run of another recipe, two runs mixed, files visprune did
    not write); the message names the folder and what to do instead."""


def recipe_differences(recorded: Any, current: Any, key: str = "") -> list[str]:
    """The dotted keys (with both values) in which two recipes (`recipe_to_dict`) differ, `NON_RESULT_KEYS`
    left out; two paths are equal when they name the same file."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        names = list(recorded) + [name for name in current if name not in recorded]
        return [diff for name in names
                for diff in recipe_differences(recorded.get(name), current.get(name), f"{key}.{name}" if key else name)]
    if key in NON_RESULT_KEYS or recorded == current:
        return []
    if key in PATH_KEYS and isinstance(recorded, str) and isinstance(current, str) and os.path.exists(current) \
            and os.path.realpath(recorded) == os.path.realpath(current):
        return []
    return [f"{key} ({_short(recorded)} -> {_short(current)})"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_recipe_file(path: Path) -> bool:
    """A YAML mapping with `model` and `output` sections: a recipe some visprune recorded (maybe an older one)."""
    try:
        raw = read_recipe_mapping(path)  # bounded: a hostile file in a run folder costs nothing
    except RecipeError:
        return False
    return {"model", "output"} <= set(raw)


def recorded_recipe(run_dir: Path) -> dict[str, Any] | None:
    """The recipe recorded in the run folder (`recipe.yaml`, as `recipe_to_dict` gives it); None without one.

    Raises:
        RunFolderError: `recipe.yaml` is not a recipe this visprune reads.
    """
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        return recipe_to_dict(load_recipe(path))
    except RecipeError as exc:
        if not _is_recipe_file(path):
            raise RunFolderError(f"output.dir {run_dir}: its {RECIPE_FILE} is not a visprune recipe, and a run would "
                                 "write over it; use another output.dir") from exc
        raise RunFolderError(f"output.dir {run_dir}: its {RECIPE_FILE} is a recipe this visprune cannot read "
                             f"({first_line(exc)}); use another output.dir, or start it again with --resume never "
                             "--overwrite") from exc


def foreign_entries(run_dir: Path) -> list[str]:
    """The entries of a run folder that visprune did not write, which `--overwrite` never deletes: anything but
    checkpoint-N/ and final/ folders holding a checkpoint marker, .staging/, tensorboard/ (event files only),
    recipe.yaml (a recipe), visprune_template.json and deepspeed_config.json."""
    from visprune.data_prep.templates import TEMPLATE_FILE

    ours = {TEMPLATE_FILE, DEEPSPEED_CONFIG_FILE, f"{TEMPLATE_FILE}.tmp"}
    foreign = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif entry.is_dir():
            is_checkpoint = ckpt.checkpoint_step(entry) is not None or name == FINAL_DIR
            if name == ckpt.STAGING_DIR or is_checkpoint and (entry / ckpt.MARKER_FILE).is_file():
                continue
            if name == TENSORBOARD_DIR and all(path.is_dir() or path.name.startswith("events.out.tfevents.")
                                               for path in entry.rglob("*")):
                continue
            foreign.append(f"{name}/" + (f" (no {ckpt.MARKER_FILE})" if is_checkpoint else ""))
        elif name not in ours and not (name == RECIPE_FILE and _is_recipe_file(entry)):
            foreign.append(name)
    return foreign


def _refuse_foreign_entries(run_dir: Path) -> None:
    foreign = foreign_entries(run_dir)
    if foreign:
        raise RunFolderError(f"output.dir {run_dir} holds files visprune did not write ({', '.join(foreign[:5])}"
                             f"{' ...' if len(foreign) > 5 else ''}): refusing to clear it, even with --overwrite; "
                             "use another output.dir")


def clear_run_folder(run_dir: Path) -> None:
    """Remove what visprune wrote in a run folder (`--resume never --overwrite`); refuses a folder holding
    anything else (`foreign_entries`)."""
    _refuse_foreign_entries(run_dir)
    entries = sorted(run_dir.iterdir())
    logger.warning("--resume never --overwrite: removing the previous run in %s (%s)", run_dir,
                   ", ".join(entry.name for entry in entries))
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    fsync_dir(run_dir)


def _inside_or_equal(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_run_folder(run_dir: Path, recipe: Recipe, resume: str, overwrite: bool) -> None:
    """Refuse a run folder (`output.dir`) this run would mix with another run or with user files (see `train`);
    reads only."""
    if overwrite and resume != "never":
        raise RunFolderError(f"--overwrite starts output.dir {run_dir} again: it needs --resume never (with "
                             f"--resume {resume} the run there would be continued)")
    out = run_dir.resolve()
    for key, value in (("model.path", recipe.model.path), ("data.path", recipe.data.path),
                       ("data.image_folder", recipe.data.image_folder), ("plan_select.data", recipe.plan_select.data)):
        if value is not None and os.path.isdir(value) and _inside_or_equal(out, Path(value).resolve()):
            raise RunFolderError(f"output.dir {run_dir} is inside {key} {value}: a run folder never goes in its "
                                 "inputs; use another output.dir")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunFolderError(f"output.dir {run_dir} is a file, not a folder")
    if overwrite:
        _refuse_foreign_entries(run_dir)
        return
    recorded = recorded_recipe(run_dir)
    results = [path.name for _, path in ckpt.checkpoints(run_dir)] + \
        ([FINAL_DIR] if (run_dir / FINAL_DIR).exists() else [])
    if not results:  # a run that never saved: nothing to mix with
        return
    if resume == "never":
        raise RunFolderError(f"output.dir {run_dir} already holds a run ({', '.join(results[:3])}): --resume never "
                             "would mix two runs in it; continue it (--resume auto), use another output.dir, or "
                             "start it again with --resume never --overwrite")
    differences = recipe_differences(recorded, recipe_to_dict(recipe)) if recorded is not None else []
    if differences:
        raise RunFolderError(f"output.dir {run_dir} holds a run of another recipe: {'; '.join(differences[:6])}"
                             f"{' ...' if len(differences) > 6 else ''}; use another output.dir, or start it again "
                             "with --resume never --overwrite")


def wait_for_every_rank() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def decided_by_main_process(decide: Any) -> Any:
    """`decide()` run on the main process only and its result (or its error, as a CheckpointError) given to
    every rank: verifying a checkpoint reads every file, once per command rather than once per rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    outcome: list[Any] = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", decide())]
        except Exception as exc:  # noqa: BLE001 (re-raised below, after every rank has been told)
            error, outcome = exc, [("error", str(exc))]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    kind, value = outcome[0]
    if kind == "error":
        raise ckpt.CheckpointError(value)
    return value


__all__ = ["DEEPSPEED_CONFIG_FILE", "FINAL_DIR", "NON_RESULT_KEYS", "PATH_KEYS", "PLAN_CHOICE_FILE", "RECIPE_FILE",
           "STATE_FILE",
           "TENSORBOARD_DIR", "RunFolderError", "check_run_folder", "clear_run_folder", "decided_by_main_process",
           "foreign_entries", "recipe_differences", "recorded_recipe", "wait_for_every_rank"]
