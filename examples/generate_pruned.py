"""Load an exported visprune folder hardened (`load_pruned`) and, as the reference, with stock
transformers plus its plan in gated mode; answer the first questions of a LLaVA-format JSON with
both and print the answers side by side (they agree: same function, less work). Run: python examples/generate_pruned.py runs/toy-v25 runs/toy-inputs/data/train.json runs/toy-inputs/data/images
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from visprune.modeling import apply_plan, load_pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("data_json")
    parser.add_argument("image_folder")
    parser.add_argument("--num", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    processor = AutoProcessor.from_pretrained(args.model_dir)
    pruned = load_pruned(args.model_dir)
    plan = pruned.visprune_plan
    gated = apply_plan(AutoModelForImageTextToText.from_pretrained(args.model_dir).eval(), plan)
    print(f"plan: window {plan.window}, visual heads kept per layer {[len(lp.heads) for lp in plan.layers]}, "
          f"visual MLP kept {[lp.mlp for lp in plan.layers]}")
    folder = Path(args.image_folder).resolve()
    samples = [s for s in json.loads(Path(args.data_json).read_text()) if s.get("image")][: args.num]
    for sample in samples:
        image_path = (folder / sample["image"]).resolve()
        if not image_path.is_relative_to(folder):
            raise ValueError(f"sample {sample['id']}: image path {sample['image']!r} leaves {folder}")
        question = sample["conversations"][0]["value"]
        prompt = processor.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)  # LLaVA-style: <image> in the text
        inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
        with torch.no_grad():
            outs = {name: model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
                    for name, model in (("gated", gated), ("pruned", pruned))}
        start = inputs["input_ids"].shape[1]
        print(f"{sample['id']}: {question.strip()!r}")
        for name, out in outs.items():
            print(f"  {name:6}: {processor.decode(out[0, start:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
