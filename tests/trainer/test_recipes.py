"""Recipes: every shipped YAML loads, bad recipes and overrides fail naming the file and dotted key,
save/load round-trips, and the launch scripts and DeepSpeed configs are well-formed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from visprune.trainer.config import (
    LoraConfig,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_to_dict,
    save_recipe,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + [REPO / "launch" / "slurm.sbatch"]

MINIMAL = {
    "model": {"path": "runs/toy-inputs/model"},
    "data": {"path": "train.json"},
    "budget": {"visual_flops": 0.25},
    "train": {"max_steps": 10},
    "output": {"dir": "runs/x"},
}


def write_recipe(tmp_path: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe), encoding="utf-8")
    return path


def with_value(dotted: str, value) -> dict:
    """MINIMAL with one dotted key set (sections created as needed)."""
    recipe = json.loads(json.dumps(MINIMAL))
    *sections, last = dotted.split(".")
    node = recipe
    for name in sections:
        node = node.setdefault(name, {})
    node[last] = value
    return recipe


def load_error(path: Path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


# ---- shipped recipes --------------------------------------------------------------------------


def test_recipes_exist():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"toy/flops25.yaml", "toy/flops12.yaml", "llava-1.5-7b/flops25.yaml", "llava-1.5-7b/flops12.yaml",
            "llava-1.5-13b/flops25.yaml", "llava-1.5-13b/flops12.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    budget = {"flops25": 0.25, "flops12": 0.12}.get(path.stem)
    if budget is not None:
        assert recipe.budget.visual_flops == budget
        assert recipe.output.dir.endswith(path.stem)


def test_llava_recipes_match_llava15_lora():
    for size, zero, mbs, accum in (("7b", 2, 4, 4), ("13b", 3, 2, 8)):
        for stem in ("flops25", "flops12"):
            recipe = load_recipe(REPO / "recipes" / f"llava-1.5-{size}" / f"{stem}.yaml")
            assert recipe.model.path == f"llava-hf/llava-1.5-{size}-hf"
            assert recipe.model.dtype == "bf16" and recipe.window == 5
            assert recipe.lora == LoraConfig(rank=128, alpha=256, dropout=0.05)
            assert (recipe.optim.lr, recipe.optim.scheduler, recipe.optim.warmup_ratio) == (2e-4, "cosine", 0.03)
            assert (recipe.train.micro_batch_size, recipe.train.grad_accum) == (mbs, accum)
            assert recipe.distributed.zero_stage == zero
            assert recipe.distill.enabled == (stem == "flops12")
            assert recipe.output.dir == f"runs/llava15-{size}-{stem}"


# family recipes: (folder, family, hub id of the native transformers class, run folder prefix)
FAMILY_RECIPES = [("qwen2-vl-7b", "qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct", "qwen2vl-7b"),
                  ("internvl3-8b", "internvl", "OpenGVLab/InternVL3-8B-hf", "internvl3-8b"),
                  ("llava-next-7b", "llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf", "llavanext-7b")]


@pytest.mark.parametrize("folder, family, hub_id, run", FAMILY_RECIPES, ids=[r[0] for r in FAMILY_RECIPES])
def test_family_recipes(folder, family, hub_id, run):
    from visprune.modeling import BUILTIN_MODELS
    from visprune.modeling.families import FAMILIES

    assert family in FAMILIES and BUILTIN_MODELS[folder].family == family  # `visprune flops <folder>` exists
    for stem, budget in (("flops25", 0.25), ("flops12", 0.12)):
        recipe = load_recipe(REPO / "recipes" / folder / f"{stem}.yaml")
        assert (recipe.model.family, recipe.model.path, recipe.model.dtype) == (family, hub_id, "bf16")
        assert recipe.budget.visual_flops == budget and recipe.window == 5
        assert recipe.lora == LoraConfig(rank=128, alpha=256, dropout=0.05)
        assert recipe.distill.enabled == (stem == "flops12")
        assert recipe.output.dir == f"runs/{run}-{stem}"


def test_toy_recipes_are_small():
    for stem in ("flops25", "flops12"):
        recipe = load_recipe(REPO / "recipes" / "toy" / f"{stem}.yaml")
        assert recipe.model.path == "runs/toy-inputs/model" and recipe.model.dtype == "fp32"
        assert recipe.train.max_steps <= 100 and recipe.distributed.zero_stage == 0
        assert recipe.lora is not None and recipe.lora.rank == 8
        assert not recipe.train.gradient_checkpointing


# ---- schema errors name the file and the dotted key --------------------------------------------


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL))
    assert recipe.window == 5 and recipe.lora == LoraConfig() and recipe.distributed.zero_stage == 0


def test_unknown_key(tmp_path):
    path = write_recipe(tmp_path, with_value("lora.rnak", 8))
    message = load_error(path)
    assert "unknown key 'lora.rnak' (known: alpha, dropout, rank, targets)" in message


def test_unknown_top_level_key(tmp_path):
    assert "unknown key 'output_dir'" in load_error(write_recipe(tmp_path, with_value("output_dir", "runs/x")))


def test_missing_required_key(tmp_path):
    recipe = with_value("budget.warmup_steps", 3)
    del recipe["budget"]["visual_flops"]
    assert "missing required key 'budget.visual_flops'" in load_error(write_recipe(tmp_path, recipe))
    recipe = dict(MINIMAL)
    del recipe["train"]
    assert "missing required key 'train'" in load_error(write_recipe(tmp_path, recipe))


@pytest.mark.parametrize("dotted, value, expected", [
    ("budget.visual_flops", "a lot", "budget.visual_flops: expected float, got str ('a lot')"),
    ("train.max_steps", 2.5, "train.max_steps: expected int, got float (2.5)"),
    ("train.max_steps", True, "train.max_steps: expected int, got bool (True)"),
    ("optim.lr", False, "optim.lr: expected float, got bool (False)"),
    ("gates.heads", "yes please", "gates.heads: expected bool, got str"),
    ("model.path", None, "model.path: expected str, got null"),
    ("window", "5", "window: expected int or list of int or null, got str ('5')"),
    ("window", [3, "5", 5], "window[1]: expected int, got str ('5')"),
    ("lora.targets", "q_proj", "lora.targets: expected list of str, got str ('q_proj')"),
    ("lora.targets", ["q_proj", 3], "lora.targets[1]: expected str, got int (3)"),
    ("gates", [1, 2], "gates: expected a mapping, got list ([1, 2])"),
    ("lora", 8, "lora: expected a mapping or null, got int (8)"),
])
def test_wrong_type(tmp_path, dotted, value, expected):
    assert expected in load_error(write_recipe(tmp_path, with_value(dotted, value)))


@pytest.mark.parametrize("dotted, value", [
    ("budget.visual_flops", 1.5),
    ("budget.visual_flops", 0),
    ("window", 4),
    ("distributed.zero_stage", 1),
    ("model.dtype", "fp16"),
    ("train.max_steps", 0),
    ("lora.rank", 0),
    ("plan_loss.candidates", 0),
    ("plan_select.at", 1.0),
    ("plan_select.candidates", 65),
    ("plan_select.samples", 0),
    ("gates.mlp_channel_block", 0),
    ("gates.visual_freeze", "yes"),
    ("gates.window_rings", "yes"),
    ("plan_select.finalists", 0),
    ("plan_select.finalists", 9),  # more than plan_select.candidates (8)
    ("plan_select.trial", -0.1),
    ("plan_select.trial", 1.0),
])
def test_bad_value(tmp_path, dotted, value):
    message = load_error(write_recipe(tmp_path, with_value(dotted, value)))
    assert dotted in message and str(value) in message


def test_plan_select_before_the_budget_is_reached_or_with_a_fixed_plan_is_refused(tmp_path):
    recipe = with_value("plan_select.at", 0.2)
    recipe["budget"]["warmup_steps"] = 5
    assert "plan_select.at 0.2 chooses the plan at step 2, before the budget reaches its target" in load_error(
        write_recipe(tmp_path, recipe))
    recipe = with_value("plan_select.at", 0.5)
    recipe["plan"] = "plan.json"
    assert "set one of them to null" in load_error(write_recipe(tmp_path, recipe))
    assert load_recipe(write_recipe(tmp_path, with_value("plan_select.at", 0.5))).plan_select.step(10) == 5


def test_plan_select_finalists_need_a_trial_that_fits_the_run(tmp_path):
    def recipe_with(**select):  # MINIMAL: 10 steps, the plan scored at step 5
        recipe = with_value("plan_select.at", 0.5)
        recipe["plan_select"].update(select)
        return write_recipe(tmp_path, recipe)

    assert "set both (e.g. 3 and 0.15) or neither" in load_error(recipe_with(finalists=3))
    assert "set both (e.g. 3 and 0.15) or neither" in load_error(recipe_with(trial=0.2))
    assert "is 2 steps for 3 finalists: give each at least one step" in load_error(recipe_with(finalists=3, trial=0.2))
    assert ("plan_select.trial 0.5 (5 steps from step 5) leaves no step of train.max_steps 10"
            in load_error(recipe_with(finalists=2, trial=0.5)))
    select = load_recipe(recipe_with(finalists=2, trial=0.4)).plan_select
    assert (select.finalists, select.trial_steps(10), select.step(10)) == (2, 4, 5)


def test_a_spatio_temporal_window_reaches_the_gates_and_round_trips(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, with_value("window", [3, 5, 5])))
    assert (recipe.gates.window, recipe.gates.temporal_window) == (5, 3) and recipe.window == [3, 5, 5]
    save_recipe(recipe, tmp_path / "saved.yaml")
    assert load_recipe(tmp_path / "saved.yaml") == recipe
    assert "temporal_window" not in (tmp_path / "saved.yaml").read_text()  # the gates' copy of `window` is not written
    plain = load_recipe(write_recipe(tmp_path, with_value("window", 3)))
    assert (plain.gates.window, plain.gates.temporal_window) == (3, 1)


def test_int_accepted_for_float(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, with_value("budget.visual_flops", 1)))
    assert recipe.budget.visual_flops == 1.0 and isinstance(recipe.budget.visual_flops, float)


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `2e-4` as a string; a float field takes it as the number it means
    path = write_recipe(tmp_path, yaml.safe_dump(MINIMAL) + "optim: {lr: 2e-4}\n")
    assert load_recipe(path).optim.lr == 2e-4


def test_not_a_mapping(tmp_path):
    assert "must be a mapping" in load_error(write_recipe(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path):
    assert "cannot read recipe" in load_error(tmp_path / "nope.yaml")


def test_python_tags_are_rejected(tmp_path):
    marker = tmp_path / "executed"
    path = write_recipe(tmp_path, f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    message = load_error(path)
    assert "yaml.safe_load" in message
    assert not marker.exists()


def test_invalid_yaml(tmp_path):
    load_error(write_recipe(tmp_path, "model: {path: [unclosed\n"))


# ---- overrides --------------------------------------------------------------------------------


def test_overrides(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["budget.visual_flops=0.12", "window=null", "lora.targets=[q_proj, v_proj]",
                                "train.gradient_checkpointing=false", "output.dir=runs/y", "optim.lr=1e-4"])
    assert recipe.budget.visual_flops == 0.12 and recipe.window is None
    assert recipe.lora.targets == ["q_proj", "v_proj"]
    assert recipe.train.gradient_checkpointing is False and recipe.output.dir == "runs/y"
    assert recipe.optim.lr == 1e-4


def test_override_lora_null_means_full_finetuning(tmp_path):
    assert load_recipe(write_recipe(tmp_path, MINIMAL), ["lora=null"]).lora is None


def test_override_creates_section_from_defaults(tmp_path):
    path = write_recipe(tmp_path, with_value("lora", None))
    assert load_recipe(path).lora is None
    recipe = load_recipe(path, ["lora.rank=8"])
    assert recipe.lora == LoraConfig(rank=8)
    # a section absent from the file is created too
    assert load_recipe(path, ["distill.enabled=true"]).distill.enabled is True


def test_overrides_apply_in_order(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL), ["lora=null", "lora.alpha=32"])
    assert recipe.lora == LoraConfig(alpha=32)


@pytest.mark.parametrize("override, expected", [
    ("lora.rnak=8", "unknown key 'lora.rnak' (known: alpha, dropout, rank, targets)"),
    ("learning_rate=1", "unknown key 'learning_rate'"),
    ("window.size=3", "unknown key 'window.size'"),
    ("budget.visual_flops.x=1", "unknown key 'budget.visual_flops.x'"),
])
def test_override_unknown_key(tmp_path, override, expected):
    assert expected in load_error(write_recipe(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize("override", ["budget.visual_flops", "=3", "budget..visual_flops=1", ""])
def test_malformed_override(tmp_path, override):
    assert "dotted.key=value" in load_error(write_recipe(tmp_path, MINIMAL), [override])


def test_override_values_are_validated(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    assert "budget.visual_flops must be in (0, 1], got 1.5" in load_error(path, ["budget.visual_flops=1.5"])
    assert "train.max_steps: expected int, got bool (True)" in load_error(path, ["train.max_steps=true"])
    assert "lora.rank: expected int, got str ('eight')" in load_error(path, ["lora.rank=eight"])


def test_overrides_must_be_a_list(tmp_path):
    with pytest.raises(TypeError):
        load_recipe(write_recipe(tmp_path, MINIMAL), "window=3")


# ---- save / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_save_load_round_trip(tmp_path, path):
    recipe = load_recipe(path, ["optim.lr=1e-5"])
    saved = tmp_path / "out" / "recipe.yaml"
    save_recipe(recipe, saved)
    assert load_recipe(saved) == recipe
    assert yaml.safe_load(saved.read_text()) == recipe_to_dict(recipe)
    assert list(recipe_to_dict(recipe))[:3] == ["model", "data", "budget"]  # schema order, not sorted


def test_round_trip_full_finetuning(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL), ["lora=null"])
    save_recipe(recipe, tmp_path / "saved.yaml")
    assert load_recipe(tmp_path / "saved.yaml") == recipe and recipe_to_dict(recipe)["lora"] is None


# ---- launch scripts and DeepSpeed configs -----------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_syntax(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", sorted((REPO / "launch").glob("*.sh")), ids=lambda p: p.name)
def test_launch_script_usage(script):
    result = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def run_dry(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": "",
                "PYTHON": "python3", **env}
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], check=False, capture_output=True,
                          text=True, env=full_env, cwd=REPO)


def test_train_local_command():
    result = run_dry("train_local.sh", "recipes/toy/flops25.yaml", "train.max_steps=5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python3", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                                     "--nproc_per_node", "2", "-m", "visprune.trainer.cli", "train",
                                     "recipes/toy/flops25.yaml", "train.max_steps=5"]
    assert "--nproc_per_node 3 " in run_dry("train_local.sh", "recipes/toy/flops25.yaml",
                                            CUDA_VISIBLE_DEVICES="0,1,2").stdout
    assert "--nproc_per_node 1 " in run_dry("train_local.sh", "recipes/toy/flops25.yaml", NPROC="1").stdout


def test_train_multinode_needs_master_addr():
    result = run_dry("train_multinode.sh", "recipes/toy/flops25.yaml", NNODES="2", NODE_RANK="1")
    assert result.returncode != 0 and "MASTER_ADDR" in result.stderr
    result = run_dry("train_multinode.sh", "recipes/toy/flops25.yaml", NNODES="2", NODE_RANK="1",
                     MASTER_ADDR="10.0.0.1")
    assert result.returncode == 0, result.stderr
    assert "--nnodes 2 --node_rank 1 " in result.stdout and "--master_addr 10.0.0.1 --master_port 29500" in result.stdout


def test_train_deepspeed_command():
    result = run_dry("train_deepspeed.sh", "recipes/toy/flops25.yaml")
    assert result.returncode == 0, result.stderr
    assert "--hostfile hostfile" in result.stdout and "--no_local_rank --module visprune.trainer.cli train" in result.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json(stage):
    config = json.loads((REPO / "launch" / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
    assert config["bf16"]["enabled"] == "auto"
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
