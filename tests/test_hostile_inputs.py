"""Hostile and careless inputs through the real CLI, in subprocesses (`python -m visprune.trainer.cli`): code
from a checkpoint never runs, nothing a user made is lost, resources stay bounded, no silent wrong result,
no raw traceback. Every case checks the exit code, one `error:` line naming the input, no traceback on
stderr and, hashed before and after, that no file outside the command's output changed. The per-area
modules (tests/trainer/test_parsers_hostile.py, test_no_file_lost.py, test_remote_code.py,
tests/data_prep/test_data_hostile.py) try many more variants in-process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

TOY_RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "toy" / "flops25.yaml")
TINY_RUN = ["train.max_steps=2", "train.micro_batch_size=2", "output.save_steps=2", "budget.warmup_steps=0",
            "output.heatmap_steps=0"]


def tree_digest(*folders: Path) -> dict[str, str]:
    """Every file and link below `folders` -> sha256 of its content (or its link target)."""
    digest = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_symlink():
                digest[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                digest[str(path)] = "dir"
    return digest


def run_cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "visprune.trainer.cli", *map(str, args)], capture_output=True,
                          check=False, text=True, timeout=timeout, env=environment)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """The run failed with `code`, stderr has exactly one `error:` line holding every fragment, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy inputs, a 2-step run with its checkpoint, and a hardened export; built in-process once."""
    from visprune.data_prep.toy import write_toy_inputs
    from visprune.trainer.cli import main

    root = tmp_path_factory.mktemp("hostile")
    inputs = write_toy_inputs(root / "inputs", num_samples=16, seed=0)
    run = root / "run"
    assert main(["train", TOY_RECIPE, f"model.path={inputs['model']}", f"data.path={inputs['data']}",
                 f"data.image_folder={inputs['image_folder']}", f"output.dir={run}", *TINY_RUN]) == 0
    export = root / "export"
    assert main(["harden", str(run / "checkpoint-2"), "--out", str(export), "--budget", "0.5"]) == 0
    return {"root": root, "inputs": inputs, "run": run, "checkpoint": run / "checkpoint-2", "export": export,
            "model": Path(inputs["model"])}


@pytest.fixture
def env(tmp_path):
    return {"VISPRUNE_LOG_DIR": str(tmp_path / "logs")}


def recipe_args(world, out: Path, *overrides: str) -> list[str]:
    inputs = world["inputs"]
    return ["train", TOY_RECIPE, f"model.path={inputs['model']}", f"data.path={inputs['data']}",
            f"data.image_folder={inputs['image_folder']}", f"output.dir={out}", *TINY_RUN, *overrides]


# ---- code from a checkpoint never runs --------------------------------------------------------------------

def test_a_checkpoint_cannot_turn_on_remote_code(world, tmp_path, env):
    """A copied checkpoint whose recipe asks for remote code of a model folder holding an `auto_map` module
    (its marker re-written, as an attacker would): harden refuses without --trust-remote-code and the
    module never runs."""
    from visprune.trainer import checkpoints as ckpt

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    pwned = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(pwned)!r}, 'w').close()\n"
                                   "from transformers import LlavaConfig as EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(world["checkpoint"], checkpoint)
    recipe = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    recipe["model"].update(path=str(model), trust_remote_code=True)
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ckpt.write_marker(checkpoint, 2)
    before = tree_digest(model, checkpoint)
    result = run_cli("harden", checkpoint, "--out", tmp_path / "out", env=env)
    assert_refused(result, "--trust-remote-code")
    assert not pwned.exists() and not (tmp_path / "out").exists()
    assert tree_digest(model, checkpoint) == before


def test_a_tampered_checkpoint_is_refused_before_it_is_read(world, tmp_path, env):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(world["checkpoint"], checkpoint)
    gates = checkpoint / "gates.safetensors"
    data = bytearray(gates.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    gates.write_bytes(bytes(data))
    before = tree_digest(checkpoint)
    assert_refused(run_cli("harden", checkpoint, "--out", tmp_path / "out", env=env), "gates.safetensors")
    assert tree_digest(checkpoint) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, fragment", [
    ("{", "plan_select.json: not valid JSON"),
    ('{"plan": 1}', "keys plan, budget, step"),
    (json.dumps({"plan": {"format": "visprune-plan/1", "family": "llava", "window": 5, "num_layers": 3,
                          "num_heads": 4, "layers": [{"heads": [9], "mlp": True}] + [{"heads": [], "mlp": False}] * 2},
                 "budget": 0.5, "step": 1}), "heads[0] = 9"),
    ("huge", "at most"),
    (json.dumps({"finalists": [], "budget": 0.5, "step": 1}), "no plan was chosen yet; harden a later checkpoint"),
])
def test_a_broken_or_hostile_plan_choice_is_refused(world, tmp_path, env, content, fragment):
    """`plan_select.json` in a checkpoint (its marker re-written, as an attacker would): harden names the file
    in one line and writes nothing."""
    from visprune.trainer import checkpoints as ckpt

    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(world["checkpoint"], checkpoint)
    choice = checkpoint / "plan_select.json"
    if content == "huge":
        choice.write_text('{"plan": "' + "x" * (17 << 20) + '"}')
    else:
        choice.write_text(content)
    ckpt.write_marker(checkpoint, 2)
    before = tree_digest(checkpoint)
    assert_refused(run_cli("harden", checkpoint, "--out", tmp_path / "out", env=env), fragment)
    assert tree_digest(checkpoint) == before and not (tmp_path / "out").exists()


STOPPED_RUN = ("output.save_steps=1", "output.save_total_limit=2")


@pytest.mark.parametrize("content, fragment", [
    ("[1, 2]", "not a plan choice visprune wrote"),
    (json.dumps({"finalists": [{"source": "scores"}], "budget": 0.5, "step": 1}), "not a plan choice visprune wrote"),
    (json.dumps({"finalists": [], "budget": 0.5, "step": 1}), "no plan, or a budget outside"),
    (json.dumps({"plan": {"format": "visprune-plan/1", "family": "llava", "window": 5, "num_layers": 3,
                          "num_heads": 4, "layers": [{"heads": [9], "mlp": True}] + [{"heads": [], "mlp": False}] * 2},
                 "chosen": "scores", "budget": 0.5, "step": 1}), "heads[0] = 9"),
    ("huge", "at most"),
])
def test_resuming_from_a_broken_or_hostile_plan_choice_is_refused(world, tmp_path, env, content, fragment):
    """`plan_select.json` in the checkpoint a run resumes from (marker re-written): one line, nothing written."""
    from visprune.trainer import checkpoints as ckpt
    from visprune.trainer.cli import main

    built, run = tmp_path / "built", tmp_path / "run"  # stopped after step 1, then copied: its recipe.yaml names
    assert main(recipe_args(world, built, *STOPPED_RUN)) == 0  # the old output.dir, and a refusal leaves it so
    shutil.copytree(built, run)
    for name in ("checkpoint-2", "final"):
        shutil.rmtree(run / name)
    checkpoint = run / "checkpoint-1"
    choice = checkpoint / "plan_select.json"
    choice.write_text('{"plan": "' + "x" * (17 << 20) + '"}' if content == "huge" else content)
    ckpt.write_marker(checkpoint, 1)
    before = tree_digest(run)
    assert_refused(run_cli(*recipe_args(world, run, *STOPPED_RUN), env=env), "plan_select.json", fragment)
    assert tree_digest(run) == before



def test_a_plan_fixed_in_training_hardens_only_at_its_budget(world, tmp_path, env):
    from visprune.trainer import checkpoints as ckpt

    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(world["checkpoint"], checkpoint)
    plan = json.loads((world["export"] / "pruning_plan.json").read_text())
    (checkpoint / "plan_select.json").write_text(json.dumps({"plan": plan, "budget": 0.5, "step": 1}))
    ckpt.write_marker(checkpoint, 2)
    assert_refused(run_cli("harden", checkpoint, "--out", tmp_path / "out", "--budget", "0.25", env=env),
                   "harden it at that budget")
    assert not (tmp_path / "out").exists()
    result = run_cli("harden", checkpoint, "--out", tmp_path / "out", "--budget", "0.5", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "pruning_plan.json").read_text())["layers"] == plan["layers"]
    assert json.loads((tmp_path / "out" / "pruning_report.json").read_text())["plan_rule"] == "selected in training"


# ---- nothing a user made is lost --------------------------------------------------------------------------

def test_harden_never_writes_over_a_folder_it_did_not_write(world, tmp_path, env):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    watched = (mine, world["model"], world["checkpoint"])
    before = tree_digest(*watched)
    assert_refused(run_cli("harden", world["checkpoint"], "--out", mine, env=env), str(mine))
    assert_refused(run_cli("harden", world["checkpoint"], "--out", mine, "--overwrite", env=env), str(mine))
    assert_refused(run_cli("harden", world["checkpoint"], "--out", world["model"], "--overwrite", env=env))
    assert tree_digest(*watched) == before


def test_train_never_mixes_two_runs(world, tmp_path, env):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = tree_digest(run, Path(world["inputs"]["model"]).parent)
    assert_refused(run_cli(*recipe_args(world, run), "--resume", "never", env=env), str(run))
    assert_refused(run_cli(*recipe_args(world, run, "budget.visual_flops=0.5"), env=env), "budget.visual_flops")
    assert tree_digest(run, Path(world["inputs"]["model"]).parent) == before


def test_prepare_overwrite_never_deletes_a_user_file(world, tmp_path, env):
    looks_prepared = tmp_path / "prepared"
    looks_prepared.mkdir()
    (looks_prepared / "visprune_data.json").write_text('{"format": "visprune-data/2"}')
    (looks_prepared / "thesis.tex").write_text("years of work")
    inputs = world["inputs"]
    before = tree_digest(looks_prepared, Path(inputs["data"]).parent)
    result = run_cli("data", "prepare", "--json", inputs["data"], "--images", inputs["image_folder"], "--processor",
                     inputs["model"], "--out", looks_prepared, "--overwrite", "--num-proc", "1", env=env)
    assert_refused(result, "thesis.tex")
    assert tree_digest(looks_prepared, Path(inputs["data"]).parent) == before


# ---- resources stay bounded --------------------------------------------------------------------------------

def test_a_yaml_bomb_is_refused_fast_and_never_printed(world, tmp_path, env):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    result = run_cli("train", bomb, env=env)
    line = assert_refused(result, str(bomb))
    assert time.perf_counter() - started < 60 and len(line) < 600 and "lol, lol" not in line


def test_a_decompression_bomb_is_a_named_rejection(world, tmp_path, env):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("1", (12_000, 12_000)).save(images / "huge.png", optimize=True)  # 144 megapixels in a small file
    assert (images / "huge.png").stat().st_size < 2 << 20
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "huge", "image": "huge.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]}]))
    before = tree_digest(images)
    result = run_cli("data", "check", "--json", data, "--images", images, "--processor", world["inputs"]["model"],
                     env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "image_too_large" in result.stderr and "'huge'" in result.stderr
    assert "DecompressionBombWarning" not in result.stderr
    assert tree_digest(images) == before


# ---- no silent wrong result ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "fragment"), [
    (["flops", "llava-1.5-7b", "--images", "-2"], "--images"),
    (["bench", "--layers", "0"], "--layers"),
    (["harden", "x", "--out", "y", "--budget", "1.5"], "--budget"),
    (["eval", "x", "--data", "y", "--batch-size", "0"], "--batch-size"),
    (["eval", "x", "--data", "y", "--limit", "-1"], "--limit"),
    (["data", "check", "--json", "x", "--processor", "y", "--max-length", "0"], "--max-length"),
])
def test_out_of_range_options_are_refused(args, fragment, env):
    assert_refused(run_cli(*args, env=env), fragment)


def test_recipe_values_that_cannot_train_are_refused(world, tmp_path, env):
    before = tree_digest(world["model"])
    assert_refused(run_cli(*recipe_args(world, tmp_path / "run", "distill.temperature=0"), env=env),
                   "distill.temperature")
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text(Path(TOY_RECIPE).read_text() + "window: 5\n")
    assert_refused(run_cli("train", duplicate, env=env), "window")
    assert tree_digest(world["model"]) == before and not (tmp_path / "run").exists()


def test_plan_select_data_that_cannot_be_read_is_refused_before_training(world, tmp_path, env):
    broken = tmp_path / "val.json"
    broken.write_text('[{"id": "a", "conversations": ')
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    before = tree_digest(world["model"], Path(world["inputs"]["data"]).parent)
    for data, fragment in ((tmp_path / "missing.json", "missing.json"), (broken, "val.json"), (empty, "empty.json")):
        out = tmp_path / f"run-{data.stem}"
        assert_refused(run_cli(*recipe_args(world, out, "plan_select.at=0.5", f"plan_select.data={data}"), env=env),
                       fragment)
        assert not list(out.glob("checkpoint-*"))
    assert tree_digest(world["model"], Path(world["inputs"]["data"]).parent) == before


def test_a_plan_of_another_family_and_a_config_without_layers(world, tmp_path, env):
    from visprune.modeling import Plan

    plan = json.loads((world["export"] / "pruning_plan.json").read_text())
    plan["family"] = "qwen2_vl"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert_refused(run_cli("harden", world["checkpoint"], "--out", tmp_path / "out", "--plan", tmp_path / "plan.json",
                           env=env), "qwen2_vl")
    assert not (tmp_path / "out").exists()
    config = json.loads((world["model"] / "config.json").read_text())
    del config["text_config"]["num_hidden_layers"]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    result = run_cli("flops", tmp_path / "model", env=env)  # costed as transformers builds it, never silently
    assert result.returncode == 0 and "does not state text_config.num_hidden_layers" in result.stderr
    config["text_config"]["num_hidden_layers"] = 10**6
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    assert_refused(run_cli("flops", tmp_path / "model", env=env), "num_hidden_layers")
    assert Plan  # the plan module is importable beside the CLI


def test_duplicate_keys_in_data_json_are_refused(world, tmp_path, env):
    data = tmp_path / "data.json"
    data.write_text('[{"id": "a", "id": "b", "conversations": [{"from": "human", "value": "hi"}, '
                    '{"from": "gpt", "value": "hello"}]}]')
    result = run_cli("data", "check", "--json", data, "--processor", world["inputs"]["model"], env=env)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr
    assert "duplicate" in result.stderr and "'id'" in result.stderr


# ---- no raw traceback ----------------------------------------------------------------------------------------

def test_file_system_mistakes_are_one_line(world, tmp_path, env):
    inputs = world["inputs"]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [
        (["data", "check", "--json", tmp_path, "--processor", inputs["model"]], str(tmp_path)),  # a folder as the JSON
        (["data", "prepare", "--json", inputs["data"], "--images", inputs["image_folder"], "--processor",
          inputs["model"], "--out", a_file / "out", "--num-proc", "1"], str(a_file)),  # a file where a folder belongs
        (["eval", tmp_path / "no-such-model", "--data", inputs["data"]], "no-such-model"),
        (["harden", tmp_path / "no-such-checkpoint", "--out", tmp_path / "out"], "no-such-checkpoint"),
        (recipe_args(world, tmp_path / "run", f"model.path={tmp_path / 'missing'}"), "missing"),
        (recipe_args(world, tmp_path / "run2", "lora.targets=[nothing_matches]"), "lora.targets"),
    ]
    before = tree_digest(Path(inputs["data"]).parent, world["model"], a_file)
    for args, fragment in cases:
        assert_refused(run_cli(*args, env=env), fragment)
    assert tree_digest(Path(inputs["data"]).parent, world["model"], a_file) == before


def test_an_unexpected_error_is_short_with_a_log_and_debug_prints_it(tmp_path, env):
    """A bug (not a user error) is exit code 1: one line naming the log file that holds the traceback."""
    script = ("import sys\nimport visprune.trainer.cli as cli\n"
              "def boom(args):\n    raise RuntimeError('an internal bug')\n"
              "cli.run_demo = boom\nsys.exit(cli.main(sys.argv[1:]))\n")
    environment = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", script, "demo", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=120, env=environment, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if "internal error" in line)
    assert "RuntimeError: an internal bug" in line
    log = Path(line.split("traceback in ")[1].split(";")[0])
    assert log.is_file() and "Traceback" in log.read_text() and log.parent == Path(env["VISPRUNE_LOG_DIR"])
    debug = subprocess.run([sys.executable, "-c", script, "demo", "--debug", "--out", str(tmp_path / "demo")],
                           capture_output=True, text=True, timeout=120, env=environment, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
