"""The `visprune` command line: `train` (a recipe), `harden` (checkpoint -> plan + merged export),
`flops` (the cost model), `bench` (measured hardened speed-up), `eval` (accuracy of a model folder),
`compare` (two model folders side by side),
`data toy` / `data seetask` (local models and data), `data check` / `data prepare` (a LLaVA JSON: scan it,
convert it to a training-ready dataset folder)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("visprune")


def _format_flops(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} "


def _format_bytes(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def run_flops(args: argparse.Namespace) -> int:
    from visprune.modeling import Plan, default_layout, resolve_model_dims
    from visprune.modeling.flops import (
        image_size_grids,
        parse_image_size,
        plan_report,
        resolve_processor_settings,
        tile_grids,
        video_frame_grids,
    )
    from visprune.modeling.plan import window_value

    def about(what: str, fn, *fn_args):  # a ValueError about one input names it in the one-line error
        try:
            return fn(*fn_args)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None

    def format_grids(grids) -> str:  # runs of equal grids: "24x24 + 36x48", "9 x 16x16"
        runs: list[list] = []
        for grid in grids:
            if runs and runs[-1][0] == grid:
                runs[-1][1] += 1
            else:
                runs.append([grid, 1])
        return " + ".join(f"{count} x {rows}x{cols}" if count > 1 else f"{rows}x{cols}"
                          for (rows, cols), count in runs)

    dims = resolve_model_dims(args.model)
    if args.image_size is not None and args.tiles is not None:
        raise ValueError("give --image-size or --tiles, not both")
    if args.processor is not None and args.image_size is None and args.video_frames is None:
        raise ValueError("--processor only applies with --image-size or --video-frames")
    image, size, source = None, None, None
    if args.image_size is not None:
        size = about("--image-size", parse_image_size, args.image_size)
        settings, source = about("processor settings", resolve_processor_settings, args.model, args.processor)
    if args.video_frames is not None:
        if args.tiles is not None:
            raise ValueError("--video-frames and --tiles do not go together (--image-size sets the frame size)")
        settings, source = about("processor settings", resolve_processor_settings, args.model, args.processor)
        image = about(f"--video-frames {args.video_frames}", video_frame_grids, dims, args.video_frames, size,
                      settings)
    elif args.image_size is not None:
        image = about(f"--image-size {args.image_size}", image_size_grids, dims, size, settings)
    elif args.tiles is not None:
        image = about(f"--tiles {args.tiles}", tile_grids, dims, args.tiles)
    layout = default_layout(dims, num_images=args.images, system=args.system_tokens, text=args.text_tokens,
                            image=image)
    plan = None
    if args.plan:
        plan = Plan.from_json(args.plan)
        plan.validate_for(dims.num_layers, dims.num_heads, dims.intermediate_size, family=dims.family)
    report = plan_report(dims, layout, plan)
    dense = report["dense"]
    planned, ratio = (report["plan"], report["visual_flops_ratio"]) if plan is not None else (None, None)
    result = {"model": dims.name, "layout": layout.to_dict(), "dense": dense, "plan": planned,
              "visual_flops_ratio": ratio}
    if image is not None:
        result["image"] = {"image_size": list(size) if size else None, "tiles": args.tiles,
                           "video_frames": args.video_frames, **image.to_dict(), "processor": source}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{dims.name}: {dims.num_layers} layers, hidden {dims.hidden_size}, {dims.num_heads} heads "
          f"({dims.num_kv_heads} KV), MLP {dims.intermediate_size}")
    if image is not None:
        newlines = f" + {image.non_grid} newlines" if image.non_grid else ""
        kind = "video" if args.video_frames is not None else "image"
        print(f"{kind}{f' {size[0]}x{size[1]} px' if size else ''}: {format_grids(image.grids)} = "
              f"{image.visual_tokens} visual tokens{newlines}; {image.note}")
        if source:
            print(f"processor settings: {source}")
    grids = format_grids(layout.grids)
    grids = grids if len(layout.grids) == 1 else f"[{grids}]"
    newlines = f" + {layout.num_images * layout.non_grid} newline" if layout.non_grid else ""
    print(f"layout: {layout.system} system + {layout.visual} visual ({layout.num_images} x {grids}){newlines} + "
          f"{layout.text} text tokens")
    windows = None if plan is None else plan.windows()
    label = ("plan (windows per layer)" if isinstance(windows, tuple)
             else f"plan (window {window_value(windows, plan.temporal_window)})" if plan is not None else "")
    rows = [("dense", dense)] + ([(label, planned)] if plan is not None else [])
    print(f"{'':24}{'visual FLOPs':>16}{'prefill FLOPs':>16}{'visual KV cache':>18}")
    for name, rep in rows:
        print(f"{name:24}{_format_flops(rep['visual_flops']) + 'FLOPs':>16}"
              f"{_format_flops(rep['prefill_flops']) + 'FLOPs':>16}{_format_bytes(rep['visual_kv_bytes']):>18}")
    if ratio is not None:
        print(f"visual FLOPs kept: {ratio:.2%}  (prefill: {report['prefill_flops_ratio']:.2%})")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from visprune.trainer.config import load_recipe
    from visprune.trainer.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from visprune.trainer.dry_run import dry_run, format_dry_run

        report = dry_run(recipe, args.recipe, gpus=args.gpus)
        print(json.dumps(report, indent=1) if args.json else format_dry_run(report))
        return 0
    if args.gpus is not None or args.json:
        raise ValueError("--gpus and --json go with --dry-run (a real run takes its GPUs from torchrun / deepspeed)")
    try:
        run_dir = train(recipe, resume=args.resume, overwrite=args.overwrite)
    finally:
        several_ranks = _close_process_group()
    logger.info("run folder: %s", run_dir)
    if several_ranks:
        _exit_before_teardown(0)
    return 0


def _close_process_group() -> bool:
    """Tear down torch.distributed before exit (`train` has already waited for every rank); True when the run
    had several ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    several = dist.get_world_size() > 1
    dist.destroy_process_group()
    return several


