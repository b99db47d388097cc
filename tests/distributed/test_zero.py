"""Two CPU processes (gloo) under torchrun with DeepSpeed ZeRO-2 and ZeRO-3: train, checkpoint,
resume; gates and adapters are saved non-empty and reload equal."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from visprune.data_prep.toy import write_toy_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory):
    return write_toy_inputs(tmp_path_factory.mktemp("toy"), num_samples=32, seed=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_train(toy_inputs, run_dir, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "visprune.trainer.cli", "train", str(ROOT / "recipes/toy/flops25.yaml"),
           f"model.path={toy_inputs['model']}", f"data.path={toy_inputs['data']}",
           f"data.image_folder={toy_inputs['image_folder']}", f"output.dir={run_dir}",
           "train.micro_batch_size=2", "output.save_steps=2", "budget.warmup_steps=2", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + _without_noise(proc.stderr)[-8000:]
    return proc


def _without_noise(stderr: str) -> str:
    """stderr without DeepSpeed's per-collective deprecation warnings, so a failure shows its cause."""
    lines = stderr.splitlines()
    keep = [line for i, line in enumerate(lines) if "FutureWarning" not in line
            and not (line.strip() == "return func(*args, **kwargs)" and i and "FutureWarning" in lines[i - 1])]
    return "\n".join(keep)


def engine_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 module state DeepSpeed itself saved (ZeRO partitions merged), keyed like our files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    out = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        if key.startswith(("visprune_gates.", "visprune_sparsity.")):
            out[key.replace("visprune_gates.", "gates.").replace("visprune_sparsity.", "sparsity.")] = value
        elif "lora_" in key:
            out["base_model.model." + key.replace(".default.", ".")] = value
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_train_checkpoint_resume(toy_inputs, tmp_path, stage):
    zero = [f"distributed.zero_stage={stage}", "optim.scheduler=constant"]  # same LR curve for 2 and 3 steps
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    torchrun_train(toy_inputs, resumed, *zero, "train.max_steps=2")
    checkpoint = resumed / "checkpoint-2"
    engine = engine_state(checkpoint)
    for name in ("gates.safetensors", "adapter_model.safetensors"):
        saved = load_file(checkpoint / name)
        assert saved, name
        for key, tensor in saved.items():  # non-empty, and what DeepSpeed holds
            assert tensor.numel() > 0, f"{name}: {key} is empty"
            torch.testing.assert_close(tensor, engine[key], atol=0, rtol=0, msg=f"{name}: {key}")
    assert not torch.equal(load_file(checkpoint / "gates.safetensors")["gates.head.log_alpha"],
                           torch.full((3, 4), 2.0))  # the gates trained

    proc = torchrun_train(toy_inputs, resumed, *zero, "train.max_steps=3")
    assert "resuming from" in proc.stderr
    torchrun_train(toy_inputs, straight, *zero, "train.max_steps=3")
    for name in ("gates.safetensors", "adapter_model.safetensors"):
        a, b = load_file(straight / "checkpoint-3" / name), load_file(resumed / "checkpoint-3" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=f"{name}: {key}")


def test_zero3_plan_select_chooses_one_plan_for_both_ranks_and_commits_it(toy_inputs, tmp_path):
    """plan_select under ZeRO-3: candidates drawn from gathered gates, losses averaged over ranks, two finalists
    trained in turn and scored again, one plan for both ranks; the saved gates are committed to it and stay so;
    the checkpoint hardens to the chosen plan."""
    import json

    from visprune.modeling import Plan
    from visprune.trainer.export import harden

    run = tmp_path / "run"
    torchrun_train(toy_inputs, run, "distributed.zero_stage=3", "train.max_steps=6", "plan_select.at=0.5",
                   "plan_select.candidates=3", "plan_select.samples=4", "plan_select.finalists=2",
                   "plan_select.trial=0.34")
    choice = json.loads((run / "checkpoint-6" / "plan_select.json").read_text())
    assert choice["step"] == 3 and choice["trial_end"] == 5 and len(choice["candidates"]) >= 2
    assert all(isinstance(entry["loss_after_trial"], float) for entry in choice["finalists"])
    gates = [load_file(run / name / "gates.safetensors")["gates.head.log_alpha"] for name in ("checkpoint-6", "final")]
    assert torch.equal(gates[0], gates[1]) and set(gates[0].abs().flatten().tolist()) == {10.0}
    for key, tensor in load_file(run / "checkpoint-6" / "adapter_model.safetensors").items():  # adapters: DeepSpeed's
        torch.testing.assert_close(tensor, engine_state(run / "checkpoint-6")[key], atol=0, rtol=0)
    harden(run / "final", tmp_path / "out")
    assert Plan.from_json(tmp_path / "out" / "pruning_plan.json") == Plan.from_json(choice["plan"])
