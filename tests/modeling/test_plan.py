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


def test_spatio_temporal_window_roundtrip():
    """`window: [t, h, w]` is the spatial window w beside a temporal window t; [1, w, w] is plain w."""
    data = {**example_dict(), "window": [3, 5, 5]}
    plan = Plan.from_json(data)
    assert (plan.window, plan.temporal_window) == (5, 3) and plan.to_dict() == data
    one = Plan.from_json({**example_dict(), "window": [1, 5, 5]})
    assert (one.window, one.temporal_window) == (5, 1) and one.to_dict()["window"] == 5


@pytest.mark.parametrize("window, message", [
    ([3, 5, 3], r"h == w"), ([2, 5, 5], r"\[t, h, w\]: t must be an odd"), ([3, 5], "must be null, an odd"),
    ([3, 5, True], "must be null, an odd"), ([3, 0, 0], "h must be an odd"), ("3x5x5", "must be null, an odd"),
    ([3, 5, 5, 5], "must be null, an odd"), ([10**400, 5, 5], r"t must be an odd positive integer, got 1000+\.\.\.$"),
])
def test_bad_spatio_temporal_windows_are_named(window, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json({**example_dict(), "window": window})


def test_a_temporal_window_needs_a_spatial_one():
    with pytest.raises(PlanError, match="temporal window needs a spatial one"):
        Plan(family="llava", window=None, num_layers=1, num_heads=1, layers=(LayerPlan((0,), True),), temporal_window=3)


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