def _exit_before_teardown(code: int) -> None:
    """End a finished multi-rank run without the interpreter's teardown.

    gloo's worker threads outlive `destroy_process_group` (DeepSpeed keeps references to its process
    groups), and destroying them while the interpreter finalises aborts a rank about one run in ten
    ("terminate called without an active exception", exit -6) after everything was saved, which fails
    the launcher. The exit handlers (logging, trackers) run first; only the finalisation is skipped."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_harden(args: argparse.Namespace) -> int:
    from visprune.trainer.export import harden
    from visprune.trainer.plan_select import PlanSelection

    report = harden(args.checkpoint, args.out, budget=args.budget, plan_path=args.plan,
                    trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, fill=args.fill,
                    select=None if args.select_on is None else PlanSelection(
                        args.select_on, args.select_images, candidates=args.candidates, samples=args.select_samples))
    vf = report["visual_flops"]
    print(f"{args.out}: visual FLOPs {_format_flops(vf['pruned'])}FLOPs of {_format_flops(vf['dense'])}FLOPs dense "
          f"({vf['ratio']:.2%}, budget {report['budget']:.2%}); visual layers kept "
          f"{report['visual_layers_kept']}/{len(report['heads_kept_per_layer'])}; "
          f"heads kept per layer {report['heads_kept_per_layer']}; plan rule {report['plan_rule']}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from visprune.trainer.eval.bench import format_bench, run_bench

    result = run_bench(model=args.model, layers=args.layers, plan_path=args.plan, budget=args.budget,
                       repeats=args.repeats, seed=args.seed, device=args.device, progress=not args.json,
                       compare=args.compare, kernel=args.kernel, freeze=args.freeze, rings=args.rings,
                       video_frames=args.video_frames, temporal=args.temporal_window)
    print(json.dumps(result, indent=1) if args.json else format_bench(result))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from visprune.trainer.eval.folder import evaluate_dir, format_eval

    if args.predictions and args.metric == "teacher_forced":
        print("visprune eval: error: --predictions needs a generation metric (--metric vqa, pope or mc)",
              file=sys.stderr)
        return 2
    result = evaluate_dir(args.model_dir, args.data, args.images, batch_size=args.batch_size, limit=args.limit,
                          progress=not args.json, metric=args.metric, max_new_tokens=args.max_new_tokens,
                          predictions=args.predictions, template=args.template, max_length=args.max_length,
                          trust_remote_code=args.trust_remote_code)
    print(json.dumps(result, indent=1) if args.json else format_eval(result))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from visprune.trainer.eval.compare import compare_dirs, format_compare

    result = compare_dirs(args.dir_a, args.dir_b, args.data, args.images, metric=args.metric,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                          repeats=args.repeats, time_samples=args.time_samples or None,
                          kv_samples=args.kv_samples, progress=not args.json,
                          trust_remote_code=args.trust_remote_code)
    print(json.dumps(result, indent=1) if args.json else format_compare(result))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from visprune.experiments.seetask.demo import run_demo, run_seeds
    from visprune.experiments.seetask.tasks import TASK_OPTIONS

    size = args.size or ("quick" if args.quick else "full")
    options = {name: getattr(args, name) for name in TASK_OPTIONS if getattr(args, name) is not None}
    common = {"size": size, "task": args.task, "task_options": options, "fill": args.plan_rule == "fill",
              "select": args.select}
    if args.seeds is not None:
        results = run_seeds(args.out, args.seeds, **common)
    else:
        results = run_demo(args.out, seed=args.seed, **common)
    print((Path(args.out) / "report.md").read_text())
    logger.info("report: %s/report.md, plot: %s/pareto.png (%.1f min)", args.out, args.out, results["minutes"])
    return 0


def seed_list(text: str) -> list[int]:
    """`--seeds 0,1,2`: distinct non-negative whole numbers."""
    try:
        seeds = [non_negative_int(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds like 0,1,2: {exc}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat: {text}")
    return seeds


def run_data_toy(args: argparse.Namespace) -> int:
    from visprune.data_prep.toy import write_toy_inputs

    paths = write_toy_inputs(args.out, num_samples=args.num_samples, seed=args.seed)
    for name, path in paths.items():
        logger.info("%s: %s", name, path)
    return 0


def _pixel_limit(args: argparse.Namespace) -> dict[str, int]:
    """`max_image_pixels` when --max-image-pixels was given (else the data layer's default applies)."""
    return {} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels}


