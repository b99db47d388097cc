"""benchmarks/train_step_time.py runs end to end (on the toy model's config: the real-dims runs take minutes) and
prints the JSON keys users and docs read."""

import json
import subprocess
import sys
from pathlib import Path

from visprune.data_prep.toy import write_toy_inputs

REPO = Path(__file__).resolve().parents[2]
KEYS = {"lora_ms", "gated_ms", "gated_distill_ms", "step_ratio", "lora_peak_bytes", "gated_peak_bytes",
        "memory_ratio"}


def test_train_step_benchmark_reports_its_keys(tmp_path):
    toy = write_toy_inputs(tmp_path / "toy", num_samples=4, seed=0)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/train_step_time.py"), "--model", toy["model"],
                             "--layers", "1", "--repeats", "1", "--json"], capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert KEYS <= set(report)
    assert report["step_ratio"] == report["gated_ms"] / report["lora_ms"] > 0
    assert report["memory_ratio"] == report["gated_peak_bytes"] / report["lora_peak_bytes"] > 0
    assert report["tokens"] > 0 and report["micro_batch"] == 1
