"""Write the synthetic plan `visprune bench --budget B [--freeze] [--rings] [--video-frames F] [--temporal-window T]`
benchmarks, for the full-depth model, so that `visprune flops MODEL --plan FILE` can cost it on another layout (an
image size, a video).

Run: python benchmarks/synthetic_plan.py --model llava-next-7b --budget 0.12 --out runs/next-12.json [--freeze]
     [--rings] [--seed 0] [--video-frames 16 --temporal-window 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from visprune.modeling import resolve_model_dims
from visprune.modeling.flops import default_layout, plan_report, video_frame_grids
from visprune.trainer.eval.bench_setup import synthetic_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--out", required=True)
    parser.add_argument("--freeze", action="store_true")
    parser.add_argument("--rings", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video-frames", type=int, help="make the plan at --budget on a video of F frames (Qwen2-VL)")
    parser.add_argument("--temporal-window", type=int, default=1, help="the plan's temporal window (odd)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists; pass --overwrite to replace it")
    dims = resolve_model_dims(args.model)
    video = None if args.video_frames is None else video_frame_grids(dims, args.video_frames, None, None)
    layout = default_layout(dims, image=video)
    plan = synthetic_plan(dims, args.budget, seed=args.seed, freeze=args.freeze, rings=args.rings,
                          temporal=args.temporal_window, layout=layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.to_json(out)
    ratio = plan_report(dims, layout, plan)["visual_flops_ratio"]
    frozen = [i for i, layer in enumerate(plan.layers) if layer.frozen]
    print(f"{out}: {args.model} at {ratio:.2%} of dense visual FLOPs ({'a video' if video else 'reference'} layout); frozen layers {frozen}; "
          f"windows {[plan.layer_window(i) for i in range(plan.num_layers)]}")


if __name__ == "__main__":
    main()
