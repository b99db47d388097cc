"""Command-line wiring of generation-based evaluation, for `trainer/cli.py`:

- `add_eval_scoring_args(eval_parser)`: `visprune eval --metric {teacher_forced,vqa,pope,mc}
  [--max-new-tokens N] [--predictions FILE.jsonl] [--template T]`; sets the parser's `func` to
  `run_eval_scoring`;
- `add_compare_parser(subparsers)`: `visprune compare DIR_A DIR_B --data FILE --images DIR
  [--metric ...] [--limit N] [--json] ...`, run by `run_compare`.
"""

from __future__ import annotations

import argparse
import json

from visprune.data_prep.templates import TEMPLATE_CHOICES

from .cli import non_negative_int, positive_int
from .scoring import METRICS  # light: the CLI imports torch and datasets only when a command runs


def add_eval_scoring_args(eval_parser: argparse.ArgumentParser) -> None:
    """Add the generation-scoring options to `visprune eval`'s parser (which already has model_dir,
    --data, --images, --batch-size, --limit and --json) and make `run_eval_scoring` its command."""
    eval_parser.add_argument("--metric", choices=METRICS, default="teacher_forced",
                             help="teacher_forced (default): token accuracy / exact match under teacher forcing; "
                                  "vqa: VQAv2 accuracy of greedy answers (normalised exact match, or min(1, "
                                  "matches/3) over a record's 'answers'); pope: yes/no accuracy, precision, recall, "
                                  "F1, yes-ratio; mc: option-letter accuracy (records carry 'options')")
    eval_parser.add_argument("--max-new-tokens", type=positive_int, default=64,
                             help="generation metrics: most tokens generated per answer (default 64)")
    eval_parser.add_argument("--predictions", metavar="FILE.jsonl",
                             help="generation metrics: write every sample's answer, reference and score here")
    eval_parser.add_argument("--max-length", type=positive_int, default=4096,
                             help="teacher_forced: longest sample in tokens, image tokens included (default 4096)")
    eval_parser.add_argument("--template", choices=TEMPLATE_CHOICES, default="auto",
                             help="chat template the prompts are rendered with (default auto: the one a `visprune "
                                  "harden` folder was trained with, else as `data.template: auto` picks it)")
    eval_parser.add_argument("--trust-remote-code", action="store_true", help="let the model folder run its own code")
    eval_parser.set_defaults(func=run_eval_scoring)


def run_eval_scoring(args: argparse.Namespace) -> int:
    import sys

    from .evaluate import evaluate_dir, format_eval

    if getattr(args, "predictions", None) and getattr(args, "metric", "teacher_forced") == "teacher_forced":
        print("visprune eval: error: --predictions needs a generation metric (--metric vqa, pope or mc)",
              file=sys.stderr)
        return 2
    result = evaluate_dir(args.model_dir, args.data, args.images, batch_size=args.batch_size, limit=args.limit,
                          progress=not args.json, metric=getattr(args, "metric", "teacher_forced"),
                          max_new_tokens=getattr(args, "max_new_tokens", 64),
                          predictions=getattr(args, "predictions", None), template=args.template,
                          max_length=args.max_length, trust_remote_code=args.trust_remote_code)
    print(json.dumps(result, indent=1) if args.json else format_eval(result))
    return 0


def add_compare_parser(subparsers: argparse._SubParsersAction, parents: list | tuple = ()) -> argparse.ArgumentParser:
    """Add `visprune compare` to the `visprune` subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "compare", parents=list(parents), help="two model folders side by side on the same data (dense vs pruned): accuracy, visual "
                        "FLOPs, measured prefill latency, KV-cache bytes, answer agreement")
    parser.add_argument("dir_a", help="model folder A (e.g. the dense base)")
    parser.add_argument("dir_b", help="model folder B (e.g. a `visprune harden` folder: loaded hardened)")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON (see docs/evaluation.md for the fields)")
    parser.add_argument("--images", help="image folder the samples' paths are inside")
    parser.add_argument("--metric", choices=METRICS, default="vqa", help="accuracy metric (default vqa; "
                        "teacher_forced reports `visprune eval`'s exact match)")
    parser.add_argument("--limit", type=positive_int, help="use only the first N samples")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="samples per generation / prefill batch (default 8)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="most tokens per answer (default 64)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed prefill passes per model (default 5)")
    parser.add_argument("--time-samples", type=non_negative_int, default=64,
                        help="prefill latency is timed on the first N samples (default 64; 0: all)")
    parser.add_argument("--kv-samples", type=positive_int, default=16, help="KV-cache bytes are measured on the first N "
                                                                  "samples, one at a time (default 16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--trust-remote-code", action="store_true", help="let the model folders run their own code")
    parser.set_defaults(func=run_compare)
    return parser


def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare_dirs, format_compare

    result = compare_dirs(args.dir_a, args.dir_b, args.data, args.images, metric=args.metric,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                          repeats=args.repeats, time_samples=args.time_samples or None,
                          kv_samples=args.kv_samples, progress=not args.json,
                          trust_remote_code=args.trust_remote_code)
    print(json.dumps(result, indent=1) if args.json else format_compare(result))
    return 0


__all__ = ["add_compare_parser", "add_eval_scoring_args", "run_compare", "run_eval_scoring"]
