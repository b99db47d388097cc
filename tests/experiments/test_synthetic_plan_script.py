"""benchmarks/synthetic_plan.py writes the plan `visprune bench --budget B [--freeze] [--rings]` benchmarks, which
`visprune flops --plan` costs; it refuses to overwrite a file."""

import subprocess
import sys
from pathlib import Path

from visprune.modeling import BUILTIN_MODELS, Plan
from visprune.modeling.flops import default_layout, plan_report
from visprune.trainer.eval.bench_setup import synthetic_plan

REPO = Path(__file__).resolve().parents[2]


def run(*argv):
    return subprocess.run([sys.executable, str(REPO / "benchmarks/synthetic_plan.py"), *argv], capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_script_writes_benchs_synthetic_plan_and_keeps_existing_files(tmp_path):
    out = tmp_path / "plan.json"
    result = run("--model", "qwen2-vl-7b", "--budget", "0.12", "--freeze", "--rings", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    dims = BUILTIN_MODELS["qwen2-vl-7b"]
    plan = Plan.from_json(out)
    assert plan == synthetic_plan(dims, 0.12, freeze=True, rings=True)
    assert plan_report(dims, default_layout(dims), plan)["visual_flops_ratio"] <= 0.12
    before = out.read_bytes()
    result = run("--model", "qwen2-vl-7b", "--budget", "0.5", "--out", str(out))
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr and out.read_bytes() == before
