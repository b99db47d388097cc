"""Security: no user-supplied file is unpickled with code execution, YAML tags that build
Python objects are refused, remote code stays off unless asked for."""

import os
import pickle

import pytest
import torch
from visprune.trainer import checkpoints as ckpt
from visprune.trainer.cli import build_parser
from visprune.trainer.config import ModelConfig, RecipeError, load_recipe


class Payload:
    """Unpickling this runs `open(marker, "w")`: the file appears only if pickle code was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path, marker):
    with open(path, "wb") as handle:
        pickle.dump({"state": Payload(marker)}, handle)


def test_a_pickle_payload_in_a_checkpoint_is_rejected_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "optimizer.pt", marker)
    with pytest.raises(pickle.UnpicklingError):  # what transformers' resume does with optimizer.pt
        torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert not marker.exists()


def test_deepspeed_checkpoint_loading_is_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "pwned"
    write_payload(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    engine = TorchCheckpointEngine.__new__(TorchCheckpointEngine)
    with ckpt.deepspeed_weights_only(), pytest.raises(pickle.UnpicklingError):
        engine.load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not marker.exists()
    # what a real ZeRO checkpoint holds still loads
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)},
               tmp_path / "real.pt")
    with ckpt.deepspeed_weights_only():
        state = engine.load(str(tmp_path / "real.pt"))
    assert state["zero_stage"] == ZeroStageEnum.gradients and torch.equal(state["w"], torch.ones(2))
    with ckpt.deepspeed_weights_only():
        patched = TorchCheckpointEngine.load
    assert TorchCheckpointEngine.load is not patched  # restored on exit


def test_a_pickled_model_file_is_not_executed(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText
    from visprune.data_prep.toy import write_toy_inputs

    model_dir = write_toy_inputs(tmp_path / "toy", num_samples=4, seed=0)["model"]
    for name in os.listdir(model_dir):
        if name.endswith((".safetensors", ".index.json")):
            os.remove(os.path.join(model_dir, name))
    marker = tmp_path / "pwned"
    write_payload(os.path.join(model_dir, "pytorch_model.bin"), marker)
    AutoConfig.from_pretrained(model_dir)  # the config (JSON) is fine
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # torch.load(weights_only=True)
        AutoModelForImageTextToText.from_pretrained(model_dir)
    assert not marker.exists()


def test_a_python_object_yaml_tag_in_a_recipe_is_rejected_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(RecipeError, match="yaml.safe_load"):
        load_recipe(recipe)
    recipe.write_text("model: !!python/object:visprune.trainer.config.ModelConfig {path: x}\n")
    with pytest.raises(RecipeError, match="yaml.safe_load"):
        load_recipe(recipe)
    good = tmp_path / "good.yaml"
    good.write_text("model: {path: m}\n")
    with pytest.raises(RecipeError, match="not valid YAML"):  # overrides are parsed with safe_load too
        load_recipe(good, [f"model.path=!!python/object/apply:builtins.open ['{marker}', 'w']"])
    assert not marker.exists()


def test_remote_code_is_off_unless_asked_for():
    assert ModelConfig(path="m").trust_remote_code is False
    parser = build_parser()
    check = parser.parse_args(["data", "check", "--json", "x.json", "--processor", "p"])
    assert check.trust_remote_code is False
