"""`visprune demo` end to end at CI size: every stage runs, every method and budget is reported,
and a second call resumes from the finished stages instead of redoing them."""

import json

import pytest
from visprune.experiments.seetask.demo import METHODS
from visprune.trainer.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--size", "ci"]) == 0
    return out


def test_demo_writes_report_plot_and_every_method(demo_dir):
    results = json.loads((demo_dir / "results.json").read_text())
    seen = {(r["method"], r["budget"]) for r in results["rows"]}
    assert ("dense", 1.0) in seen
    for method in METHODS:
        for budget in (0.5, 0.25, 0.12):
            assert (method, budget) in seen, (method, budget)
    for row in results["rows"]:
        if row["method"] in ("visprune", "yopo", "vtw", "random", "shortv"):
            assert row["visual_flops_ratio"] <= row["budget"] + 1e-9
            assert 0.0 <= row["describe_token_accuracy"] <= 1.0 and row["prefill_speedup"] > 0
    report = (demo_dir / "report.md").read_text()
    assert "| visprune | 12% |" in report and "| fastv |" in report
    assert (demo_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (demo_dir / "models" / "visprune-0.12" / "pruning_plan.json").is_file()


def test_demo_resumes_without_redoing_stages(demo_dir, capsys):
    before = (demo_dir / "results.json").stat().st_mtime_ns
    base = (demo_dir / "base" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--out", str(demo_dir), "--size", "ci"]) == 0
    assert (demo_dir / "base" / "model.safetensors").stat().st_mtime_ns == base
    assert "| visprune |" in capsys.readouterr().out
    assert (demo_dir / "results.json").stat().st_mtime_ns >= before