def run_data_check(args: argparse.Namespace) -> int:
    from visprune.data_prep.check import check_file, check_rejected_target, write_rejected
    from visprune.data_prep.processing import load_processor
    from visprune.data_prep.templates import resolve_for_folder

    if args.skip_bad:
        check_rejected_target(args.out)  # refused before the scan, not after it
    processor = load_processor(args.processor, trust_remote_code=args.trust_remote_code)
    _, template = resolve_for_folder(processor, args.processor, args.template, args.family)
    report = check_file(args.json, args.images, processor, template, max_length=args.max_length,
                        **_pixel_limit(args))
    if report.rejected and not args.skip_bad:
        print(report.summary(), file=sys.stderr)
        print(f"visprune data check: {len(report.rejected)} bad samples (--skip-bad writes them to "
              f"rejected.jsonl and passes)", file=sys.stderr)
        return 1
    print(report.summary(limit=20))
    if args.skip_bad:  # also when nothing was rejected: an earlier scan's file never survives as if current
        logger.info("rejected samples: %s", write_rejected(report, args.out))
    return 0


def run_data_prepare(args: argparse.Namespace) -> int:
    from visprune.data_prep.prepare import prepare_dataset

    report = prepare_dataset(args.json, args.images, args.out, args.processor, max_length=args.max_length,
                             num_proc=args.num_proc, skip_bad=args.skip_bad, overwrite=args.overwrite,
                             family=args.family, trust_remote_code=args.trust_remote_code,
                             shard_size=args.shard_size, template=args.template, **_pixel_limit(args))
    check = report.check
    if report.out_dir is None:
        print(check.summary(), file=sys.stderr)
        print(f"visprune data prepare: {len(check.rejected)} bad samples, nothing written (--skip-bad writes them "
              f"to {args.out}/rejected.jsonl and converts the rest)", file=sys.stderr)
        return 1
    print(check.summary(limit=20))
    counts, lengths = report.manifest["counts"], report.manifest["lengths"]
    print(f"{report.out_dir}: {counts['ok']} samples ({counts['with_images']} with images, {counts['text_only']} "
          f"text-only) in {report.manifest['num_shards']} shards; tokens per sample {lengths['min']}-{lengths['max']} "
          f"(mean {lengths['mean']:.0f}); {check.num_samples / max(report.seconds, 1e-9):.0f} samples/s")
    if report.rejected_path:
        logger.info("rejected samples: %s", report.rejected_path)
    return 0


def run_data_seetask(args: argparse.Namespace) -> int:
    from visprune.data_prep.seetask import SeeTaskConfig, write_seetask

    cfg = SeeTaskConfig(image_size=args.image_size, grid=args.grid, patch_size=args.patch_size,
                        num_colours=args.num_colours, num_shapes=args.num_shapes, empty_fraction=args.empty_fraction,
                        describe_fraction=args.describe_fraction, num_train=args.num_train, num_val=args.num_val,
                        num_test=args.num_test, seed=args.seed)
    paths = write_seetask(args.out, cfg)
    for name, path in paths.items():
        logger.info("%s: %s", name, path)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`visprune VERB: error: ... (see visprune VERB --help)`, exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_shorten(message)} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {_shorten(text)!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1)


