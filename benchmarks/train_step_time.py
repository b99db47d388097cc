"""What the gates cost in training, at real dimensions: a plain-LoRA step against a gated + LoRA step.

A slice of a built-in model (`--layers` decoder layers of the real width, spread over its depth, random weights,
small vocabulary; `visprune bench`'s builder) with the built-in's prompt layout: llava-1.5-7b one 576-token image
(micro-batch 2), llava-next-7b 576 + 2,304 grid tokens + 48 newlines (micro-batch 1), 35 system and 60 text tokens
around it. LoRA r128 on q/k/v/o/gate/up/down (as the built-in recipes); the gated model also has per-sample gates,
window 5 and the Lagrangian term, with self-distillation off (`gated`) and on (`gated_distill`: a teacher forward
with adapters off and every gate open, KL on the text tokens). Every step is forward, backward, AdamW step. The
variants alternate in one process; the medians are reported. Peak memory: on CUDA `max_memory_allocated` per
variant; on CPU the peak resident memory of a fresh process that builds the variant, runs a step, resets the
kernel's high-water mark and runs another (weights included: what a training process holds during a step).

Run: python benchmarks/train_step_time.py [--model llava-1.5-7b] [--layers 2] [--repeats 3] [--json]
`--json` keys: lora_ms, gated_ms, gated_distill_ms, step_ratio (gated / lora), distill_step_ratio,
lora_peak_bytes, gated_peak_bytes, memory_ratio, and the setup (model, layers, micro_batch, tokens, device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from visprune.modeling import GateConfig, attach_gates
from visprune.modeling.families import family_for
from visprune.modeling.flops import default_layout, resolve_model_dims
from visprune.trainer.eval.bench_setup import bench_config, build_models, image_grids, prompt_inputs, spread_layers
from visprune.trainer.sparsity import ExpectedFlops, SparsityController

MICRO_BATCH = {"llava-1.5-7b": 2, "llava-1.5-13b": 2, "llava-next-7b": 1}
VARIANTS = ("lora", "gated", "gated_distill")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Variant:
    """One model of the comparison with its optimizer and one training step."""

    def __init__(self, name: str, model_name: str, layers: int, micro_batch: int, device: str, seed: int = 0):
        full = resolve_model_dims(model_name)
        config = bench_config(model_name, spread_layers(full.num_layers, layers))
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model, _ = build_models(config, full.family, dtype, device, seed)
        dims = replace(full, num_layers=layers)
        layout = default_layout(dims)
        grids = image_grids(config, full.family, layout)
        inputs = prompt_inputs(config, full.family, layout, grids, seed)
        self.batch = {k: v.repeat(micro_batch, *([1] * (v.dim() - 1))).to(device) for k, v in inputs.items()}
        self.batch.update(_pixels(config, full.family, grids, micro_batch, dtype, device))
        labels = self.batch["input_ids"].clone()
        labels[labels == config.image_token_id] = -100
        self.batch["labels"] = labels
        self.gates = None
        if name != "lora":
            self.gates = attach_gates(model, GateConfig(window=5, per_sample=True))
            self.expected = ExpectedFlops(dims, layout, 5)
            self.controller = SparsityController(0.25, 0).to(device)
        family = family_for(model)
        model = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05,
                                                 target_modules=family.lora_target_regex(TARGETS)))
        params = [p for p in model.parameters() if p.requires_grad]
        if self.gates is not None:
            for p in [*self.gates.parameters(), *self.controller.parameters()]:
                p.requires_grad = True
            params += [*self.gates.parameters(), *self.controller.parameters()]
        self.model, self.name = model.train(), name
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.tokens = self.batch["input_ids"].numel()

    def step(self) -> None:
        outputs = self.model(**self.batch)
        loss = outputs.loss
        if self.gates is not None:
            loss = loss + self.controller(self.expected(self.gates.last_probs), 10)
        if self.name == "gated_distill":
            with torch.no_grad(), self.model.disable_adapter(), self.gates.open_all():
                teacher = self.model(**{k: v for k, v in self.batch.items() if k != "labels"}).logits
            answer = self.batch["labels"][:, 1:] != -100
            student = F.log_softmax(outputs.logits[:, :-1][answer].float(), dim=-1)
            loss = loss + F.kl_div(student, F.log_softmax(teacher[:, :-1][answer].float(), dim=-1), log_target=True,
                                   reduction="batchmean")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _pixels(config, family: str, grids, micro_batch: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Pixel inputs that make the layout's image (the vision tower is the benchmark's one-block stand-in)."""
    side = config.vision_config.image_size
    gen = torch.Generator().manual_seed(0)
    if family == "llava":
        return {"pixel_values": torch.randn(micro_batch, 3, side, side, generator=gen).to(device, dtype)}
    if family == "llava_next":
        rows = grids[1][0] * config.vision_config.patch_size  # the high-resolution grid's side in pixels
        tiles = (rows // side) ** 2 + 1  # the square's tiles plus the base image
        return {"pixel_values": torch.randn(micro_batch, tiles, 3, side, side, generator=gen).to(device, dtype),
                "image_sizes": torch.tensor([[rows, rows]] * micro_batch, device=device)}
    raise ValueError(f"the train-step benchmark covers the LLaVA-1.5 and LLaVA-NeXT layouts, not {family!r}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(variant: str, args: argparse.Namespace, device: str) -> int:
    """Peak memory of `variant` (see the module docstring)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run = Variant(variant, args.model, args.layers, args.micro_batch, device)
        for _ in range(2):
            run.step()
        peak = torch.cuda.max_memory_allocated()
        del run
        return peak
    code = (f"import runpy; b = runpy.run_path({__file__!r}); "
            f"run = b['Variant']({variant!r}, {args.model!r}, {args.layers}, {args.micro_batch}, 'cpu'); "
            "run.step(); open('/proc/self/clear_refs', 'w').write('5'); run.step(); "  # reset the high-water mark
            "print([int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b", help="a built-in model name (see `visprune flops`)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant, after one warm-up")
    parser.add_argument("--micro-batch", type=int, help="default: 2 for LLaVA-1.5, else 1")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.micro_batch = args.micro_batch or MICRO_BATCH.get(args.model, 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = {name: Variant(name, args.model, args.layers, args.micro_batch, device) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats + 1):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run.step()
            _sync(device)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    tokens = runs["lora"].tokens
    del runs
    result = {"model": args.model, "layers": args.layers, "micro_batch": args.micro_batch, "tokens": tokens,
              "device": device, "repeats": args.repeats}
    for name in VARIANTS:
        result[f"{name}_ms"] = statistics.median(times[name]) * 1e3
    result["step_ratio"] = result["gated_ms"] / result["lora_ms"]
    result["distill_step_ratio"] = result["gated_distill_ms"] / result["lora_ms"]
    if not args.no_memory:
        result["lora_peak_bytes"] = peak_bytes("lora", args, device)
        result["gated_peak_bytes"] = peak_bytes("gated", args, device)
        result["memory_ratio"] = result["gated_peak_bytes"] / result["lora_peak_bytes"]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.model}: {args.layers} layer(s), micro-batch {args.micro_batch}, {tokens} tokens, {device}, "
          f"median of {args.repeats} alternating steps")
    for name in VARIANTS:
        print(f"  {name:<14}{result[f'{name}_ms']:>10.0f} ms")
    print(f"step ratio gated / LoRA: {result['step_ratio']:.3f} (with distillation {result['distill_step_ratio']:.3f})")
    if "memory_ratio" in result:
        print(f"peak memory LoRA {result['lora_peak_bytes'] / 2**30:.2f} GiB, gated {result['gated_peak_bytes'] / 2**30:.2f}"
              f" GiB, ratio {result['memory_ratio']:.3f}")


if __name__ == "__main__":
    main()
