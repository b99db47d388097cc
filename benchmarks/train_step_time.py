"""Step time of gated + LoRA training vs plain LoRA on the same tiny toy LLaVA, same batch, one
process, alternating repeats; prints medians and their ratio. Run: python benchmarks/train_step_time.py"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from visprune.data_prep.records import build_dataset
from visprune.data_prep.toy import write_toy_inputs
from visprune.modeling.families import family_for
from visprune.trainer.build import build_collator, build_model, prepare_model
from visprune.trainer.config import load_recipe
from visprune.trainer.sparsity import ExpectedFlops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    inputs = write_toy_inputs(tempfile.mkdtemp(), num_samples=64, seed=0)
    recipe = load_recipe("recipes/toy/flops25.yaml", [f"model.path={inputs['model']}", f"data.path={inputs['data']}",
                                                      f"data.image_folder={inputs['image_folder']}"])
    plain, processor = build_model(recipe)
    dataset = build_dataset(recipe.data.path)
    batch = build_collator(recipe, plain, processor)([dataset[i] for i in range(args.batch)])

    targets = family_for(plain).lora_target_regex(recipe.lora.targets)
    plain = get_peft_model(plain, LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, target_modules=targets))
    gated, _ = build_model(recipe)
    gated, gates, controller = prepare_model(gated, recipe)
    from visprune.modeling.flops import default_layout

    dims = gates.model_dims()
    expected = ExpectedFlops(dims, default_layout(dims, system=4, text=12), recipe.window)
    runs = {
        "plain_lora": (plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3), None),
        "gated_lora": (gated, torch.optim.AdamW([p for p in gated.parameters() if p.requires_grad], lr=1e-3), True),
    }
    for model, _, _ in runs.values():
        model.train()
    times = {name: [] for name in runs}
    for repeat in range(args.repeats + 5):
        for name, (model, optimizer, is_gated) in runs.items():
            start = time.perf_counter()
            loss = model(**batch).loss
            if is_gated:
                loss = loss + controller(expected(gates.last_probs), 10)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if repeat >= 5:
                times[name].append(time.perf_counter() - start)
    result = {f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}
    result["ratio"] = result["gated_lora_ms"] / result["plain_lora_ms"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"batch {args.batch}, seq {batch['input_ids'].shape[1]}, {args.repeats} alternating repeats, 1 thread")
        print(f"plain LoRA step  {result['plain_lora_ms']:.1f} ms (median)")
        print(f"gated LoRA step  {result['gated_lora_ms']:.1f} ms (median)")
        print(f"ratio gated / plain: {result['ratio']:.2f}")


if __name__ == "__main__":
    main()
