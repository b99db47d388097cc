"""Hostile and careless recipes, plans and model configs: each is refused as one short line naming the file
and the key (alias bombs, duplicate keys, oversized files, out-of-range values, NaN, missing config keys),
fast, without running anything and without costing or training with a silently wrong value."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_llava
from test_recipes import MINIMAL, with_value
from visprune.modeling import PLAN_FORMAT, LayerPlan, Plan, PlanError
from visprune.modeling import flops as flops_module
from visprune.modeling import plan as plan_module
from visprune.modeling.families import FAMILIES
from visprune.trainer import config as config_module
from visprune.trainer.cli import main
from visprune.trainer.config import RecipeError, load_recipe, save_recipe

MINIMAL_TEXT = yaml.safe_dump(MINIMAL, sort_keys=False)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "processors"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path, overrides=(), limit: int = 400) -> str:
    """The RecipeError of `path`: one line, starting with the path, at most `limit` characters."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) <= limit, message
    return message


def cli_error(capsys, argv: list[str]) -> str:
    """The one stderr line of a refused `visprune` call (exit code 2)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"visprune {argv[0]}: error: "), captured.err
    return captured.err


# ---- the YAML reader: alias bombs, duplicate keys, size, nesting -----------------------------------------------

BILLION_LAUGHS = "\n".join(['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]) + "\n"


def test_billion_laughs_is_refused_fast_and_never_printed(tmp_path):
    path = write(tmp_path, BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 2000
    started = time.perf_counter()
    message = refused(path)
    assert time.perf_counter() - started < 0.5
    assert f"more than {config_module.MAX_YAML_NODES} values" in message and "lol" not in message


def test_billion_laughs_as_an_override_is_refused(tmp_path):
    flow = "{" + BILLION_LAUGHS.strip().replace("\n", ", ") + "}"
    message = refused(write(tmp_path, MINIMAL_TEXT), [f"lora={flow}"])
    assert "value is not valid YAML" in message and "values with aliases expanded" in message


def test_an_alias_used_too_often_is_refused(tmp_path):
    uses = ", ".join(["*t"] * (config_module.MAX_ALIAS_USES + 1))
    path = write(tmp_path, MINIMAL_TEXT + f"lora: {{targets: &t [q_proj]}}\nx: [{uses}]\n")
    assert f"alias *t is used more than {config_module.MAX_ALIAS_USES} times" in refused(path)


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    message = refused(write(tmp_path, MINIMAL_TEXT + "lora: &x {targets: [*x]}\n"))
    assert "lora.targets[0]: alias *x is used inside its own anchor" in message


def test_aliases_and_merge_keys_within_bounds_still_load(tmp_path):
    text = MINIMAL_TEXT + "lora: {targets: &t [q_proj, v_proj]}\noptim: {<<: {lr: 1.0e-3, gate_lr: 0.1}, lr: 3.0e-4}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.lora.targets == ["q_proj", "v_proj"] and (recipe.optim.lr, recipe.optim.gate_lr) == (3e-4, 0.1)


def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path):
    path = write(tmp_path, "model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert f"nested deeper than {config_module.MAX_YAML_DEPTH} levels" in refused(path)


@pytest.mark.parametrize("text, fragment", [
    (MINIMAL_TEXT + "train: {max_steps: 3}\n", "line 11, column 1: duplicate key 'train' (first at line 7)"),
    ("model:\n  path: a\n  path: b\n" + MINIMAL_TEXT.split("\n", 2)[2], "duplicate key 'model.path' (first at line 2)"),
    (MINIMAL_TEXT + "lora: {rank: 8, alpha: 16, rank: 4}\n", "duplicate key 'lora.rank' (first at line 11)"),
    (MINIMAL_TEXT + "window: 5\nwindow: 3\n", "duplicate key 'window' (first at line 11)"),
])
def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path, text, fragment):
    assert fragment in refused(write(tmp_path, text))


def test_an_oversized_recipe_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as file:  # sparse: 1 MB + 1 byte that is never parsed
        file.truncate(config_module.MAX_RECIPE_BYTES + 1)
    started = time.perf_counter()
    assert f"at most {config_module.MAX_RECIPE_BYTES} bytes" in refused(path)
    assert time.perf_counter() - started < 0.5
    big = MINIMAL_TEXT + "# " + "x" * config_module.MAX_RECIPE_BYTES + "\n"
    assert "longer than" in refused(write(tmp_path, MINIMAL_TEXT), [f"model.path={big}"])


@pytest.mark.parametrize("text, fragment", [
    (b"\xff\xfe\x00bad", "must be UTF-8 text"),
    (b"model: !!python/object/apply:os.system ['true']\n", "python/object/apply:os.system"),
    (b"model: {path: [unclosed\n", "line 2, column 1"),
    (b"model: {path: m}\n---\nmodel: {path: n}\n", "expected a single document"),
    (("train: {max_steps: " + "9" * 5000 + "}\n").encode(),
     "line 1, column 20: train.max_steps: Exceeds the limit (4300 digits)"),
    ((MINIMAL_TEXT + "k" * 100_000 + ": 1\n").encode(), "could not find expected ':'"),
])
def test_unreadable_yaml_is_one_short_line(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    assert fragment in refused(path)


def test_long_user_values_are_shortened_in_messages(tmp_path):
    long = "x" * 100_000
    assert "unknown key 'xxx" in refused(write(tmp_path, MINIMAL_TEXT + f"? {long}\n: 1\n"))  # an explicit key
    message = refused(write(tmp_path, MINIMAL_TEXT + "".join(f"k{i}: 1\n" for i in range(3000))))
    assert "unknown key 'k0' and 2999 more" in message
    assert "..." in refused(write(tmp_path, MINIMAL_TEXT), [f"{long}=1"])
    assert "..." in refused(write(tmp_path, yaml.safe_dump(with_value("model.dtype", long))))
    assert "..." in refused(write(tmp_path, yaml.safe_dump(with_value("budget.visual_flops", ["x" * 500] * 100))))


def test_a_long_digit_string_in_a_float_field_is_refused_fast(tmp_path):
    path = write(tmp_path, yaml.safe_dump(with_value("optim.lr", "1" * 30_000 + "x")))
    started = time.perf_counter()  # `\d+\.?\d*` backtracks quadratically here: about 10 s
    message = refused(path)
    assert "optim.lr: expected float, got str" in message and time.perf_counter() - started < 1.0


def test_an_int_too_large_for_a_float_is_refused(tmp_path):
    message = refused(write(tmp_path, MINIMAL_TEXT.replace("visual_flops: 0.25", "visual_flops: " + "9" * 400)))
    assert "budget.visual_flops must be a finite number" in message


def test_save_recipe_round_trips_non_ascii_at_the_same_size(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL_TEXT), ["model.path=modèles/llava-ü"])
    save_recipe(recipe, tmp_path / "saved.yaml")
    assert "modèles/llava-ü" in (tmp_path / "saved.yaml").read_text(encoding="utf-8")
    assert load_recipe(tmp_path / "saved.yaml") == recipe


# ---- range checks: through load_recipe and through `visprune train` ------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    ("distill.temperature", 0, "distill.temperature must be finite and > 0, got 0"),
    ("distill.temperature", -1.0, "distill.temperature must be finite and > 0"),
    ("distill.temperature", INF, "distill.temperature must be finite and > 0, got inf"),
    ("distill.weight", -0.5, "distill.weight must be finite and >= 0"),
    ("optim.lr", 0, "optim.lr must be finite and > 0"),
    ("optim.lr", NAN, "optim.lr must be finite and > 0, got nan"),
    ("optim.lr", INF, "optim.lr must be finite and > 0, got inf"),
    ("optim.lr", "1e999", "optim.lr must be finite and > 0, got inf"),
    ("optim.gate_lr", -0.05, "optim.gate_lr must be finite and > 0"),
    ("optim.lambda_lr", 0.0, "optim.lambda_lr must be finite and > 0"),
    ("optim.gate_momentum", 1.0, "optim.gate_momentum must be in [0, 1)"),
    ("optim.lambda_momentum", -0.1, "optim.lambda_momentum must be in [0, 1)"),
    ("optim.weight_decay", -0.01, "optim.weight_decay must be finite and >= 0"),
    ("optim.warmup_ratio", 1, "optim.warmup_ratio must be in [0, 1)"),
    ("optim.max_grad_norm", 0, "optim.max_grad_norm must be finite and > 0"),
    ("optim.scheduler", "reduce_lr_on_plateau", "optim.scheduler must be one of linear, cosine"),
    ("train.logging_steps", 0, "train.logging_steps must be an integer >= 1"),
    ("train.grad_accum", 0, "train.grad_accum must be an integer >= 1"),
    ("train.seed", -1, "train.seed must be an integer in [0, 4294967295]"),
    ("train.seed", 2**32, "train.seed must be an integer in [0, 4294967295]"),
    ("train.max_steps", True, "train.max_steps: expected int, got bool"),
    ("output.save_steps", 0, "output.save_steps must be an integer >= 1"),
    ("output.save_total_limit", 0, "output.save_total_limit must be null or an integer >= 1"),
    ("output.heatmap_steps", -1, "output.heatmap_steps must be an integer >= 0"),
    ("output.dir", "", "output.dir must be a non-empty path"),
    ("budget.system_tokens", -1, "budget.system_tokens must be an integer >= 0"),
    ("budget.text_tokens", -60, "budget.text_tokens must be an integer >= 0"),
    ("budget.warmup_steps", -1, "budget.warmup_steps must be an integer >= 0"),
    ("budget.visual_flops", NAN, "budget.visual_flops must be in (0, 1], got nan"),
    ("data.num_workers", -1, "data.num_workers must be an integer >= 0"),
    ("data.max_image_pixels", 0, "data.max_image_pixels must be an integer >= 1"),
    ("data.max_image_pixels", 1.5e8, "data.max_image_pixels: expected int, got float"),
    ("data.path", "", "data.path must be a non-empty path"),
    ("data.image_folder", "", "data.image_folder must be null or a non-empty path"),
    ("lora.alpha", 0, "lora.alpha must be an integer >= 1"),
    ("lora.dropout", 1.0, "lora.dropout must be in [0, 1)"),
    ("lora.dropout", -0.1, "lora.dropout must be in [0, 1)"),
    ("lora.targets", ["q_proj", " "], "lora.targets[1] must be a module name"),
    ("gates.init_log_alpha", NAN, "gates.init_log_alpha must be a finite number, got nan"),
    ("gates.init_log_alpha", -INF, "gates.init_log_alpha must be a finite number, got -inf"),
    ("gates.backend", "eager", "gates.backend must be one of auto, sdpa, flex, got 'eager'"),
    ("model.family", "gpt2", "model.family must be one of"),
    ("model.path", "", "model.path must be a non-empty path"),
    ("model.path", "a\0b", "model.path must be a non-empty path"),
    ("plan", "", "plan must be null or a non-empty path"),
    ("window", 0, "window must be null or an odd positive integer"),
    ("window", [3, 5, 3], "window [t, h, w] must be square on the grid (h == w), got [3, 5, 3]"),
    ("window", [4, 5, 5], "window [t, h, w]: t must be an odd positive integer, got 4"),
    ("window", [3, 5], "window must be null, an odd positive integer or [t, h, w] (odd, h == w), got [3, 5]"),
    ("window", [3] * 1000, "window must be null, an odd positive integer or [t, h, w] (odd, h == w), got [3, 3,"),
]


@pytest.mark.parametrize("dotted, value, fragment", BAD_VALUES, ids=[f"{d}={v!r}"[:60] for d, v, _ in BAD_VALUES])
def test_out_of_range_values_are_refused(tmp_path, dotted, value, fragment):
    assert fragment in refused(write(tmp_path, yaml.safe_dump(with_value(dotted, value))))


@pytest.mark.parametrize("dotted, value, fragment", BAD_VALUES, ids=[f"{d}={v!r}"[:60] for d, v, _ in BAD_VALUES])
def test_out_of_range_values_are_one_line_from_the_cli(tmp_path, capsys, dotted, value, fragment):
    path = write(tmp_path, yaml.safe_dump(with_value(dotted, value)))
    line = cli_error(capsys, ["train", str(path)])
    assert f": {path}: " in line and fragment in line


def test_out_of_range_overrides_are_refused(tmp_path, capsys):
    path = write(tmp_path, MINIMAL_TEXT)
    assert "distill.temperature must be finite and > 0, got 0.0" in refused(path, ["distill.temperature=0"])
    assert "optim.lr must be finite and > 0, got nan" in refused(path, ["optim.lr=.nan"])
    assert "distill.temperature" in cli_error(capsys, ["train", str(path), "distill.temperature=0"])


@pytest.mark.parametrize("dotted, value", [
    ("optim.warmup_ratio", 0), ("optim.gate_momentum", 0.9), ("output.save_total_limit", None),
    ("output.heatmap_steps", 0), ("budget.system_tokens", 0), ("distill.weight", 0), ("data.num_workers", 0),
    ("train.seed", 0), ("train.seed", 2**32 - 1), ("data.max_image_pixels", 1), ("optim.scheduler", "constant"),
    ("gates.backend", "flex"), ("gates.init_log_alpha", -3), ("lora.dropout", 0.0), ("window", None), ("plan", None),
    *[("model.family", family) for family in FAMILIES],
])
def test_values_at_the_edges_load(tmp_path, dotted, value):
    recipe = load_recipe(write(tmp_path, yaml.safe_dump(with_value(dotted, value))))
    section, _, name = dotted.rpartition(".")
    got = getattr(getattr(recipe, section) if section else recipe, name)
    assert got == value and type(got) is type(value) or (isinstance(value, int) and got == float(value))


def test_max_image_pixels_default():
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "toy" / "flops25.yaml")
    assert recipe.data.max_image_pixels == 64_000_000


# ---- pruning plans ---------------------------------------------------------------------------------------------

def plan_text(**changes) -> str:
    data = {"format": PLAN_FORMAT, "family": "llava", "window": 5, "num_layers": 1, "num_heads": 4,
            "layers": [{"heads": [0, 1], "mlp": True}]}
    data.update(changes)
    return json.dumps(data)


def plan_error(tmp_path: Path, content: str | bytes, limit: int = 400) -> str:
    path = tmp_path / "plan.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(PlanError) as info:
        Plan.from_json(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) <= limit, message
    return message


@pytest.mark.parametrize("content, fragment", [
    (plan_text()[:-1] + ', "family": "qwen2_vl"}', "duplicate key 'family'"),
    (plan_text().replace('"mlp": true', '"mlp": true, "mlp": false'), "duplicate key 'mlp'"),
    (plan_text().replace('"window": 5', '"window": NaN'), "NaN is not a valid JSON value"),
    (plan_text().replace('"window": 5', '"window": Infinity'), "Infinity is not a valid JSON value"),
    (plan_text().replace('"num_heads": 4', '"num_heads": -Infinity'), "-Infinity is not a valid JSON value"),
    (plan_text().replace('"num_heads": 4', '"num_heads": ' + "9" * 5000), "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b"\xff\xfe{}", "must be UTF-8 text"),
    ("{not json", "not valid JSON (Expecting property name"),
    (plan_text(format="x" * 1_000_000), "format must be 'visprune-plan/1', got 'xxx"),
    (plan_text(**{f"k{i}": 1 for i in range(5000)}), "and 4995 more"),
    (plan_text(family=["llava"] * 100_000), "family must be a non-empty string"),
    (plan_text(layers=[{"heads": [0] * 100_000, "mlp": True}]), "layers[0].heads has duplicates"),
    (plan_text().replace('"mlp": true', '"mlp": true, "frozen": [true]'), "layers[0].frozen must be true or false"),
    (plan_text().replace('"mlp": true', '"mlp": true, "frozen": true'), "layers[0] is frozen and keeps the MLP"),
])
def test_hostile_plan_files_are_refused(tmp_path, content, fragment):
    assert fragment in plan_error(tmp_path, content)


def test_an_oversized_plan_is_refused_before_parsing(tmp_path):
    path = tmp_path / "plan.json"
    with open(path, "wb") as file:  # sparse
        file.truncate(plan_module.MAX_PLAN_BYTES + 1)
    with pytest.raises(PlanError, match=f"at most {plan_module.MAX_PLAN_BYTES} bytes"):
        Plan.from_json(path)
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.from_json(tmp_path)


def test_a_hostile_plan_is_one_line_from_the_cli(tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(plan_text().replace('"window": 5', '"window": NaN'))
    line = cli_error(capsys, ["flops", "llava-1.5-7b", "--plan", str(path)])
    assert str(path) in line and "NaN" in line


def test_a_plan_of_another_family_is_refused(tmp_path):
    plan = Plan(family="qwen2_vl", window=None, num_layers=1, num_heads=4, layers=(LayerPlan(heads=(0,), mlp=True),))
    with pytest.raises(PlanError, match="^plan is for family 'qwen2_vl', the model is 'llava'$"):
        plan.validate_for(1, 4, 64, family="llava")
    plan.validate_for(1, 4, 64, family="qwen2_vl")
    plan.validate_for(1, 4, 64)  # family not given: dimensions only
    plan.to_json(tmp_path / "plan.json")
    loaded = Plan.from_json(tmp_path / "plan.json")
    assert loaded == plan and loaded.source == str(tmp_path / "plan.json")
    with pytest.raises(PlanError) as info:  # a plan read from a file names it
        loaded.validate_for(1, 4, 64, family="llava")
    assert str(info.value) == f"{tmp_path / 'plan.json'}: plan is for family 'qwen2_vl', the model is 'llava'"
    with pytest.raises(PlanError, match="plan.json: plan is for 1 layers x 4 heads, the model has 2 x 4"):
        loaded.validate_for(2, 4, family="qwen2_vl")


# ---- a model folder's config.json (visprune flops / bench) ----------------------------------------------------

@pytest.fixture(scope="module")
def config_dict(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llava().config.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def model_folder(tmp_path: Path, config: dict | str | bytes) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    content = config if isinstance(config, (str, bytes)) else json.dumps(config)
    (folder / "config.json").write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def test_a_complete_config_is_costed(tmp_path, capsys, config_dict):
    assert main(["flops", str(model_folder(tmp_path, config_dict)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"].endswith("model")


@pytest.mark.parametrize("key", list(flops_module.CONFIG_DIM_LIMITS))
def test_a_config_without_a_dimension_says_which_default_it_costs(tmp_path, capsys, caplog, config_dict, key):
    """transformers builds the model with the config class's default for a size the file leaves out; visprune
    costs that same model and names the key and the value, never silently."""
    config = json.loads(json.dumps(config_dict))
    del config["text_config"][key]
    folder = model_folder(tmp_path, config)
    with caplog.at_level("WARNING", logger="visprune.modeling.flops"):
        assert main(["flops", str(folder), "--json"]) == 0
    assert f"{folder / 'config.json'} does not state text_config.{key}" in caplog.text
    assert "defaults, which from_pretrained builds as well" in caplog.text


@pytest.mark.parametrize("key, value", [
    ("num_hidden_layers", 5000), ("num_hidden_layers", 0), ("num_hidden_layers", -2), ("num_hidden_layers", True),
    ("num_hidden_layers", 3.0), ("num_hidden_layers", "3"), ("hidden_size", 10**7), ("num_attention_heads", None),
    ("intermediate_size", 10**9),
])
def test_absurd_dimensions_are_refused(tmp_path, capsys, config_dict, key, value):
    config = json.loads(json.dumps(config_dict))
    config["text_config"][key] = value
    line = cli_error(capsys, ["flops", str(model_folder(tmp_path, config))])
    assert f"text_config.{key} must be an integer from 1 to {flops_module.CONFIG_DIM_LIMITS[key]}" in line


def test_dimensions_where_transformers_does_not_read_them_are_refused(tmp_path, capsys, config_dict):
    config = json.loads(json.dumps(config_dict))
    text = config.pop("text_config")
    text.pop("model_type")
    config.update(text)  # LlavaConfig reads the LM from text_config only
    line = cli_error(capsys, ["flops", str(model_folder(tmp_path, config))])
    assert "transformers reads num_hidden_layers = 32 for the language model, not the 3 written" in line


def test_key_value_heads_that_do_not_divide_the_heads_are_refused(tmp_path, capsys, config_dict):
    config = json.loads(json.dumps(config_dict))
    config["text_config"]["num_key_value_heads"] = 3
    assert "4 attention heads cannot share 3 key-value heads" in cli_error(
        capsys, ["flops", str(model_folder(tmp_path, config))])


@pytest.mark.parametrize("content, fragment", [
    ('{"model_type": "llava", "model_type": "gpt2"}', "duplicate key 'model_type'"),
    ("{not json", ": not valid JSON (Expecting property name"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"model_type": "' + "x" * 100_000 + '"}', "is not a supported family"),
    (b"\xff\xfe", "must be UTF-8 text"),
])
def test_unreadable_configs_are_one_line(tmp_path, capsys, content, fragment):
    line = cli_error(capsys, ["flops", str(model_folder(tmp_path, content))])
    assert fragment in line and len(line) < 400


def test_an_oversized_config_is_refused(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    with open(folder / "config.json", "wb") as file:  # sparse
        file.truncate(flops_module.MAX_CONFIG_BYTES + 1)
    assert f"at most {flops_module.MAX_CONFIG_BYTES} bytes" in cli_error(capsys, ["flops", str(folder)])


def test_published_configs(tmp_path, caplog):
    """Qwen2-VL-7B-Instruct states its dimensions (at the top level); llava-hf's LLaVA-1.5 config was saved as a
    diff from LlamaConfig's defaults, which are LLaVA-1.5-7B's: costed equal to the built-in, with a warning."""
    dims = flops_module.resolve_model_dims(str(FIXTURES / "qwen2-vl"))
    assert (dims.num_layers, dims.num_heads, dims.hidden_size, dims.intermediate_size) == (28, 28, 3584, 18944)
    with caplog.at_level("WARNING", logger="visprune.modeling.flops"):
        llava = flops_module.resolve_model_dims(str(FIXTURES / "llava-1.5"))
    assert "does not state text_config.num_hidden_layers" in caplog.text
    builtin = flops_module.BUILTIN_MODELS["llava-1.5-7b"]
    assert (llava.num_layers, llava.hidden_size, llava.num_heads, llava.intermediate_size, llava.image_grid) == \
        (builtin.num_layers, builtin.hidden_size, builtin.num_heads, builtin.intermediate_size, builtin.image_grid)
    assert math.isclose(flops_module.flops_report(flops_module.BUILTIN_MODELS["llava-1.5-7b"],
                                                  flops_module.default_layout(flops_module.BUILTIN_MODELS[
                                                      "llava-1.5-7b"]))["visual_flops"], 7.633e12, rel_tol=1e-3)
