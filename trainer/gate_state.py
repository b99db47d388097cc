"""Gate state on disk: the gates and λ as safetensors with their GateConfig in the metadata, restored into a
model (also under ZeRO-3), and every save re-opened and checked; what a resumed checkpoint must fit."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from visprune.modeling import GateConfig, GateSet
from visprune.modeling.plan import window_value

from . import checkpoints as ckpt
from .sparsity import SparsityController

GATES_FILE = "gates.safetensors"


def unwrap_model(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def base_model_of(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _gathered(params: list[nn.Parameter]):
    """Context that makes ZeRO-3 partitioned parameters whole (a no-op otherwise)."""

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def gate_state_dict(gates: GateSet, controller: SparsityController) -> dict[str, torch.Tensor]:
    """Gate log_alpha tensors and λ as plain CPU float32 tensors (gathered under ZeRO-3)."""
    named = {f"gates.{n}": p for n, p in gates.named_parameters()}
    named.update({f"sparsity.{n}": p for n, p in controller.named_parameters()})
    with _gathered(list(named.values())):
        tensors = {name: p.detach().float().cpu().clone().contiguous() for name, p in named.items()}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            raise RuntimeError(f"gate tensor {name} is empty after gathering; refusing to save it")
    return tensors


def gate_metadata(gates: GateSet) -> dict[str, str]:
    return {"format": "visprune-gates/1", "family": gates.family, "window": json.dumps(window_value(gates.window, gates.temporal_window)),
            "dims": json.dumps(asdict(gates.dims)), "config": json.dumps(asdict(gates.cfg))}


def stored_gate_config(path: str | os.PathLike) -> GateConfig | None:
    """The GateConfig saved beside trained gates (`gates.safetensors` metadata `config`), the one hardening
    rebuilds the gates with; None for a file without one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        stored = (handle.metadata() or {}).get("config")
    if stored is None:
        return None
    try:
        return GateConfig(**json.loads(stored))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: its stored gate config is not one this visprune reads: {exc}") from exc


def load_gate_state(gates: GateSet, controller: SparsityController | None, path: str | os.PathLike) -> None:
    """Restore gates (and λ, when a controller is given) from a checkpoint's gates.safetensors.

    Raises:
        FileNotFoundError: the file is missing.
        CheckpointError: a tensor is missing or has another shape (naming the file and tensor).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint has no gates")
    tensors = load_file(str(path))
    named = {f"gates.{n}": p for n, p in gates.named_parameters()}
    if controller is not None:
        named.update({f"sparsity.{n}": p for n, p in controller.named_parameters()})
    missing = sorted(set(named) - set(tensors))
    if missing:
        raise ckpt.CheckpointError(f"{path} lacks {missing}")
    with _gathered(list(named.values())), torch.no_grad():
        for name, param in named.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ckpt.CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected "
                                           f"{tuple(param.shape)} (gates of another model?)")
            param.copy_(tensors[name].to(param.device, param.dtype))


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions leave an empty local tensor


def _saved_name(name: str) -> str:
    """A trainable parameter's key in the file peft writes (the adapter name is dropped)."""
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def expected_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Saved key -> full shape of every trainable tensor but the gates and λ (ZeRO-3: the shape before
    partitioning, `ds_shape`). A full model is saved in its original checkpoint format, so its keys go
    through transformers' own renaming (on shapes only: meta tensors)."""
    model = unwrap_model(model)
    shapes = {_saved_name(name): _full_shape(p) for name, p in model.named_parameters()
              if p.requires_grad and "visprune_gates." not in name and "visprune_sparsity." not in name}
    if hasattr(model, "peft_config"):
        return shapes
    from transformers.core_model_loading import revert_weight_conversion

    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})  # saved once, under the other name
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items() if name not in tied}
    return {name: tuple(tensor.shape) for name, tensor in revert_weight_conversion(model, meta).items()}


def tensor_problems(folder: str | os.PathLike, expected: dict[str, tuple[int, ...]], gates: GateSet,
                    controller: SparsityController | None = None) -> list[str]:
    """What is wrong with the tensors a save wrote in `folder`, each problem naming its file and tensor: an
    expected adapter (or model) or gate tensor that is missing, has another shape, or is empty. Reads only
    the safetensors headers."""
    from safetensors import safe_open

    folder = Path(folder)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (file, shape)
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != GATES_FILE:
            with safe_open(str(path), framework="pt") as handle:
                found.update({key: (path.name, tuple(handle.get_slice(key).get_shape()))
                              for key in handle.keys()})  # noqa: SIM118 (not a dict)
    gate_shapes = {f"gates.{n}": _full_shape(p) for n, p in gates.named_parameters()}
    if controller is not None:
        gate_shapes.update({f"sparsity.{n}": _full_shape(p) for n, p in controller.named_parameters()})
    saved_gates: dict[str, tuple[str, tuple[int, ...]]] = {}
    if (folder / GATES_FILE).is_file():
        with safe_open(str(folder / GATES_FILE), framework="pt") as handle:
            saved_gates = {key: (GATES_FILE, tuple(handle.get_slice(key).get_shape()))
                           for key in handle.keys()}  # noqa: SIM118 (not a dict)
    adapter = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model*.safetensors"
    problems = [f"{adapter}: {key} is missing" for key in sorted(set(expected) - set(found))]
    if (folder / GATES_FILE).is_file():
        problems += [f"{GATES_FILE}: {key} is missing" for key in sorted(set(gate_shapes) - set(saved_gates))]
    else:
        problems.append(f"{GATES_FILE} is missing")
    for want, have in ((expected, found), (gate_shapes, saved_gates)):
        problems += [f"{have[key][0]}: {key} has shape {have[key][1]}, expected {shape}" for key, shape in want.items()
                     if key in have and have[key][1] != shape]
        problems += [f"{file}: {key} is empty" for key, (file, shape) in have.items() if 0 in shape]
    return problems


def check_saved_tensors(folder: str | os.PathLike, expected: dict[str, tuple[int, ...]], gates: GateSet,
                        controller: SparsityController | None = None) -> None:
    """Re-open what a save wrote and check it: every expected adapter (or model) tensor and every gate
    tensor is present, non-empty and has its shape. The classic failure is an adapter saved empty
    under ZeRO-3."""
    problems = tensor_problems(folder, expected, gates, controller)
    if problems:
        raise RuntimeError(f"the checkpoint in {folder} is wrong ({len(problems)} problems): " + "; ".join(problems[:8]))


def check_resume_fits(checkpoint: str | os.PathLike, model: nn.Module, gates: GateSet,
                      controller: SparsityController) -> None:
    """Refuse to resume from a checkpoint whose adapter (or model) or gate tensors do not fit this run's model
    (another model, another `lora.rank` or `lora.targets`), before transformers or DeepSpeed load it.

    Raises:
        CheckpointError: naming the checkpoint, then each file and tensor that does not fit.
    """
    problems = tensor_problems(checkpoint, expected_tensor_shapes(model), gates, controller)
    if problems:
        raise ckpt.CheckpointError(f"--resume {checkpoint}: it does not fit this recipe's model ({len(problems)} "
                                   f"problem{'s' if len(problems) > 1 else ''}): " + "; ".join(problems[:3]))


__all__ = ["GATES_FILE", "base_model_of", "check_resume_fits", "check_saved_tensors", "expected_tensor_shapes",
           "gate_metadata", "gate_state_dict", "load_gate_state", "stored_gate_config", "tensor_problems",
           "unwrap_model"]
