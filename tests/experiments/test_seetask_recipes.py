"""The see-task demo's recipes ship inside the package: each one loads through the package, takes the
demo's overrides and round-trips; a bad demo size is refused before anything is written."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml
from visprune.experiments.seetask import demo
from visprune.trainer.config import load_recipe, recipe_to_dict, save_recipe


@pytest.mark.parametrize("name", demo.RECIPE_NAMES)
def test_packaged_recipe_loads_and_round_trips(tmp_path, name):
    packaged = resources.files("visprune.experiments.seetask") / "recipes" / name
    assert packaged.is_file(), name
    recipe = demo.load_demo_recipe(name, ["train.max_steps=20", "budget.warmup_steps=3", f"output.dir={tmp_path / 'run'}"])
    assert recipe.train.max_steps == 20 and recipe.output.dir == str(tmp_path / "run")
    assert recipe.model.family == "llava" and recipe.distributed.zero_stage == 0
    saved = tmp_path / "recipe.yaml"
    save_recipe(recipe, saved)
    assert load_recipe(saved) == recipe
    assert yaml.safe_load(saved.read_text()) == recipe_to_dict(recipe)


def test_recipe_names_list_every_packaged_recipe():
    packaged = resources.files("visprune.experiments.seetask") / "recipes"
    assert sorted(p.name for p in packaged.iterdir() if p.name.endswith(".yaml")) == sorted(demo.RECIPE_NAMES)


def test_visprune_recipe_learns_gates_and_finetune_recipe_does_not():
    prune = demo.load_demo_recipe("visprune.yaml")
    finetune = demo.load_demo_recipe("finetune.yaml")
    assert prune.gates.heads and prune.gates.visual_skip and prune.gates.visual_mlp and prune.distill.enabled
    assert not (finetune.gates.heads or finetune.gates.visual_skip or finetune.gates.visual_mlp)
    assert finetune.lora == prune.lora  # the baselines get visprune's LoRA budget


def test_unknown_size_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="size must be one of"):
        demo.run_demo(tmp_path / "out", size="huge", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size, select, finalists", [("full", 8, 3), ("full", 2, 2), ("ci", 8, 1), ("full", 0, None)])
def test_demo_runs_finalists_only_where_the_run_has_room_for_them(tmp_path, size, select, finalists):
    """The demo's prune run: the recipe's finalists (at most --select), none in a run too short to try them
    (the ci size), no plan_select at all with --select 0."""
    from visprune.modeling import TokenLayout

    cfg = demo.DemoConfig(out=tmp_path, size=size, select=select)
    steps = cfg.scale.prune_steps
    overrides = demo.visprune_overrides(cfg, TokenLayout(system=3, num_images=1, image_grid=(9, 9), text=16), 0.12)
    select_cfg = demo.load_demo_recipe("visprune.yaml", [*overrides, f"train.max_steps={steps}"]).plan_select
    if finalists is None:
        assert select_cfg.at is None
        return
    assert select_cfg.finalists == finalists and select_cfg.candidates == select
    assert (select_cfg.trial_steps(steps) > 0) == (finalists > 1)
