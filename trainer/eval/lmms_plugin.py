"""lmms-eval model plugin `visprune`: evaluate a hardened visprune folder (or any plain HF folder of a
supported family) with lmms-eval's tasks (GQA, VQAv2, POPE, MME, MMBench, TextVQA, ...), as FastV,
PDrop, p-MoD and VTW report theirs.

    python -m visprune.trainer.eval.lmms_plugin --model visprune \\
        --model_args pretrained=runs/toy-v12 --tasks gqa,pope,mme --batch_size 8 --output_path results/

(`python -m visprune.trainer.eval.lmms_plugin` registers the model and runs lmms-eval's own command line;
with visprune's `lmms_eval.models` entry point installed, plain `lmms-eval --model visprune ...` works
too.) A folder with a `pruning_plan.json` is loaded with `load_pruned` (hardened), else as the plain
model; `trust_remote_code` stays off unless `trust_remote_code=True` is in `--model_args`.

Requests are served in batches of `--batch_size`: `generate_until` (greedy unless the task sets a
temperature; left padding; `until` strings cut the answer) and `loglikelihood` (the continuation's
summed log-probability after the chat-templated context, and whether greedy decoding would produce
it; right padding). Visuals must be images (PIL); videos and audio are refused.

Beside the scores: the plan's visual FLOPs (FLOPs model, default layout) and the prefill time measured
in line — the first forward of every `generate` call (vision tower, language model, KV cache), timed
by forward hooks, no extra work. Both go into lmms-eval's results JSON (`throughput`:
`avg_prefill_ms_per_sample`, `avg_visual_flops_ratio`, ...) and, with `report=PATH` in
`--model_args` (the launcher defaults it to OUTPUT_PATH/visprune_report.json), a JSON report
rewritten after every request batch; `VisPrune.report()` returns the same dict.

`VisPrune` adapts lmms-eval's interface (requests in, answers out); batching, generation, log-likelihood and
the report are `lmms_requests`'.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("visprune's lmms-eval plugin needs lmms-eval: pip install 'visprune[eval]' (or, keeping your "
                      "torch: pip install --no-deps lmms-eval==0.7.3 && pip install loguru pytz evaluate sacrebleu "
                      f"tenacity): {exc}") from exc

try:
    from loguru import logger
except ImportError:  # pragma: no cover - lmms-eval depends on loguru
    import logging

    logger = logging.getLogger(__name__)

from visprune.data_prep.templates import resolve_for_model

from .lmms_requests import (
    Prompted,
    answer_generation,
    answer_loglikelihood,
    continuation_ids,
    report_headline,
    request_images,
    write_report,
)
from .loading import is_hardened, load_for_eval, plan_flops
from .prompts import PromptEncoder
from .timing import PrefillTimer

MODEL_NAME = "visprune"
CLASS_PATH = "visprune.trainer.eval.lmms_plugin.VisPrune"
REPORT_ENV = "VISPRUNE_LMMS_REPORT"  # default for `report=`; the launcher sets it from --output_path
MODEL_ARGS = ("pretrained", "device", "dtype", "batch_size", "max_new_tokens", "trust_remote_code", "report")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("1", "true", "yes"):
        return True
    if str(value).strip().lower() in ("0", "false", "no", "none", ""):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def default_device() -> str:
    """cuda when available (`cuda:LOCAL_RANK` under a multi-process launcher), else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "cuda"


def _register_legacy(cls):
    """lmms-eval's `register_model` decorator (the registry older versions resolve `--model` with)."""
    try:
        from lmms_eval.api.registry import register_model
    except ImportError:  # pragma: no cover
        return cls
    return register_model(MODEL_NAME)(cls)


