"""SIGKILL mid-run, then `visprune train` again (subprocesses): the resumed run reaches the same weights,
gates, λ and per-step losses (the same data order) as the uninterrupted one; bit-equal on one process,
within 1e-6 on two (torchrun, gloo, DeepSpeed ZeRO-2). And a NaN loss under DeepSpeed skips the step."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_tensors_equal, checkpoint_tensors
from test_zero import free_port
from visprune.data_prep.toy import write_toy_inputs
from visprune.trainer import checkpoints as ckpt

ROOT = Path(__file__).resolve().parents[2]
FAULTY = str(Path(__file__).with_name("faulty_train.py"))


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory):
    return write_toy_inputs(tmp_path_factory.mktemp("toy"), num_samples=40, seed=0)


def run_train(toy_inputs, run_dir, *overrides, nproc=1, env=None, expect_kill=False):
    launcher = [sys.executable, FAULTY] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        FAULTY]
    cmd = [*launcher, "train", str(ROOT / "recipes/toy/flops25.yaml"), f"model.path={toy_inputs['model']}",
           f"data.path={toy_inputs['data']}", f"data.image_folder={toy_inputs['image_folder']}",
           f"output.dir={run_dir}", "train.micro_batch_size=2", "train.max_steps=8", "output.save_steps=2",
           "budget.warmup_steps=4", "output.save_total_limit=null", *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=400, env=full_env, cwd=ROOT)
    output = proc.stdout[-3000:] + proc.stderr[-6000:]
    if expect_kill:
        # one process: killed by the signal itself; torchrun: exits non-zero when a worker is SIGKILLed
        assert proc.returncode == -signal.SIGKILL if nproc == 1 else proc.returncode != 0, output
    else:
        assert proc.returncode == 0, output
    return proc


def losses(checkpoint: Path) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def compare(straight: Path, resumed: Path, atol: float) -> None:
    a, b = checkpoint_tensors(straight), checkpoint_tensors(resumed)
    assert any("lambda_1" in key for key in a) and any("lora_B" in key for key in a)
    assert_tensors_equal(a, b, atol=atol)
    assert losses(resumed) == pytest.approx(losses(straight), abs=max(atol, 1e-12))
    assert len(losses(resumed)) == 8


def test_sigkill_half_way_through_a_save_then_resume_is_bit_equal(toy_inputs, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(toy_inputs, straight)
    run_train(toy_inputs, killed, env={"VISPRUNE_TEST_KILL_IN_SAVE": "6"}, expect_kill=True)
    assert [step for step, _ in ckpt.checkpoints(killed)] == [2, 4]  # checkpoint-6 never became visible
    assert (ckpt.staging_folder(killed, 6) / "adapter_model.safetensors").is_file()
    proc = run_train(toy_inputs, killed)  # auto-resume: from checkpoint-4, the newest complete one
    assert "resuming from" in proc.stderr and "checkpoint-4" in proc.stderr
    compare(straight / "checkpoint-8", killed / "checkpoint-8", atol=0)


def test_sigkill_two_processes_zero2_then_resume_is_equal(toy_inputs, tmp_path):
    zero = ["distributed.zero_stage=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(toy_inputs, straight, *zero, nproc=2)
    run_train(toy_inputs, killed, *zero, nproc=2, env={"VISPRUNE_TEST_KILL_AT": "5"}, expect_kill=True)
    assert [step for step, _ in ckpt.checkpoints(killed)] == [2, 4]
    run_train(toy_inputs, killed, *zero, nproc=2)
    compare(straight / "checkpoint-8", killed / "checkpoint-8", atol=1e-6)


def test_nan_loss_on_one_rank_skips_the_step_under_deepspeed(toy_inputs, tmp_path):
    run = tmp_path / "run"
    run_train(toy_inputs, run, "distributed.zero_stage=2", "output.save_steps=1", "train.max_steps=4", nproc=2,
              env={"VISPRUNE_TEST_NAN_AT": "3"})
    history = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [e["visprune/skipped_steps"] for e in history if "loss" in e] == [0, 0, 1, 1]
    assert_tensors_equal(checkpoint_tensors(run / "checkpoint-2"), checkpoint_tensors(run / "checkpoint-3"))
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint_tensors(run / "checkpoint-4").values())
