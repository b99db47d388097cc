"""Run a command (e.g. `visprune data prepare ...`) and report its wall time, CPU time and peak memory
of the whole process tree (main process, forkserver, workers; sampled every 0.2 s): the peak of the
summed RSS and of the summed anonymous RSS (file-backed pages of memory-mapped Arrow files count in
RSS but are page cache the kernel can drop), and the largest single process. With the prepared folder
(--out), samples/s and the counts from its manifest.

    python benchmarks/measure_prepare.py --out /tmp/mix665k/prepared -- \\
        visprune data prepare --json /tmp/mix665k/mix.json ... --out /tmp/mix665k/prepared
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import psutil


def rss_parts(process: psutil.Process) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) in bytes, from /proc/PID/status."""
    fields = {}
    with open(f"/proc/{process.pid}/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) * 1024
    return fields.get("RssAnon", 0), fields.get("RssFile", 0) + fields.get("RssShmem", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the prepared folder the command writes (for its manifest)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    began = time.perf_counter()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak = {"total": 0, "anon": 0, "single": 0, "single_anon": 0, "processes": 0}
    cpu: dict[int, float] = {}  # last CPU seconds seen per process (children that exit keep theirs)
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        total = anon = 0
        for process in tree:
            try:
                a, f = rss_parts(process)
                times = process.cpu_times()
            except (psutil.Error, OSError):
                continue
            cpu[process.pid] = times.user + times.system
            total, anon = total + a + f, anon + a
            peak["single"], peak["single_anon"] = max(peak["single"], a + f), max(peak["single_anon"], a)
        peak["total"], peak["anon"] = max(peak["total"], total), max(peak["anon"], anon)
        peak["processes"] = max(peak["processes"], len(tree))
        time.sleep(0.2)
    seconds = time.perf_counter() - began
    mib = 2**20
    result = {"returncode": child.returncode, "wall_seconds": round(seconds, 1),
              "cpu_seconds": round(sum(cpu.values()), 1),
              "peak_rss_total_mib": round(peak["total"] / mib), "peak_rss_anon_total_mib": round(peak["anon"] / mib),
              "peak_rss_single_mib": round(peak["single"] / mib),
              "peak_rss_anon_single_mib": round(peak["single_anon"] / mib), "processes": peak["processes"]}
    if args.out and (Path(args.out) / "visprune_data.json").is_file():
        manifest = json.loads((Path(args.out) / "visprune_data.json").read_text())
        counts = manifest["counts"]
        result.update(samples=counts["samples"], ok=counts["ok"], rejected=counts["rejected"],
                      with_images=counts["with_images"], text_only=counts["text_only"],
                      samples_per_second=round(counts["samples"] / seconds),
                      samples_per_cpu_second=round(counts["samples"] / max(result["cpu_seconds"], 1e-9)),
                      prepare_seconds=manifest["seconds"], lengths=manifest["lengths"],
                      num_shards=manifest["num_shards"],
                      size_mib=round(sum(p.stat().st_size for p in Path(args.out).iterdir()) / mib))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
