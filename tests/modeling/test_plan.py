import json

import pytest
from visprune.modeling import PLAN_FORMAT, LayerPlan, Plan, PlanError


def example_dict():
    return {"format": PLAN_FORMAT, "family": "llava", "window": 5, "num_layers": 2, "num_heads": 32,
            "layers": [{"heads": [0, 3, 17], "mlp": True}, {"heads": [], "mlp": False}]}


def test_roundtrip(tmp_path):
    plan = Plan.from_json(example_dict())
    assert plan.layers[1].skipped and not plan.layers[0].skipped
    path = tmp_path / "pruning_plan.json"
    plan.to_json(path)
    assert json.loads(path.read_text()) == example_dict()
    assert Plan.from_json(path) == plan


def test_channels_roundtrip():
    data = example_dict()
    data["layers"][0]["mlp_channels"] = [0, 1, 2]
    assert Plan.from_json(data).to_dict() == data


def test_dense():
    plan = Plan.dense(3, 4)
    assert plan.window is None and all(lp.heads == (0, 1, 2, 3) and lp.mlp for lp in plan.layers)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.update(format="other/1"), "format"),
    (lambda d: d.update(window=4), "window"),
    (lambda d: d["layers"][0]["heads"].append(32), r"layers\[0\].heads\[3\]"),
    (lambda d: d["layers"][0]["heads"].append(3), "duplicates"),
    (lambda d: d["layers"][1].update(mlp="yes"), r"layers\[1\].mlp"),
    (lambda d: d["layers"][1].update(mlp_channels=[1]), "mlp is false"),
    (lambda d: d["layers"][1].update(gate=1), r"layers\[1\]: unknown key"),
    (lambda d: d.update(num_layers=3), "num_layers"),
    (lambda d: d.pop("window"), "missing"),
])
def test_validation_names_the_key(mutate, message):
    data = example_dict()
    mutate(data)
    with pytest.raises(PlanError, match=message):
        Plan.from_json(data)


def test_bad_json_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json(path)


def test_validate_for_model():
    plan = Plan(family="llava", window=None, num_layers=1, num_heads=4,
                layers=(LayerPlan(heads=(0,), mlp=True, mlp_channels=(70,)),))
    with pytest.raises(PlanError, match="out of range"):
        plan.validate_for(1, 4, intermediate_size=64)
    with pytest.raises(PlanError, match="layers x"):
        plan.validate_for(2, 4)