@_register_legacy
class VisPrune(lmms):
    """lmms-eval's `visprune` model (see the module docstring): lmms-eval's requests in, answers out; the work is
    `lmms_requests`'. `model_args`: `pretrained` (a model folder), `device` (default: `default_device()`),
    `dtype` (auto / float32 / bfloat16 / float16), `batch_size`, `max_new_tokens` (default for tasks that set
    none), `trust_remote_code`, `report` (a JSON path)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", batch_size: int | str = 1,
                 max_new_tokens: int | str = 128, trust_remote_code: bool | str = False, report: str | None = None,
                 max_batch_size: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"visprune: unknown model_args {sorted(unknown)}; known: {', '.join(MODEL_ARGS)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("visprune: --batch_size auto is not supported; give a number")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"visprune: batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self._device = torch.device(device or default_device())
        torch_dtype: Any = "auto" if dtype in (None, "auto") else getattr(torch, str(dtype))
        path = Path(pretrained)
        self._model, self.processor = load_for_eval(path, trust_remote_code=_as_bool(trust_remote_code),
                                                    dtype=torch_dtype, device=self._device)
        self._tokenizer = self.processor.tokenizer
        self.encoder = PromptEncoder(self.processor, None, resolve_for_model(self._model, self.processor, path))
        self.pretrained = str(path)
        self.hardened = is_hardened(self._model)
        self.visual_flops = plan_flops(self._model)
        self.timer = PrefillTimer(self._device)
        self.timer.label = "generate"
        self.timer.watch(self._model)
        self.report_path = report or os.environ.get(REPORT_ENV) or None
        filelock_compat()  # lmms-eval builds the model before it patches filelock: `lmms-eval --model visprune` works
        logger.info(f"visprune: {path} ({'hardened' if self.hardened else 'plain'} model), visual FLOPs "
                    f"{self.visual_flops['ratio']:.1%} of dense, device {self._device}")

    # ---- what lmms-eval reads ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        text = getattr(self.config, "text_config", self.config)
        return int(getattr(text, "max_position_embeddings", 2048))

    def tok_encode(self, string: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens) -> str:
        return self._tokenizer.decode(tokens)

    # ---- requests ------------------------------------------------------------------------------------
    def _images(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        return request_images(doc_to_visual(self.task_dict[task][split][doc_id]), task)

    def prompt(self, context: str, num_images: int) -> str:
        """The chat-templated prompt of one request's context (`PromptEncoder.user_prompt`)."""
        return self.encoder.user_prompt(context, num_images, name="lmms-eval request")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to `generate_until` requests, in request order; requests with equal generation kwargs
        are batched, longest prompts first."""
        items = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = self._images(doc_to_visual, task, split, doc_id)
            items.append(Prompted(index, self.prompt(context, len(images)), images, gen_kwargs=dict(gen_kwargs or {})))
        answers = answer_generation(self._model, self.encoder, items, self.batch_size, self.max_new_tokens,
                                    self.timer, self.visual_flops["ratio"], progress=self.rank == 0)
        self._publish()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding produces it) per request,
        in request order. The context is chat-templated with the generation prompt; the continuation's
        tokens are those the tokenizer gives the prompt + continuation text beyond the prompt's own."""
        items = []
        for index, request in enumerate(requests):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation = doc_to_target if isinstance(doc_to_target, str) else \
                doc_to_target(self.task_dict[task][split][doc_id])
            images = self._images(doc_to_visual, task, split, doc_id)
            prompt = self.prompt(context, len(images))
            items.append(Prompted(index, prompt, images,
                                  continuation=continuation_ids(self.encoder, prompt, str(continuation))))
        results = answer_loglikelihood(self._model, self.encoder, items, self.batch_size, self.timer,
                                       progress=self.rank == 0)
        self._publish()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("visprune: multi-round generation (generate_until_multi_round) is not supported; "
                                  "run single-round tasks")

    # ---- reporting -----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The model, its plan's visual FLOPs and the measured prefill time so far (per request kind)."""
        return {"model": self.pretrained, "hardened": self.hardened, "visual_flops": self.visual_flops,
                "prefill": self.timer.summary(), "device": str(self._device), "batch_size": self.batch_size,
                "threads": torch.get_num_threads()}

    def _publish(self) -> None:
        report = self.report()
        logger.info(report_headline(report))
        if self.report_path and self.rank == 0:
            write_report(self.report_path, report)


# ---- registration ---------------------------------------------------------------------------------------
def manifest():
    """The `lmms_eval.models` entry-point payload: `visprune = "visprune.trainer.eval.lmms_plugin:manifest"`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make `--model visprune` resolvable in this process (lmms-eval's model registry, and the legacy
    `register_model` registry of older versions)."""
    _register_legacy(VisPrune)
    try:
        from lmms_eval.models import MODEL_REGISTRY_V2
    except ImportError:  # pragma: no cover - versions before the v2 registry resolve through MODEL_REGISTRY
        return
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def _output_path(argv: list[str]) -> str | None:
    for idx, arg in enumerate(argv):
        if arg == "--output_path" and idx + 1 < len(argv):
            return argv[idx + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


def filelock_compat() -> bool:
    """lmms-eval 0.7.3's evaluator patches `filelock._api`, which filelock 4 no longer has (the run then
    fails with "No module named 'filelock._api'"). With filelock 4, mark that patch as applied (its own
    guard attribute) so the evaluator skips it; returns whether it did. A no-op with filelock 3 or when
    lmms-eval's evaluator has no such patch. Called by the launcher and by `VisPrune()` (which
    lmms-eval's `simple_evaluate` builds before it applies the patch)."""
    try:
        import filelock._api  # noqa: F401
        return False
    except ImportError:
        pass
    try:
        from lmms_eval import evaluator
    except ImportError:  # pragma: no cover
        return False
    patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
    if patch is None or getattr(patch, "_patched", False):
        return False
    patch._patched = True
    logger.warning("visprune: filelock >= 4 has no filelock._api; lmms-eval's re-entrant file-lock patch is skipped")
    return True


def main(argv: list[str] | None = None) -> None:
    """`python -m visprune.trainer.eval.lmms_plugin ARGS`: lmms-eval's command line with `visprune` registered;
    the report defaults to OUTPUT_PATH/visprune_report.json."""
    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    filelock_compat()
    output = _output_path(argv)
    if output and REPORT_ENV not in os.environ:
        folder = Path(output) if not Path(output).suffix else Path(output).parent
        os.environ[REPORT_ENV] = str(folder / "visprune_report.json")
    from lmms_eval.cli.dispatch import main as lmms_main

    sys.argv = ["lmms-eval", *argv]
    lmms_main()


__all__ = ["MODEL_NAME", "VisPrune", "default_device", "filelock_compat", "main", "manifest", "register"]

if __name__ == "__main__":
    main()
