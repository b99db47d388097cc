"""Loading a checkpoint's processor the way every verb needs it: `AutoProcessor.from_pretrained` with
`trust_remote_code` only when the user asked, failures as one clear line (a missing or broken torchvision,
which the Qwen2-VL and InternVL processors need, names the wheel to install), and LLaVA processors
completed from the model's own config.json where the published folder leaves their settings out."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from .records import read_json

logger = logging.getLogger(__name__)


class ProcessorError(ValueError):
    """A processor that cannot be loaded or used; the message names the folder and what to do."""


def matching_torchvision() -> str:
    """The torchvision release built for the installed torch (torch 2.N pairs with torchvision 0.(N+15))."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return f"torchvision==0.{minor + 15}.*" if major == 2 else "the torchvision release built for your torch"


def check_torchvision() -> None:
    """Refuse an installed torchvision that does not import (a wheel built for another torch, e.g. a CUDA
    build beside a CPU torch): transformers would otherwise pick it and fail deep inside an image processor.

    Raises:
        ProcessorError: naming both versions and the wheel to install.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        from importlib.metadata import PackageNotFoundError, version

        import torch

        try:
            installed = version("torchvision")
        except PackageNotFoundError:
            installed = "?"
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ProcessorError(
            f"torchvision {installed} is installed but does not import beside torch {torch.__version__} "
            f"({type(exc).__name__}: {reason}); install the build that matches your torch "
            f"({matching_torchvision()} from your torch's wheel index) or uninstall it") from exc


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """`AutoProcessor.from_pretrained(path)`, checked and completed (see the module docstring).

    Args:
        path: a model or processor folder (or a hub id on machines that can download).
        trust_remote_code: let the folder's own processor code run; only ever from the user's command
            line or recipe, never from a checkpoint.

    Raises:
        ProcessorError: the folder has no usable processor, or the processor needs a missing package.
    """
    from transformers import AutoProcessor

    check_torchvision()
    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ImportError as exc:
        if "torchvision" in str(exc).lower():
            raise ProcessorError(f"the processor of {path} needs torchvision (transformers' video and fast image "
                                 f"processors of this family use it), which is not installed: pip install "
                                 f"'{matching_torchvision()}' from your torch's wheel index") from exc
        raise ProcessorError(f"cannot load the processor of {path}: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProcessorError(f"cannot load the processor of {path}: {first}") from exc
    if isinstance(processor, (str, bytes)) or not hasattr(processor, "tokenizer"):
        raise ProcessorError(f"{path} has a tokenizer but no multimodal processor (no preprocessor_config.json / "
                             "processor_config.json): visprune needs the model's processor")
    complete_llava_processor(processor, path)
    return processor


def complete_llava_processor(processor: Any, path: str | os.PathLike) -> None:
    """Fill a LLaVA / LLaVA-NeXT processor's `patch_size`, `vision_feature_select_strategy` and
    `num_additional_image_tokens` from the model's config.json when the folder's processor files leave them
    out (llava-hf checkpoints whose processor_config.json is missing): the processor cannot count an image's
    tokens without them, and the model's config is what the model itself uses. Logged; a folder without a
    config.json is an error."""
    if type(processor).__name__ not in ("LlavaProcessor", "LlavaNextProcessor") or processor.patch_size is not None:
        return
    config_path = Path(path) / "config.json"
    try:
        config = read_json(config_path, "model config")  # duplicate keys and NaN are refused
        vision = config["vision_config"]
        patch_size = int(vision["patch_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProcessorError(f"{path}: the processor has no patch_size (no processor_config.json) and the model's "
                             f"config.json does not give it ({exc}); add processor_config.json") from exc
    processor.patch_size = patch_size
    processor.vision_feature_select_strategy = config.get("vision_feature_select_strategy", "default")
    # CLIP towers put a CLS token before the patches (dropped by the "default" strategy); SigLIP has none
    processor.num_additional_image_tokens = 1 if vision.get("model_type", "clip_vision_model") == "clip_vision_model" \
        else 0
    logger.info("%s: the processor files give no patch size; using the model config's patch_size %d, "
                "vision_feature_select_strategy %r, %d additional image tokens", path, patch_size,
                processor.vision_feature_select_strategy, processor.num_additional_image_tokens)


__all__ = ["ProcessorError", "check_torchvision", "complete_llava_processor", "load_processor", "matching_torchvision"]
