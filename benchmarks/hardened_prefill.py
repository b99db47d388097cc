"""The README's hardened-prefill table: `visprune bench` at several budgets in one run, printed as
a Markdown table. Run: python benchmarks/hardened_prefill.py [--layers 8] [--repeats 5]"""

from __future__ import annotations

import argparse
import json

from visprune.trainer.eval.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.12])
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args()
    results = [run_bench(model=args.model, layers=args.layers, budget=b, repeats=args.repeats) for b in args.budgets]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{args.model}, {args.layers} layers spread over the depth, {results[0]['device']} "
          f"{results[0]['dtype']}, {results[0]['threads']} threads, median of {args.repeats}")
    print("| budget | visual FLOPs kept | dense ms | hardened ms | measured | predicted | efficiency | KV cache |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['budget']:.0%} | {r['visual_flops_ratio']:.1%} | {r['dense_ms']:.0f} | {r['hardened_ms']:.0f} | "
              f"{r['measured_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | {r['efficiency']:.2f} | "
              f"{r['hardened_kv_bytes'] / r['dense_kv_bytes']:.0%} |")


if __name__ == "__main__":
    main()
