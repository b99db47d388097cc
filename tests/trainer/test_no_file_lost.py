"""Nothing a user made is lost, and nothing damaged is read: checkpoint markers hash every file (a flipped
byte or a truncated file is caught before resume or harden reads it, auto-resume falls back to the previous
checkpoint, keep-last-N counts only verified ones); `harden --out` never writes over a folder it did not write,
the checkpoint, its run folder or the base model; `train` never mixes two runs or two recipes in one run folder
and clears one only with --resume never --overwrite; a run whose every step was non-finite ends with
NonFiniteError and no final/; bad LoRA targets, a checkpoint of another model and a missing model.path are
one named line. Every case goes through the function and the CLI, and hashes the input trees before and after."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_tensors_equal, checkpoint_tensors
from safetensors.torch import load_file, save_file
from visprune.data_prep.toy import write_toy_inputs
from visprune.trainer import checkpoints as ckpt
from visprune.trainer.build import build_model, prepare_model
from visprune.trainer.cli import build_parser, main
from visprune.trainer.config import RecipeError, load_recipe
from visprune.trainer.export import EXPORT_MARKER, HardenError, harden
from visprune.trainer.run_folder import NON_RESULT_KEYS, RunFolderError
from visprune.trainer.trainer import NonFiniteError, VispruneTrainer, find_resume_checkpoint, train

TOY_RECIPE = "recipes/toy/flops25.yaml"
TINY = ["train.max_steps=4", "output.save_steps=2", "train.micro_batch_size=4", "budget.warmup_steps=0",
        "output.heatmap_steps=0", "output.save_total_limit=null"]


def tree_digest(*folders: Path) -> dict[str, str]:
    """Every file and folder below `folders` -> sha256 of its content ("dir" for a folder)."""
    digest = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return digest


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def _log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VISPRUNE_LOG_DIR", str(tmp_path / "logs"))  # the CLI writes long errors there


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy inputs and one 4-step run (checkpoint-2, checkpoint-4, final/) that tests copy before changing."""
    root = tmp_path_factory.mktemp("nolost")
    inputs = write_toy_inputs(root / "inputs", num_samples=16, seed=0)
    world = {"root": root, "inputs": inputs, "model": Path(inputs["model"]), "data": Path(inputs["data"]).parent}
    train(load_recipe(TOY_RECIPE, overrides(world, root / "run")), resume="never")
    world["run"] = root / "run"
    return world


def overrides(world, out: Path, *extra: str) -> list[str]:
    inputs = world["inputs"]
    return [f"model.path={inputs['model']}", f"data.path={inputs['data']}",
            f"data.image_folder={inputs['image_folder']}", f"output.dir={out}", *TINY, *extra]


def recipe(world, out: Path, *extra: str):
    return load_recipe(TOY_RECIPE, overrides(world, out, *extra))


def cli_train(world, out: Path, *extra: str, flags: tuple[str, ...] = ()) -> int:
    return main(["train", TOY_RECIPE, *overrides(world, out, *extra), *flags])


