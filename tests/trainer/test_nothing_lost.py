"""Nothing is lost: checkpoints are complete or invisible, a save that crashes half-way leaves
nothing that auto-resume or keep-last-N would pick up, non-finite losses and gradients skip the step
(counted) and stop the run after K in a row without saving NaN, and every save is checked."""

import json
import math

import pytest
import torch
from conftest import assert_tensors_equal, checkpoint_tensors
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from visprune.data_prep.records import build_dataset
from visprune.data_prep.toy import write_toy_inputs
from visprune.trainer import checkpoints as ckpt
from visprune.trainer.build import (
    build_collator,
    build_model,
    build_training_args,
    prepare_model,
    render_deepspeed_config,
)
from visprune.trainer.cli import main
from visprune.trainer.config import load_recipe
from visprune.trainer.export import HardenError, harden
from visprune.trainer.gate_state import GATES_FILE, check_saved_tensors, expected_tensor_shapes
from visprune.trainer.trainer import NonFiniteError, VispruneTrainer, find_resume_checkpoint, train

TOY_RECIPE = "recipes/toy/flops25.yaml"
COMMON = ["train.max_steps=6", "budget.warmup_steps=3", "output.save_steps=2", "train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory):
    return write_toy_inputs(tmp_path_factory.mktemp("toy"), num_samples=48, seed=0)


def toy_recipe(toy_inputs, out_dir, *overrides):
    return load_recipe(TOY_RECIPE, [f"model.path={toy_inputs['model']}", f"data.path={toy_inputs['data']}",
                                    f"data.image_folder={toy_inputs['image_folder']}", f"output.dir={out_dir}",
                                    *COMMON, *overrides])


def make_trainer(toy_inputs, out_dir, *overrides) -> VispruneTrainer:
    recipe = toy_recipe(toy_inputs, out_dir, *overrides)
    model, processor = build_model(recipe)
    collator = build_collator(recipe, model, processor)
    model, gates, controller = prepare_model(model, recipe)
    return VispruneTrainer(model=model, args=build_training_args(recipe, render_deepspeed_config(recipe)),
                           train_dataset=build_dataset(recipe.data.path), data_collator=collator,
                           processing_class=processor, recipe=recipe, gates=gates, controller=controller)


# ---- complete or invisible ----------------------------------------------------------------------------

def test_checkpoints_carry_a_marker_and_keep_last_n_counts_only_complete_ones(toy_inputs, tmp_path, capsys):
    run = tmp_path / "run"
    train(toy_recipe(toy_inputs, run, "output.save_total_limit=2"), resume="never")
    assert [step for step, _ in ckpt.checkpoints(run)] == [4, 6]  # 2 was rotated away
    for _, path in ckpt.checkpoints(run):
        assert ckpt.incomplete_reason(path) is None
        marker = json.loads((path / ckpt.MARKER_FILE).read_text())
        assert marker["format"] == "visprune-checkpoint/2" and GATES_FILE in marker["files"]
        adapter = marker["files"]["adapter_model.safetensors"]
        assert adapter["size"] > 0 and adapter["sha256"] == ckpt.file_sha256(path / "adapter_model.safetensors")
    assert not (run / ckpt.STAGING_DIR).exists()
    assert ckpt.incomplete_reason(run / "final") is None  # final/ is published the same way

    # a crash while final/ was written: the next `visprune train` has nothing to train and rewrites it
    (run / "final" / ckpt.MARKER_FILE).unlink()
    (run / "final" / GATES_FILE).unlink()
    train(toy_recipe(toy_inputs, run, "output.save_total_limit=2"), resume="auto")
    assert ckpt.incomplete_reason(run / "final") is None
    assert_tensors_equal(checkpoint_tensors(run / "checkpoint-6"), checkpoint_tensors(run / "final"))

    # an incomplete checkpoint (no marker) beside them: never resumed from, never counted, never deleted
    fake = run / "checkpoint-9"
    fake.mkdir()
    (fake / "adapter_model.safetensors").write_bytes(b"half")
    assert find_resume_checkpoint(run, "auto") == str(run / "checkpoint-6")
    assert ckpt.rotate(run, 1) == [run / "checkpoint-4"]
    assert fake.exists() and (run / "checkpoint-6").exists()
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        find_resume_checkpoint(run, str(fake))
    with pytest.raises(HardenError, match="checkpoint-9 is not a complete checkpoint: no visprune_checkpoint.json"):
        harden(fake, tmp_path / "hardened")
    overrides = [f"model.path={toy_inputs['model']}", f"data.path={toy_inputs['data']}",
                 f"data.image_folder={toy_inputs['image_folder']}", f"output.dir={run}", *COMMON]
    assert main(["train", TOY_RECIPE, *overrides, "--resume", str(fake)]) == 2
    assert "not a complete checkpoint: no visprune_checkpoint.json" in capsys.readouterr().err

    # a file truncated after the marker was written (a copy that stopped half-way) is caught by its size
    adapter = run / "checkpoint-6" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    assert "adapter_model.safetensors has 100 bytes" in ckpt.incomplete_reason(run / "checkpoint-6")
    assert find_resume_checkpoint(run, "auto") is None


class CrashInSave(Exception):
    pass


def test_a_save_that_crashes_half_way_is_invisible_and_resume_is_exact(toy_inputs, tmp_path, monkeypatch):
    straight = make_trainer(toy_inputs, tmp_path / "straight")
    straight.train()

    run = tmp_path / "crashed"
    crashed = make_trainer(toy_inputs, run)
    original = VispruneTrainer._save_optimizer_and_scheduler

    def crash_at_4(self, output_dir):  # the model files of checkpoint-4 are written, the optimizer is not
        if self.state.global_step == 4:
            raise CrashInSave(output_dir)
        return original(self, output_dir)

    monkeypatch.setattr(VispruneTrainer, "_save_optimizer_and_scheduler", crash_at_4)
    with pytest.raises(CrashInSave):
        crashed.train()
    monkeypatch.undo()
    assert [step for step, _ in ckpt.checkpoints(run)] == [2]
    half = ckpt.staging_folder(run, 4)
    assert (half / "adapter_model.safetensors").is_file() and not (half / "optimizer.pt").exists()
    assert find_resume_checkpoint(run, "auto") == str(run / "checkpoint-2")

    # `visprune train` again: the staging leftovers go, training resumes from checkpoint-2 and ends equal
    train(toy_recipe(toy_inputs, run), resume="auto")
    assert not half.exists()
    for step in (4, 6):
        assert_tensors_equal(checkpoint_tensors(tmp_path / "straight" / f"checkpoint-{step}"), checkpoint_tensors(run / f"checkpoint-{step}"))
    history = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    reference = json.loads((tmp_path / "straight" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in history if "loss" in e] == [e["loss"] for e in reference if "loss" in e]


def test_every_save_is_checked_for_empty_and_misshapen_tensors(toy_inputs, tmp_path):
    trainer = make_trainer(toy_inputs, tmp_path / "run", "model.train_projector=true")
    out = tmp_path / "saved"
    trainer.save_model(str(out))  # checks itself
    expected = expected_tensor_shapes(trainer.model)
    assert any("multi_modal_projector" in key for key in expected) and any("lora_B" in key for key in expected)
    saved = load_file(out / "adapter_model.safetensors")
    assert set(expected) <= set(saved)

    key = next(k for k in saved if "lora_A" in k)
    broken = dict(saved)
    broken[key] = torch.empty(0)  # what an un-gathered ZeRO-3 parameter looks like
    save_file(broken, out / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match=f"{key} has shape .*expected"):
        check_saved_tensors(out, expected, trainer.gates, trainer.controller)
    del broken[key]
    save_file(broken, out / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match=f"{key} is missing"):
        check_saved_tensors(out, expected, trainer.gates, trainer.controller)


def test_full_fine_tuning_saves_are_checked_too(toy_inputs, tmp_path):
    trainer = make_trainer(toy_inputs, tmp_path / "run", "lora=null")
    trainer.save_model(str(tmp_path / "saved"))
    assert list((tmp_path / "saved").glob("model*.safetensors"))


# ---- non-finite losses and gradients -----------------------------------------------------------------

class Snapshots(TrainerCallback):
    """The trainable tensors after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.by_step = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()
                                           if p.requires_grad}


def inject_nan_loss(trainer, steps):
    """Forward hook: the LM loss of the given (1-based) optimizer steps becomes NaN."""
    def hook(module, args, kwargs, output):
        if trainer.state.global_step + 1 in steps and getattr(output, "loss", None) is not None:
            output.loss = output.loss * float("nan")
        return output

    trainer.model.register_forward_hook(hook, with_kwargs=True)


def test_a_nan_loss_skips_the_step_and_is_counted(toy_inputs, tmp_path):
    trainer = make_trainer(toy_inputs, tmp_path / "run")
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    inject_nan_loss(trainer, {3, 4})
    trainer.train()
    before, after = snapshots.by_step[2], snapshots.by_step[4]
    for name in before:  # steps 3 and 4 changed nothing: not the weights, gates or λ
        torch.testing.assert_close(after[name], before[name], atol=0, rtol=0, msg=name)
    assert any(not torch.equal(snapshots.by_step[5][n], after[n]) for n in after)  # step 5 trains again
    assert trainer.skipped_steps == 2 and trainer.nonfinite_in_a_row == 0
    history = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [e["visprune/skipped_steps"] for e in history if "loss" in e] == [0, 0, 1, 2, 2, 2]
    assert all(torch.isfinite(t).all() for t in checkpoint_tensors(tmp_path / "run" / "checkpoint-6").values())
    lrs = [e["learning_rate"] for e in history if "learning_rate" in e]
    assert lrs[2] == lrs[3] == lrs[4]  # the schedule does not advance on a skipped step


def test_a_nan_gradient_with_a_finite_loss_skips_the_step(toy_inputs, tmp_path):
    trainer = make_trainer(toy_inputs, tmp_path / "run", "train.max_steps=4", "output.save_steps=4")
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    lora = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
    lora.register_hook(lambda grad: grad * float("inf") if trainer.state.global_step + 1 == 2 else grad)
    trainer.train()
    for name, value in snapshots.by_step[1].items():
        torch.testing.assert_close(snapshots.by_step[2][name], value, atol=0, rtol=0, msg=name)
    assert trainer.skipped_steps == 1


def test_k_non_finite_steps_in_a_row_stop_the_run_and_nothing_nan_is_saved(toy_inputs, tmp_path):
    trainer = make_trainer(toy_inputs, tmp_path / "run", "train.stop_after_nonfinite=2", "output.save_steps=1")
    inject_nan_loss(trainer, {3, 4, 5, 6})
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row \(up to step 4\).*checkpoint-3"):
        trainer.train()
    run = tmp_path / "run"
    assert [step for step, _ in ckpt.checkpoints(run)] == [1, 2, 3]  # step 3 was skipped: its weights are step 2's
    for _, path in ckpt.checkpoints(run):
        assert all(bool(torch.isfinite(t).all()) for t in checkpoint_tensors(path).values())
    assert_tensors_equal(checkpoint_tensors(run / "checkpoint-2"), checkpoint_tensors(run / "checkpoint-3"))


def test_non_finite_weights_are_never_saved(toy_inputs, tmp_path):
    trainer = make_trainer(toy_inputs, tmp_path / "run")
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).fill_(math.nan)
    with pytest.raises(NonFiniteError, match="refusing to save non-finite weights"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()