def _peer_list(text: str) -> tuple[str, ...]:
    from visprune.trainer.eval.peers import PEERS

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(PEERS)}, got {_shorten(text)!r}")
    return names
non_negative_int = _int_at_least(0)


def _float_in(low: float, high: float, low_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {_shorten(text)!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {text}")
        return value
    return parse


fraction = _float_in(0.0, 1.0, low_open=True)  # a visual-FLOPs budget: (0, 1]
unit_interval = _float_in(0.0, 1.0, low_open=False)


TEMPLATE_HELP = ("chat template, as the recipe's data.template: auto (default: the processor's own when it closes "
                 "every answer with an end-of-turn token the model generates, else the family's training format), "
                 "llava_v1, chatml or processor")


PIXELS_HELP = ("refuse images of more than N pixels (width x height), judged from the file header before any pixel "
               "is decoded; rejected as image_too_large (default 64000000)")


def build_parser() -> argparse.ArgumentParser:
    import os

    from visprune.data_prep.templates import TEMPLATE_CHOICES
    from visprune.experiments.seetask.tasks import DEFAULT_TASK as DEMO_DEFAULT_TASK
    from visprune.experiments.seetask.tasks import TASKS as DEMO_TASKS
    from visprune.trainer.eval.scoring import METRICS  # a light import: no torch until a verb runs

    parser = Parser(prog="visprune", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the verb
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of any error")
    sub = parser.add_subparsers(dest="verb", required=True)
    flops = sub.add_parser("flops", parents=[common],
                           help="visual and prefill FLOPs and visual KV-cache bytes, dense and under a plan")
    flops.add_argument("model", help="built-in model (llava-1.5-7b, llava-1.5-13b, qwen2-vl-7b, internvl2-8b, "
                                     "internvl3-8b, llava-next-7b) or a local folder with a transformers config.json")
    flops.add_argument("--plan", help="a pruning_plan.json to cost beside the dense model")
    flops.add_argument("--json", action="store_true", help="print one JSON object")
    flops.add_argument("--images", type=positive_int, default=1, help="images in the prompt (default 1)")
    flops.add_argument("--system-tokens", type=non_negative_int, default=35, help="text tokens before the image(s)")
    flops.add_argument("--text-tokens", type=non_negative_int, default=60, help="text tokens after the image(s)")
    flops.add_argument("--image-size", metavar="HxW",
                       help="cost each image at this size in pixels, height x width (e.g. 720x1280), laid out as "
                            "the model's processor would: Qwen2-VL smart_resize (min/max pixels), InternVL tiles "
                            "(+ a thumbnail when more than one), LLaVA-NeXT base + unpadded high-resolution grid + "
                            "newlines; LLaVA-1.5's grid is fixed (every image is resized and centre-cropped). "
                            "Default: each family's reference grid (Qwen2-VL 16x16, InternVL one tile, "
                            "LLaVA-NeXT 672x672 px)")
    flops.add_argument("--video-frames", type=int, metavar="F",
                       help="Qwen2-VL only: each visual input is a video of F frames (each of --image-size, default "
                            "the reference grid): every temporal_patch_size (2) frames are one slice of visual "
                            "tokens, each slice its own window grid")
    flops.add_argument("--tiles", type=int, metavar="N",
                       help="InternVL only: cost N tiles per image instead of an image size; N counts every "
                            "tile costed, so include the thumbnail (a 2x4 tiling is --tiles 9)")
    flops.add_argument("--processor", metavar="DIR",
                       help="with --image-size: read the processor settings (min_pixels, max_pixels, patch_size, "
                            "merge_size; min_patches, max_patches, size; image_grid_pinpoints, crop_size) from "
                            "DIR/preprocessor_config.json instead of the built-in model's published ones "
                            "(default for a model folder: its own preprocessor_config.json)")
    flops.set_defaults(func=run_flops)

    train = sub.add_parser("train", parents=[common],
                           help="train gates + LoRA under a FLOPs budget from a recipe YAML")
    train.add_argument("recipe", help="recipes/<model>/<budget>.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. budget.visual_flops=0.25")
    train.add_argument("--overwrite", action="store_true",
                       help="with --resume never: start the run folder clean (only what visprune wrote in it)")
    train.add_argument("--resume", default="auto",
                       help="auto (newest checkpoint in the run folder, default), never, or a checkpoint folder")
    train.add_argument("--dry-run", action="store_true",
                       help="train nothing: build the model from its config.json on the meta device (no weights), "
                            "attach gates and LoRA, and print parameter counts, per-GPU memory and FLOPs per sample")
    train.add_argument("--gpus", type=positive_int, help="with --dry-run: GPUs the run will use (default 1)")
    train.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    train.set_defaults(func=run_train)

    harden = sub.add_parser("harden", parents=[common],
                            help="checkpoint -> merged HF folder + pruning_plan.json + pruning_report.json")
    harden.add_argument("checkpoint", help="RUN_DIR/checkpoint-N of `visprune train`")
    harden.add_argument("--out", required=True, help="output folder")
    harden.add_argument("--budget", type=fraction, help="visual-FLOPs fraction to keep (default: the recipe's budget)")
    harden.add_argument("--plan", help="use this pruning_plan.json instead of the gates' top-k (checked against --budget)")
    harden.add_argument("--fill", action="store_true",
                        help="after the best-ranked units that fit, also add every later unit that still fits: the plan "
                             "uses more of its budget, but a smaller budget no longer keeps a subset of a larger one")
    harden.add_argument("--select-on", metavar="JSON",
                        help="held-out LLaVA JSON (or prepared folder): among the gates' plan and plans drawn from the "
                             "trained gates at the budget, export the one with the lowest loss on its first samples")
    harden.add_argument("--select-images", metavar="DIR", help="image folder of --select-on")
    harden.add_argument("--candidates", type=positive_int, default=8, help="plans tried by --select-on (default 8)")
    harden.add_argument("--select-samples", type=positive_int, default=64,
                        help="samples of --select-on each plan is scored on (default 64)")
    harden.add_argument("--overwrite", action="store_true", help="replace OUT when it is a folder harden wrote")
    harden.add_argument("--trust-remote-code", action="store_true",
                        help="let the base model folder run its own code (never taken from the checkpoint's recipe)")
    harden.set_defaults(func=run_harden)

    bench = sub.add_parser("bench", parents=[common], help="measured prefill speed-up of the hardened model vs dense, beside the "
                                         "FLOPs model's prediction (random weights at real layer dimensions)")
    bench.add_argument("--model", default="llava-1.5-7b", help="built-in model or a local config folder")
    bench.add_argument("--layers", type=positive_int, default=4, help="decoder layers to build (default 4)")
    bench.add_argument("--plan", help="a pruning_plan.json of the full model (N of its layers, spread over the depth, are used)")
    bench.add_argument("--budget", type=fraction, help="a synthetic plan at this visual-FLOPs fraction (default 0.25)")
    bench.add_argument("--freeze", action="store_true",
                       help="the synthetic plan also has freeze gates: some layers frozen (docs/design.md rule 7)")
    bench.add_argument("--rings", action="store_true",
                       help="the synthetic plan also has ring gates: a learned window per layer")
    bench.add_argument("--video-frames", type=positive_int, metavar="F",
                       help="Qwen2-VL only: the prompt is a video of F frames of the reference grid (every 2 frames one "
                            "temporal slice) instead of an image; the synthetic plan is made at --budget on it")
    bench.add_argument("--temporal-window", type=positive_int, default=1, metavar="T",
                       help="the synthetic plan's temporal window (odd): video tokens also see the slices of their video "
                            "T//2 away (window [T, 5, 5]); default 1")
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each model (default 3)")
    bench.add_argument("--seed", type=non_negative_int, default=0)
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    bench.add_argument("--kernel", choices=["auto", "sdpa", "merged"], default="auto",
                       help="hardened attention: auto (sdpa on CUDA, merged elsewhere), sdpa (fused kernels in the "
                            "weights' dtype) or merged (fp32 matmuls, one softmax)")
    bench.add_argument("--compare", type=_peer_list, default=(),
                       help="comma-separated token-dropping peers timed beside dense and hardened, each at the visual "
                            "FLOPs closest to the plan's: vtw (every visual token leaves after layer K), fastv (FastV's "
                            "top visual tokens by the last token's attention)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=run_bench)

    ev = sub.add_parser("eval", parents=[common],
                        help="score a model folder (hardened when it has a plan) on local data: teacher-forced token "
                             "accuracy / exact match, or generated answers scored VQAv2-style, POPE yes/no or "
                             "multiple-choice letters; per category, beside the plan's visual FLOPs")
    ev.add_argument("model_dir", help="an HF model folder, e.g. one written by `visprune harden`")
    ev.add_argument("--data", required=True, help="LLaVA-format JSON (see-task records carry a qtype)")
    ev.add_argument("--images", help="image folder the samples' paths are inside")
    ev.add_argument("--batch-size", type=positive_int, default=32)
    ev.add_argument("--limit", type=positive_int, help="score only the first N samples")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--metric", choices=METRICS, default="teacher_forced",
                    help="teacher_forced (default): token accuracy / exact match under teacher forcing; vqa: VQAv2 "
                         "accuracy of greedy answers (normalised exact match, or min(1, matches/3) over a record's "
                         "'answers'); pope: yes/no accuracy, precision, recall, F1, yes-ratio; mc: option-letter "
                         "accuracy (records carry 'options')")
    ev.add_argument("--max-new-tokens", type=positive_int, default=64,
                    help="generation metrics: most tokens generated per answer (default 64)")
    ev.add_argument("--predictions", metavar="FILE.jsonl",
                    help="generation metrics: write every sample's answer, reference and score here")
    ev.add_argument("--max-length", type=positive_int, default=4096,
                    help="teacher_forced: longest sample in tokens, image tokens included (default 4096)")
    ev.add_argument("--template", choices=TEMPLATE_CHOICES, default="auto",
                    help="chat template the prompts are rendered with (default auto: the one a `visprune harden` "
                         "folder was trained with, else as `data.template: auto` picks it)")
    ev.add_argument("--trust-remote-code", action="store_true", help="let the model folder run its own code")
    ev.set_defaults(func=run_eval)

    compare = sub.add_parser("compare", parents=[common], help="two model folders side by side on the same data "
                             "(dense vs pruned): accuracy, visual FLOPs, measured prefill latency, KV-cache bytes, "
                             "answer agreement")
    compare.add_argument("dir_a", help="model folder A (e.g. the dense base)")
    compare.add_argument("dir_b", help="model folder B (e.g. a `visprune harden` folder: loaded hardened)")
    compare.add_argument("--data", required=True, help="LLaVA-format JSON (see docs/evaluation.md for the fields)")
    compare.add_argument("--images", help="image folder the samples' paths are inside")
    compare.add_argument("--metric", choices=METRICS, default="vqa",
                         help="accuracy metric (default vqa; teacher_forced reports `visprune eval`'s exact match)")
    compare.add_argument("--limit", type=positive_int, help="use only the first N samples")
    compare.add_argument("--batch-size", type=positive_int, default=8,
                         help="samples per generation / prefill batch (default 8)")
    compare.add_argument("--max-new-tokens", type=positive_int, default=64, help="most tokens per answer (default 64)")
    compare.add_argument("--repeats", type=positive_int, default=5, help="timed prefill passes per model (default 5)")
    compare.add_argument("--time-samples", type=non_negative_int, default=64,
                         help="prefill latency is timed on the first N samples (default 64; 0: all)")
    compare.add_argument("--kv-samples", type=positive_int, default=16,
                         help="KV-cache bytes are measured on the first N samples, one at a time (default 16)")
    compare.add_argument("--json", action="store_true", help="print one JSON object")
    compare.add_argument("--trust-remote-code", action="store_true", help="let the model folders run their own code")
    compare.set_defaults(func=run_compare)

    demo = sub.add_parser("demo", parents=[common], help="the see-task accuracy-vs-FLOPs experiment on CPU: data, dense base, "
                                       "visprune and baselines at 50/25/12%% -> report.md + pareto.png")
    demo.add_argument("--out", default="runs/demo", help="output folder (stages resume from what is there)")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about 5 minutes)")
    demo.add_argument("--size", choices=["full", "quick", "ci"], help=argparse.SUPPRESS)
    demo.add_argument("--task", choices=sorted(DEMO_TASKS), default=DEMO_DEFAULT_TASK,
                      help=f"the see-task variant (default {DEMO_DEFAULT_TASK}): "
                           + "; ".join(f"{k}: {v.description}" for k, v in sorted(DEMO_TASKS.items())))
    seeds = demo.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=non_negative_int, default=0,
                       help="data, dense base, gate training and baselines all follow it (default 0)")
    seeds.add_argument("--seeds", type=seed_list,
                       help="run the pipeline once per seed (OUT/seed-S) and report mean, min and max, e.g. 0,1,2,3,4")
    demo.add_argument("--plan-rule", choices=["fill", "prefix"], default="fill",
                      help="how gate scores become a plan (visprune and random): fill (default: use the budget) or "
                           "prefix (the best-ranked units up to the first that does not fit)")
    demo.add_argument("--select", type=non_negative_int, default=8,
                      help="visprune's plan per budget: chosen during prune-training among N candidate plans on "
                           "the val split (the best 3 trained in turn first), then trained fixed (the recipe's "
                           "plan_select; default 8; 0 or 1: the gates learn to the end and hardening ranks them)")
    _seetask_options(demo, defaults=False)
    demo.set_defaults(func=run_demo)

    data = sub.add_parser("data", parents=[common], help="data preparation")
    data_sub = data.add_subparsers(dest="data_verb", required=True)
    toy = data_sub.add_parser("toy", parents=[common], help="write a tiny LLaVA (model + processor) and a generated dataset")
    toy.add_argument("--out", required=True, help="output folder (model/ and data/ are written inside)")
    toy.add_argument("--num-samples", type=positive_int, default=256)
    toy.add_argument("--seed", type=non_negative_int, default=0)
    toy.set_defaults(func=run_data_toy)
    check = data_sub.add_parser("check", parents=[common], help="pre-flight scan of a LLaVA JSON + image folder: every record, "
                                              "image, placeholder count, length and supervised token, up front")
    check.add_argument("--json", required=True, help="LLaVA-format .json (a list) or .jsonl")
    check.add_argument("--images", default=None, help="image folder; image paths must stay inside it")
    check.add_argument("--processor", required=True, help="model or processor folder (its chat template and "
                                                          "image tokens decide lengths and labels)")
    check.add_argument("--max-length", type=positive_int, default=2048, help="tokens, image tokens included")
    check.add_argument("--skip-bad", action="store_true", help="pass, writing bad samples to OUT/rejected.jsonl")
    check.add_argument("--out", default=".", help="folder for rejected.jsonl (default: here)")
    check.add_argument("--trust-remote-code", action="store_true", help="let the processor run its own code")
    check.add_argument("--family", help="model family (llava, qwen2_vl, ...): what an <image> becomes in the "
                                        "prompt, as in training (default: the folder's config.json model_type)")
    check.add_argument("--template", choices=TEMPLATE_CHOICES, default="auto", help=TEMPLATE_HELP)
    check.add_argument("--max-image-pixels", type=positive_int, help=PIXELS_HELP)
    check.set_defaults(func=run_data_check)
    prep = data_sub.add_parser("prepare", parents=[common], help="check a LLaVA JSON + image folder and convert it to a sharded "
                                               "datasets folder with token ids, label masks and lengths "
                                               "(image tokens counted): train on it with data.path: OUT")
    prep.add_argument("--json", required=True, help="LLaVA-format .json (a list) or .jsonl")
    prep.add_argument("--images", default=None, help="image folder; image paths must stay inside it")
    prep.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    prep.add_argument("--processor", required=True, help="model or processor folder (its chat template and "
                                                         "image tokens decide token ids, labels and lengths)")
    prep.add_argument("--max-length", type=positive_int, default=2048, help="tokens, image tokens included (default 2048)")
    prep.add_argument("--skip-bad", action="store_true", help="convert the good samples, writing bad ones to "
                                                              "OUT/rejected.jsonl (default: fail listing them)")
    prep.add_argument("--num-proc", type=positive_int, default=min(2, os.cpu_count() or 1),
                      help="worker processes (default: min(2, CPUs))")
    prep.add_argument("--shard-size", type=positive_int, default=50_000, help="rows per output shard (default 50000; at "
                                                                     "least --num-proc shards)")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace OUT only if it holds nothing but a prepared folder's files")
    prep.add_argument("--family", help="model family (llava, qwen2_vl, ...): what an <image> becomes in the "
                                       "prompt, as in training (default: the folder's config.json model_type)")
    prep.add_argument("--trust-remote-code", action="store_true", help="let the processor run its own code")
    prep.add_argument("--template", choices=TEMPLATE_CHOICES, default="auto", help=TEMPLATE_HELP)
    prep.add_argument("--max-image-pixels", type=positive_int, help=PIXELS_HELP)
    prep.set_defaults(func=run_data_prepare)
    see = data_sub.add_parser("seetask", parents=[common], help="the synthetic see-task: grid-of-shapes images with describe and "
                                              "ask samples, train/val/test splits (deterministic per seed)")
    see.add_argument("--out", required=True, help="output folder")
    _seetask_options(see, defaults=True)
    see.add_argument("--num-train", type=positive_int, default=4000)
    see.add_argument("--num-val", type=positive_int, default=200)
    see.add_argument("--num-test", type=positive_int, default=400)
    see.add_argument("--seed", type=non_negative_int, default=0)
    see.set_defaults(func=run_data_seetask)
    return parser


def _seetask_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The see-task generator's options; without `defaults` an option left out keeps the task's own value."""
    from visprune.data_prep.seetask import SeeTaskConfig

    base = SeeTaskConfig()

    def default(name: str):
        return getattr(base, name) if defaults else None

    def shown(name: str) -> str:
        return f"default {getattr(base, name)}" if defaults else "default: the task's"

    parser.add_argument("--image-size", type=positive_int, default=default("image_size"), help=shown("image_size"))
    parser.add_argument("--grid", type=positive_int, default=default("grid"), help=f"cells per side ({shown('grid')})")
    parser.add_argument("--patch-size", type=positive_int, default=default("patch_size"),
                        help=f"the vision tower's patch, smaller than a cell ({shown('patch_size')})")
    parser.add_argument("--num-colours", type=positive_int, default=default("num_colours"), help=shown("num_colours"))
    parser.add_argument("--num-shapes", type=positive_int, default=default("num_shapes"), help=shown("num_shapes"))
    parser.add_argument("--empty-fraction", type=unit_interval, default=default("empty_fraction"),
                        help=shown("empty_fraction"))
    parser.add_argument("--describe-fraction", type=unit_interval, default=default("describe_fraction"),
                        help=shown("describe_fraction"))


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Expected failures (bad input, a missing or unwritable file, a refused checkpoint) are one
    line on stderr and exit code 2; anything else is a short message, exit code 1, with the traceback in a log
    file (`--debug` prints tracebacks instead)."""
    import os

    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports progress
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    verb = " ".join(part for part in (args.verb, getattr(args, "data_verb", None)) if part)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"visprune {verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (the one error boundary of every verb)
        return report_error(verb, err, debug=args.debug)


LOG_DIR_ENV = "VISPRUNE_LOG_DIR"  # where tracebacks of unexpected errors go (default ~/.cache/visprune/logs)
MESSAGE_LIMIT = 400  # characters of an error message shown on the one line


def report_error(verb: str, err: BaseException, debug: bool = False) -> int:
    """Print `err` as one line and return the exit code: 2 for an expected error (`is_expected`), 1 for a bug,
    whose traceback (and the whole message) goes to a log file named on that line."""
    import traceback

    lines = str(err).strip().splitlines() or [type(err).__name__]
    first = _shorten(lines[0])
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    if is_expected(err):
        more = ""
        if len(lines) > 1 or len(lines[0]) > MESSAGE_LIMIT:
            log = _write_log(verb, "".join(traceback.format_exception(err)))
            more = f" (and {len(lines) - 1} more lines: {log})" if len(lines) > 1 else f" (whole message: {log})"
        print(f"visprune {verb}: error: {first}{more}", file=sys.stderr)
        return 2
    log = _write_log(verb, "".join(traceback.format_exception(err)))
    print(f"visprune {verb}: internal error: {type(err).__name__}: {first} (traceback in {log}; --debug prints it)",
          file=sys.stderr)
    return 1


EXPECTED_RUNTIME_ERRORS = ("CheckpointError", "NonFiniteError")  # visprune's own, about the run's inputs


def is_expected(err: BaseException) -> bool:
    """Errors about the user's input or files: visprune's own (recipe, data, processor, plan, template,
    harden: ValueErrors; checkpoint, non-finite run), file-system errors (missing, unreadable, read-only, a
    file where a folder belongs), undecodable text and ValueErrors raised on user values by transformers or
    peft."""
    return isinstance(err, (ValueError, OSError)) or type(err).__name__ in EXPECTED_RUNTIME_ERRORS


def _shorten(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 3] + "..."


def _write_log(verb: str, text: str) -> str:
    """Write `text` to a new file in the log folder and return its path (or why it could not be written)."""
    import os
    import tempfile
    import time
    from pathlib import Path

    folder = Path(os.environ.get(LOG_DIR_ENV) or Path.home() / ".cache" / "visprune" / "logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"visprune-{verb.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-"
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path
    except OSError as exc:
        return f"no log written ({exc.strerror or exc}; set {LOG_DIR_ENV})"


if __name__ == "__main__":
    sys.exit(main())
