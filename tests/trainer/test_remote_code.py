"""Remote code never comes from a checkpoint: a model folder whose config.json maps to a module in the folder
(`auto_map`) runs that module only when the user's recipe (`train`) or an explicit argument asks for it, never
because a checkpoint's recipe.yaml says `model.trust_remote_code: true` (harden, load_checkpoint), and never by
default when an exported folder is loaded (load_pruned, load_for_eval, evaluate_dir, compare_dirs, the lmms-eval
plugin). The module writes a marker file when imported: the file appears only if its code ran."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from visprune.data_prep.toy import write_toy_inputs
from visprune.modeling import load_pruned
from visprune.trainer import checkpoints as ckpt
from visprune.trainer.build import build_model
from visprune.trainer.cli import main
from visprune.trainer.config import load_recipe
from visprune.trainer.eval.folder import evaluate_dir
from visprune.trainer.eval.loading import load_for_eval
from visprune.trainer.export import HardenError, harden, load_checkpoint
from visprune.trainer.trainer import train

TOY_RECIPE = "recipes/toy/flops25.yaml"
ROOT = Path(__file__).resolve().parents[2]


def tree_digest(*folders: Path) -> dict[str, str]:
    """Every file below `folders` -> sha256 of its content."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def plant_remote_code(folder: Path, marker: Path, model_type: str | None = None) -> None:
    """Make `folder` a model folder with remote code: `evil.py` writes `marker` when imported, and config.json
    and processor_config.json map the Auto classes to it (optionally under a `model_type` transformers does not
    know, so that only the folder's code could load it)."""
    (folder / "evil.py").write_text(textwrap.dedent(f"""\
        from pathlib import Path
        Path({str(marker)!r}).write_text("remote code ran")
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        class EvilConfig(LlavaConfig):
            pass
        class EvilModel(LlavaForConditionalGeneration):
            config_class = EvilConfig
        class EvilProcessor(LlavaProcessor):
            pass
        """))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    if model_type is not None:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        data = json.loads(processor_config.read_text())
        data["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
        processor_config.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy model folder with remote code, a 2-step run on it (trust_remote_code off in the user's recipe),
    a copy of its checkpoint whose recipe asks for remote code (marker re-written, as an attacker would), and
    an export with remote code planted in it."""
    root = tmp_path_factory.mktemp("remote")
    marker = root / "PWNED"
    inputs = write_toy_inputs(root / "inputs", num_samples=8, seed=0)
    model = Path(inputs["model"])
    plant_remote_code(model, marker)
    recipe = load_recipe(TOY_RECIPE, [f"model.path={model}", f"data.path={inputs['data']}",
                                      f"data.image_folder={inputs['image_folder']}", f"output.dir={root / 'run'}",
                                      "train.max_steps=2", "output.save_steps=2", "train.micro_batch_size=4",
                                      "budget.warmup_steps=0", "output.heatmap_steps=0"])
    train(recipe, resume="never")
    assert not marker.exists(), "train ran the folder's code with model.trust_remote_code: false"
    handed = root / "handed" / "checkpoint-2"
    shutil.copytree(root / "run" / "checkpoint-2", handed)
    data = yaml.safe_load((handed / "recipe.yaml").read_text())
    data["model"]["trust_remote_code"] = True
    (handed / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    ckpt.write_marker(handed, 2)
    export = root / "export"
    harden(root / "run" / "checkpoint-2", export, budget=0.5)
    plant_remote_code(export, marker)
    return {"root": root, "marker": marker, "model": model, "inputs": inputs, "recipe": recipe,
            "checkpoint": handed, "export": export}


@pytest.fixture
def watched(world):
    """The inputs' digests before the test; after it, the inputs are unchanged and the code never ran."""
    folders = (world["model"], world["checkpoint"], world["export"])
    before = tree_digest(*folders)
    yield
    assert not world["marker"].exists(), "the folder's code ran"
    assert tree_digest(*folders) == before


def test_the_payload_runs_when_remote_code_is_asked_for(world, tmp_path):
    """The control: with trust_remote_code=True, harden imports the module (in a subprocess, with its own
    modules cache), so the tests below would see it run. (The folder's model class then is no visprune family:
    that refusal comes after the import.)"""
    script = ("import sys\nfrom visprune.trainer.export import harden\n"
              "harden(sys.argv[1], sys.argv[2], budget=0.5, trust_remote_code=True)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(world["checkpoint"]), str(tmp_path / "out")],
                            check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert world["marker"].read_text() == "remote code ran", result.stderr[-3000:]
    world["marker"].unlink()
    assert "no visprune family supports EvilModel" in result.stderr


def test_harden_refuses_a_checkpoint_that_asks_for_remote_code(world, tmp_path, watched):
    out = tmp_path / "out"
    with pytest.raises(HardenError, match="pass --trust-remote-code if you trust the code in"):
        harden(world["checkpoint"], out, budget=0.5)
    with pytest.raises(HardenError, match="model.trust_remote_code: true, which a checkpoint cannot turn on"):
        load_checkpoint(world["checkpoint"])
    assert not out.exists()


def test_harden_cli_refuses_a_checkpoint_that_asks_for_remote_code(world, tmp_path, capsys, watched):
    out = tmp_path / "out"
    assert main(["harden", str(world["checkpoint"]), "--out", str(out), "--budget", "0.5"]) == 2
    error = capsys.readouterr().err
    assert "--trust-remote-code" in error and "Traceback" not in error
    assert not out.exists()


def test_build_model_takes_the_explicit_flag_over_the_recipe(world, watched):
    recipe = load_recipe(TOY_RECIPE, [f"model.path={world['model']}", "model.trust_remote_code=true"])
    model, _ = build_model(recipe, trust_remote_code=False)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    with pytest.raises(TypeError, match="True or False"):
        build_model(recipe, trust_remote_code="false")  # a truthy string is no answer


def test_exported_folders_never_run_their_code_by_default(world, watched):
    model = load_pruned(world["export"])
    assert model.visprune_plan is not None and type(model).__name__ == "LlavaForConditionalGeneration"
    model, processor = load_for_eval(world["export"])
    assert type(processor).__name__ == "LlavaProcessor"
    result = evaluate_dir(world["export"], world["inputs"]["data"], world["inputs"]["image_folder"], batch_size=4,
                          limit=4, progress=False)
    assert result["hardened"] and result["samples"] == 4


def test_compare_never_runs_their_code_by_default(world, watched):
    from visprune.trainer.eval.compare import compare_dirs

    result = compare_dirs(world["export"], world["export"], world["inputs"]["data"], world["inputs"]["image_folder"],
                          limit=2, batch_size=2, max_new_tokens=2, repeats=1, time_samples=2, kv_samples=1,
                          progress=False)
    assert result["a"]["hardened"] and result["samples"] == 2


def test_lmms_plugin_takes_remote_code_from_model_args_only(world, watched):
    from visprune.trainer.eval.lmms_plugin import VisPrune

    for extra in ("", ",trust_remote_code=False", ",trust_remote_code=no"):
        lm = VisPrune.create_from_arg_string(f"pretrained={world['export']},device=cpu{extra}", {"batch_size": 1})
        assert lm.hardened and type(lm.model).__name__ == "LlavaForConditionalGeneration"


def test_load_pruned_takes_the_flag_only_as_a_real_bool(world, watched):
    with pytest.raises(TypeError, match="True or False"):
        load_pruned(world["export"], trust_remote_code="false")  # truthy: would run the code
    with pytest.raises(TypeError, match="True or False"):
        load_for_eval(world["export"], trust_remote_code="no")
    kwargs = {"trust_remote_code": True}
    with pytest.raises(TypeError, match="multiple values"):  # it cannot ride along in the kwargs a second time
        load_pruned(world["export"], trust_remote_code=False, **kwargs)


def test_a_folder_only_its_own_code_can_load_is_a_clear_refusal(world, tmp_path, watched):
    folder = tmp_path / "unknown-type"
    shutil.copytree(world["export"], folder)
    plant_remote_code(folder, world["marker"], model_type="evil_llava")
    with pytest.raises(ValueError, match="pass --trust-remote-code if you trust it"):
        load_for_eval(folder)