def copy_run(world, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    return run


def inputs_digest(world) -> dict[str, str]:
    return tree_digest(world["model"], world["data"])


def the_error(capsys) -> str:
    """The CLI's one error line (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def cli_has(verb: str, flag: str) -> bool:
    """Whether `visprune VERB` takes `flag` (wired in cli.py)."""
    parser = build_parser()
    sub = next(action for action in parser._actions if action.dest == "verb").choices[verb]
    return any(flag in action.option_strings for action in sub._actions)


# ---- checkpoints are verified before they are read ----------------------------------------------------------

def test_a_corrupted_newest_checkpoint_is_skipped_and_named(world, tmp_path, caplog, capsys):
    run = copy_run(world, tmp_path)
    original = {key: value.clone() for key, value in checkpoint_tensors(run / "checkpoint-4").items()}  # not mmap'ed
    flip_last_byte(run / "checkpoint-4" / "adapter_model.safetensors")
    assert "adapter_model.safetensors does not match its sha256" in ckpt.incomplete_reason(run / "checkpoint-4")
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(run, "auto") == str(run / "checkpoint-2")
    assert "checkpoint-4: adapter_model.safetensors does not match" in caplog.text
    assert "falling back to" in caplog.text and "checkpoint-2" in caplog.text

    before = tree_digest(run) | inputs_digest(world)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-4: not a complete checkpoint: "
                                                   "adapter_model.safetensors does not match"):
        train(recipe(world, run), resume=str(run / "checkpoint-4"))
    assert cli_train(world, run, flags=("--resume", str(run / "checkpoint-4"))) == 2
    assert "adapter_model.safetensors does not match its sha256" in the_error(capsys)
    assert tree_digest(run) | inputs_digest(world) == before

    # auto-resume trains steps 3-4 again from checkpoint-2 and publishes an intact checkpoint-4, the same as before
    train(recipe(world, run), resume="auto")
    assert ckpt.incomplete_reason(run / "checkpoint-4") is None
    assert_tensors_equal(original, checkpoint_tensors(run / "checkpoint-4"))


def test_a_truncated_file_is_named_and_the_checkpoint_skipped(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    gates = run / "checkpoint-4" / "gates.safetensors"
    gates.write_bytes(gates.read_bytes()[:50])
    assert ckpt.incomplete_reason(run / "checkpoint-4").startswith("gates.safetensors has 50 bytes")
    assert find_resume_checkpoint(run, "auto") == str(run / "checkpoint-2")
    before = tree_digest(run) | inputs_digest(world)
    assert cli_train(world, run, flags=("--resume", str(run / "checkpoint-4"))) == 2
    assert "gates.safetensors has 50 bytes" in the_error(capsys)
    assert tree_digest(run) | inputs_digest(world) == before


def test_harden_verifies_the_checkpoint_and_final_before_reading_them(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    flip_last_byte(run / "checkpoint-4" / "gates.safetensors")
    flip_last_byte(run / "final" / "adapter_model.safetensors")
    before = tree_digest(run) | inputs_digest(world)
    for folder, name in ((run / "checkpoint-4", "gates.safetensors"), (run / "final", "adapter_model.safetensors")):
        with pytest.raises(HardenError, match=f"not a complete checkpoint: {name} does not match its sha256"):
            harden(folder, tmp_path / "out")
        assert main(["harden", str(folder), "--out", str(tmp_path / "out")]) == 2
        assert name in the_error(capsys)
    assert not (tmp_path / "out").exists()
    assert main(["harden", str(tmp_path / "no-such-checkpoint"), "--out", str(tmp_path / "out")]) == 2
    assert "no-such-checkpoint: no such folder" in the_error(capsys)
    assert tree_digest(run) | inputs_digest(world) == before

    # train sees nothing left to train and writes final/ again from the (intact) newest checkpoint
    flip_last_byte(run / "checkpoint-4" / "gates.safetensors")  # back as it was
    train(recipe(world, run), resume="auto")
    assert ckpt.incomplete_reason(run / "final") is None
    assert_tensors_equal(checkpoint_tensors(run / "checkpoint-4"), checkpoint_tensors(run / "final"))


def test_keep_last_n_counts_and_deletes_only_verified_checkpoints(world, tmp_path):
    run = copy_run(world, tmp_path)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-1")  # verifies (its marker travels with it)
    flip_last_byte(run / "checkpoint-4" / "trainer_state.json")
    corrupted = tree_digest(run / "checkpoint-4")
    assert ckpt.rotate(run, 1) == [run / "checkpoint-1"]  # 2 is the one kept; 4 is neither counted nor deleted
    assert [step for step, _ in ckpt.checkpoints(run)] == [2, 4]
    assert tree_digest(run / "checkpoint-4") == corrupted


def test_a_marker_of_an_older_visprune_is_verified_by_sizes_only(world, tmp_path, caplog):
    run = copy_run(world, tmp_path)
    folder = run / "checkpoint-2"
    marker = json.loads((folder / ckpt.MARKER_FILE).read_text())
    sizes = {name: entry["size"] for name, entry in marker["files"].items()}
    (folder / ckpt.MARKER_FILE).write_text(json.dumps({"format": "visprune-checkpoint/1", "step": 2, "files": sizes}))
    with caplog.at_level(logging.WARNING):
        assert ckpt.incomplete_reason(folder) is None
    assert "sizes only" in caplog.text
    (folder / "recipe.yaml").write_text((folder / "recipe.yaml").read_text() + "\n")
    assert ckpt.incomplete_reason(folder).startswith("recipe.yaml has ")
    (folder / ckpt.MARKER_FILE).write_text(json.dumps({"format": "visprune-checkpoint/2", "step": 2,
                                                       "files": {"../../secret": {"size": 1, "sha256": "0"}}}))
    assert "not inside the checkpoint" in ckpt.incomplete_reason(folder)
    (folder / ckpt.MARKER_FILE).write_text("[1, 2]")
    assert ckpt.incomplete_reason(folder).startswith("unreadable visprune_checkpoint.json")


def test_each_file_is_hashed_once_per_process(world, tmp_path, monkeypatch):
    run = copy_run(world, tmp_path)
    calls = []
    sha256 = ckpt.hashlib.sha256

    def counting():
        calls.append(1)
        return sha256()

    monkeypatch.setattr(ckpt.hashlib, "sha256", counting)
    num_files = len(ckpt.list_files(run / "checkpoint-4"))
    for _ in range(3):
        assert ckpt.incomplete_reason(run / "checkpoint-4") is None
    ckpt.complete_checkpoints(run)
    assert len(calls) == num_files + len(ckpt.list_files(run / "checkpoint-2"))
    flip_last_byte(run / "checkpoint-4" / "recipe.yaml")  # a changed file is read again
    assert ckpt.incomplete_reason(run / "checkpoint-4") is not None


# ---- harden never writes over what it did not write ---------------------------------------------------------

def test_harden_refuses_a_folder_it_did_not_write(world, tmp_path, capsys):
    checkpoint = world["run"] / "checkpoint-4"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    before = tree_digest(mine, world["run"]) | inputs_digest(world) | {"file": a_file.read_text()}
    with pytest.raises(HardenError, match="exists and is not empty"):
        harden(checkpoint, mine)
    with pytest.raises(HardenError, match=f"was not written by visprune harden \\(no {EXPORT_MARKER}\\)"):
        harden(checkpoint, mine, overwrite=True)
    with pytest.raises(HardenError, match="exists and is not a folder"):
        harden(checkpoint, a_file, overwrite=True)
    assert main(["harden", str(checkpoint), "--out", str(mine)]) == 2
    assert str(mine) in the_error(capsys)
    if cli_has("harden", "--overwrite"):
        assert main(["harden", str(checkpoint), "--out", str(mine), "--overwrite"]) == 2
        assert EXPORT_MARKER in the_error(capsys)
    assert tree_digest(mine, world["run"]) | inputs_digest(world) | {"file": a_file.read_text()} == before
    assert not list(tmp_path.glob(".mine.harden-*"))


@pytest.mark.parametrize("where", ["checkpoint", "inside the checkpoint", "run folder", "inside the run folder",
                                   "base model", "inside the base model", "holds the run folder"])
def test_harden_never_writes_into_its_inputs(world, tmp_path, where, capsys):
    run = copy_run(world, tmp_path)
    checkpoint = run / "checkpoint-4"
    out = {"checkpoint": checkpoint, "inside the checkpoint": checkpoint / "hardened", "run folder": run,
           "inside the run folder": run / "hardened", "base model": world["model"],
           "inside the base model": world["model"] / "hardened", "holds the run folder": tmp_path}[where]
    before = tree_digest(run) | inputs_digest(world)
    with pytest.raises(HardenError, match="harden never writes there"):
        harden(checkpoint, out, overwrite=True)
    assert main(["harden", str(checkpoint), "--out", str(out)]) == 2
    assert "harden never writes there" in the_error(capsys)
    assert tree_digest(run) | inputs_digest(world) == before


def test_harden_replaces_its_own_folder_only_when_asked_and_atomically(world, tmp_path, monkeypatch, capsys):
    checkpoint = world["run"] / "checkpoint-4"
    out = tmp_path / "v50"
    out.mkdir()  # an empty folder is fine
    harden(checkpoint, out, budget=0.5)
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["format"] == "visprune-export/1" and "pruning_plan.json" in marker["files"]
    first = tree_digest(out)
    with pytest.raises(HardenError, match="exists and is not empty"):
        harden(checkpoint, out, budget=0.25)
    assert main(["harden", str(checkpoint), "--out", str(out), "--budget", "0.25"]) == 2
    assert "--overwrite" in the_error(capsys)
    assert tree_digest(out) == first

    # a crash half-way through the new export leaves the old folder as it was, and no staging folder
    from visprune.trainer import export

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.Plan, "to_json", crash)
    with pytest.raises(KeyboardInterrupt):
        harden(checkpoint, out, budget=0.25, overwrite=True)
    monkeypatch.undo()
    assert tree_digest(out) == first and not list(tmp_path.glob(".v50.*"))

    (out / "stale.txt").write_text("left by the older export")
    report = harden(checkpoint, out, budget=0.25, overwrite=True)
    assert report["budget"] == 0.25 and json.loads((out / "pruning_report.json").read_text())["budget"] == 0.25
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob(".v50.*"))
    if cli_has("harden", "--overwrite"):
        assert main(["harden", str(checkpoint), "--out", str(out), "--budget", "0.5", "--overwrite"]) == 0
        assert json.loads((out / "pruning_report.json").read_text())["budget"] == 0.5


def test_harden_names_a_missing_base_model(world, tmp_path, capsys):
    checkpoint = tmp_path / "handed" / "checkpoint-4"
    shutil.copytree(world["run"] / "checkpoint-4", checkpoint)
    data = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    data["model"]["path"] = str(tmp_path / "moved-away")
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    ckpt.write_marker(checkpoint, 4)
    with pytest.raises(FileNotFoundError, match="model.path .*moved-away: no such folder"):
        harden(checkpoint, tmp_path / "out")
    assert main(["harden", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert "moved-away" in the_error(capsys)
    assert not (tmp_path / "out").exists()


# ---- train never mixes two runs -----------------------------------------------------------------------------

def test_resume_never_into_a_finished_run_is_refused(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    before = tree_digest(run) | inputs_digest(world)
    with pytest.raises(RunFolderError, match="already holds a run .*--resume never would mix two runs"):
        train(recipe(world, run), resume="never")
    assert cli_train(world, run, flags=("--resume", "never")) == 2
    assert str(run) in the_error(capsys)
    with pytest.raises(RunFolderError, match="--overwrite .* needs --resume never"):
        train(recipe(world, run), resume="auto", overwrite=True)
    assert tree_digest(run) | inputs_digest(world) == before


@pytest.mark.parametrize("change", [["budget.visual_flops=0.5"], ["lora.rank=4", "optim.lr=1e-3"], ["lora=null"],
                                    ["data.max_length=200"], ["model.path=other"]])
def test_a_run_folder_of_another_recipe_is_refused(world, tmp_path, change, capsys):
    run = copy_run(world, tmp_path)
    if change == ["model.path=other"]:
        shutil.copytree(world["model"], tmp_path / "other")
        change = [f"model.path={tmp_path / 'other'}"]
    before = tree_digest(run) | inputs_digest(world)
    keys = [item.split("=")[0] for item in change]
    with pytest.raises(RunFolderError, match="holds a run of another recipe: " + ".*".join(keys)):
        train(recipe(world, run, *change))
    assert cli_train(world, run, *change) == 2
    line = the_error(capsys)
    assert all(key in line for key in keys) and str(run) in line
    assert tree_digest(run) | inputs_digest(world) == before


def test_keys_that_do_not_change_the_result_may_differ(world, tmp_path):
    run = copy_run(world, tmp_path)
    checkpoints = tree_digest(run / "checkpoint-2", run / "checkpoint-4", run / "final")
    same = ["output.save_steps=1", "train.logging_steps=2", "data.num_workers=0", "output.save_total_limit=5",
            "train.stop_after_nonfinite=3", f"output.dir={run}/../run"]
    assert train(recipe(world, run, *same)) == Path(f"{run}/../run")  # nothing left to train
    assert tree_digest(run / "checkpoint-2", run / "checkpoint-4", run / "final") == checkpoints
    assert {"train.max_steps", "output.save_steps", "output.save_total_limit", "output.heatmap_steps",
            "train.logging_steps", "data.num_workers"} <= NON_RESULT_KEYS
    model = Path(world["inputs"]["model"]).resolve()
    assert train(recipe(world, run, f"model.path={model}/../model")) == run  # the same folder, spelt otherwise


def test_resume_never_with_overwrite_starts_clean_and_keeps_user_files(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    shutil.copytree(run / "checkpoint-4", run / "checkpoint-9")  # a checkpoint of the old run, newer
    train(recipe(world, run, "budget.visual_flops=0.5"), resume="never", overwrite=True)
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint-2", "checkpoint-4", "final", "recipe.yaml",
                                                          "tensorboard", "visprune_template.json"]
    assert load_recipe(run / "final" / "recipe.yaml").budget.visual_flops == 0.5
    assert len(list((run / "tensorboard").iterdir())) == 1  # the old run's events went with it

    (run / "notes.txt").write_text("mine")
    before = tree_digest(run) | inputs_digest(world)
    with pytest.raises(RunFolderError, match=r"holds files visprune did not write \(notes.txt\)"):
        train(recipe(world, run), resume="never", overwrite=True)
    if cli_has("train", "--overwrite"):
        assert cli_train(world, run, flags=("--resume", "never", "--overwrite")) == 2
        assert "notes.txt" in the_error(capsys)
    assert tree_digest(run) | inputs_digest(world) == before
    (run / "notes.txt").unlink()
    (run / "final" / ckpt.MARKER_FILE).unlink()  # a final/ without a marker: not known to be visprune's
    before = tree_digest(run) | inputs_digest(world)
    with pytest.raises(RunFolderError, match="final/ \\(no visprune_checkpoint.json\\)"):
        train(recipe(world, run), resume="never", overwrite=True)
    assert tree_digest(run) | inputs_digest(world) == before


def test_a_run_folder_inside_an_input_or_over_a_user_recipe_is_refused(world, tmp_path, capsys):
    before = inputs_digest(world)
    inside = world["model"] / "run"
    with pytest.raises(RunFolderError, match="is inside model.path"):
        train(recipe(world, inside))
    assert cli_train(world, inside) == 2
    assert "inside model.path" in the_error(capsys)
    assert not inside.exists() and inputs_digest(world) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("my: own file\n")
    with pytest.raises(RunFolderError, match="recipe.yaml is not a visprune recipe"):
        train(recipe(world, mine))
    assert cli_train(world, mine) == 2
    assert "not a visprune recipe" in the_error(capsys)
    assert (mine / "recipe.yaml").read_text() == "my: own file\n" and sorted(p.name for p in mine.iterdir()) == [
        "recipe.yaml"]


# ---- no silent untrained result ------------------------------------------------------------------------------

@pytest.fixture
def every_loss_nan(monkeypatch):
    compute_loss = VispruneTrainer.compute_loss

    def nan_loss(self, *args, **kwargs):
        out = compute_loss(self, *args, **kwargs)
        return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")

    monkeypatch.setattr(VispruneTrainer, "compute_loss", nan_loss)


def test_a_run_whose_every_step_was_skipped_fails_without_final(world, tmp_path, every_loss_nan, capsys):
    run = tmp_path / "run"
    before = inputs_digest(world)
    with pytest.raises(NonFiniteError, match=r"every optimizer step \(4 of 4\) .*no final/ was written"):
        train(recipe(world, run))  # 4 steps, fewer than train.stop_after_nonfinite (8) in a row
    assert not (run / "final").exists() and not (run / ckpt.STAGING_DIR / "final").exists()
    # the checkpoints are honest (the initial weights, counted as skipped); resuming from them fails the same way
    assert json.loads((run / "checkpoint-4" / "visprune_state.json").read_text())["skipped_steps"] == 4
    with pytest.raises(NonFiniteError, match="every optimizer step"):
        train(recipe(world, run))
    assert not (run / "final").exists()
    with pytest.raises(HardenError, match="every one of its 4 optimizer steps was skipped as non-finite"):
        harden(run / "checkpoint-4", tmp_path / "export")  # and harden never exports the untrained weights
    assert not (tmp_path / "export").exists()
    assert cli_train(world, tmp_path / "run2", "train.max_steps=2") == 2
    assert "every optimizer step (2 of 2)" in the_error(capsys)
    assert not (tmp_path / "run2" / "final").exists() and inputs_digest(world) == before


def test_a_gradient_norm_that_overflows_every_step_is_no_silent_untrained_run(world, tmp_path, capsys):
    """Gradients too large for their float32 norm: clipping by an infinite norm would zero them, so every step
    is skipped as non-finite, and the run ends with NonFiniteError instead of an untrained final/."""
    huge = f"lora.alpha={10**38}"
    with pytest.raises(NonFiniteError, match=r"every optimizer step \(2 of 2\) had a non-finite loss, gradient or "
                                             "gradient norm"):
        train(recipe(world, tmp_path / "run", huge, "train.max_steps=2"))
    assert not (tmp_path / "run" / "final").exists()
    assert cli_train(world, tmp_path / "run2", huge, "train.max_steps=2") == 2
    assert "gradient norm" in the_error(capsys) and not (tmp_path / "run2" / "final").exists()


# ---- raw tracebacks become named errors ---------------------------------------------------------------------

def test_lora_targets_that_match_nothing_are_named(world, tmp_path, capsys):
    model, _ = build_model(recipe(world, tmp_path / "run"))
    with pytest.raises(RecipeError, match="lora.targets: 'nothing_matches' matches no layer .*q_proj"):
        prepare_model(model, recipe(world, tmp_path / "run", "lora.targets=[nothing_matches]"))
    model, _ = build_model(recipe(world, tmp_path / "run"))
    with pytest.raises(RecipeError, match="lora.targets: 'q_porj' matches no layer"):  # one typo among good names
        prepare_model(model, recipe(world, tmp_path / "run", "lora.targets=[q_proj, q_porj]"))
    before = inputs_digest(world)
    assert cli_train(world, tmp_path / "run", "lora.targets=[nothing_matches]") == 2
    assert "lora.targets" in the_error(capsys)
    assert inputs_digest(world) == before and not ckpt.checkpoints(tmp_path / "run")


def test_resuming_a_checkpoint_of_another_model_names_the_file_and_tensor(world, tmp_path, capsys):
    source = world["run"] / "checkpoint-2"
    before = tree_digest(world["run"]) | inputs_digest(world)
    with pytest.raises(ckpt.CheckpointError, match=r"adapter_model.safetensors: .*lora_A.weight has shape \(8, "):
        train(recipe(world, tmp_path / "rank4", "lora.rank=4"), resume=str(source))
    assert cli_train(world, tmp_path / "rank4", "lora.rank=4", flags=("--resume", str(source))) == 2
    assert "adapter_model.safetensors" in the_error(capsys)
    assert tree_digest(world["run"]) | inputs_digest(world) == before

    other = tmp_path / "other" / "checkpoint-2"
    shutil.copytree(source, other)
    gates = load_file(other / "gates.safetensors")
    gates["gates.head.log_alpha"] = torch.zeros(5, 7)  # the gates of a 5-layer, 7-head model
    save_file(gates, other / "gates.safetensors")
    ckpt.write_marker(other, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"gates.safetensors: gates.head.log_alpha has shape \(5, 7\)"):
        train(recipe(world, tmp_path / "gates"), resume=str(other))
    assert cli_train(world, tmp_path / "gates", flags=("--resume", str(other))) == 2
    assert "gates.head.log_alpha" in the_error(capsys)
    with pytest.raises(ckpt.CheckpointError, match="gates.head.log_alpha has shape"):
        harden(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_harden_names_the_adapter_tensor_that_does_not_fit_the_base_model(world, tmp_path, capsys):
    """The checkpoint's recipe points at a base model of another width (same layers and heads: the gates fit)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    wide = tmp_path / "wide"
    shutil.copytree(world["model"], wide)
    config = AutoConfig.from_pretrained(world["model"])
    config.text_config.hidden_size = 48
    LlavaForConditionalGeneration._from_config(config).save_pretrained(wide)
    checkpoint = tmp_path / "handed" / "checkpoint-4"
    shutil.copytree(world["run"] / "checkpoint-4", checkpoint)
    data = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    data["model"]["path"] = str(wide)
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    ckpt.write_marker(checkpoint, 4)
    before = tree_digest(wide, checkpoint)
    with pytest.raises(ckpt.CheckpointError, match=r"adapter_model.safetensors does not fit .*wide: size mismatch for "
                                                   r".*lora_A.default.weight"):
        harden(checkpoint, tmp_path / "out")
    assert main(["harden", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert "size mismatch for" in the_error(capsys)
    assert tree_digest(wide, checkpoint) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["missing", "a file", "no config"])
def test_a_model_path_that_is_no_model_is_one_line(world, tmp_path, what, capsys):
    path = tmp_path / "model"
    if what == "a file":
        path.write_text("x")
    elif what == "no config":
        path.mkdir()
    fragment = {"missing": "no such folder", "a file": "a file, not a model folder",
                "no config": "not a model folder (no config.json)"}
    with pytest.raises(FileNotFoundError, match=re.escape(f"model.path {path}: {fragment[what]}")):
        build_model(recipe(world, tmp_path / "run", f"model.path={path}"))
    assert cli_train(world, tmp_path / "run", f"model.path={path}") == 2
    line = the_error(capsys)
    assert "model.path" in line and fragment[what] in line
    assert not ckpt.checkpoints(tmp_path / "run")
