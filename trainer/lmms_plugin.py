"""lmms-eval model plugin `visprune`: evaluate a hardened visprune folder (or any plain HF folder of a
supported family) with lmms-eval's tasks (GQA, VQAv2, POPE, MME, MMBench, TextVQA, ...), as FastV,
PDrop, p-MoD and VTW report theirs.

    python -m visprune.trainer.lmms_plugin --model visprune \\
        --model_args pretrained=runs/toy-v12 --tasks gqa,pope,mme --batch_size 8 --output_path results/

(`python -m visprune.trainer.lmms_plugin` registers the model and runs lmms-eval's own command line;
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
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
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

from visprune.data_prep.processing import load_processor
from visprune.data_prep.records import IMAGE_PLACEHOLDER, DataError
from visprune.data_prep.templates import resolve_for_model
from visprune.modeling import PLAN_FILE, load_pruned

from .evaluate import plan_flops
from .vqa_eval import PromptEncoder

MODEL_NAME = "visprune"
CLASS_PATH = "visprune.trainer.lmms_plugin.VisPrune"
REPORT_ENV = "VISPRUNE_LMMS_REPORT"  # default for `report=`; the launcher sets it from --output_path


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("1", "true", "yes"):
        return True
    if str(value).strip().lower() in ("0", "false", "no", "none", ""):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


class PrefillTimer:
    """Forward hooks timing every prefill forward of a model (the first forward of a `generate` call,
    or a forward without a cache), per kind of request; nothing is run twice."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.kind = "generate"
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "samples": 0, "seconds": 0.0})
        self._start: float | None = None
        self._cuda = next(model.parameters()).device.type == "cuda"
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True)]

    @staticmethod
    def is_prefill(kwargs: dict[str, Any]) -> bool:
        cache = kwargs.get("past_key_values")
        return cache is None or cache.get_seq_length() == 0

    def _pre(self, module, args, kwargs):
        if self.is_prefill(kwargs):
            if self._cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        if self._start is None:
            return
        if self._cuda:
            torch.cuda.synchronize()
        entry = self.stats[self.kind]
        entry["seconds"] += time.perf_counter() - self._start
        entry["calls"] += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        entry["samples"] += int(ids.shape[0]) if ids is not None else 0
        self._start = None

    def summary(self) -> dict[str, dict[str, float]]:
        return {kind: {**entry, "ms_per_call": 1000 * entry["seconds"] / entry["calls"] if entry["calls"] else 0.0,
                       "ms_per_sample": 1000 * entry["seconds"] / entry["samples"] if entry["samples"] else 0.0}
                for kind, entry in self.stats.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _register_legacy(cls):
    """lmms-eval's `register_model` decorator (the registry older versions resolve `--model` with)."""
    try:
        from lmms_eval.api.registry import register_model
    except ImportError:  # pragma: no cover
        return cls
    return register_model(MODEL_NAME)(cls)


@_register_legacy
class VisPrune(lmms):
    """lmms-eval's `visprune` model (see the module docstring). `model_args`: `pretrained` (a model
    folder), `device` (default: cuda when available, else cpu; `cuda:LOCAL_RANK` under a multi-process
    launcher), `dtype` (auto / float32 / bfloat16 / float16), `batch_size`, `max_new_tokens` (default
    for tasks that set none), `trust_remote_code`, `report` (a JSON path)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", batch_size: int | str = 1,
                 max_new_tokens: int | str = 128, trust_remote_code: bool | str = False, report: str | None = None,
                 max_batch_size: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"visprune: unknown model_args {sorted(unknown)}; known: pretrained, device, dtype, "
                            "batch_size, max_new_tokens, trust_remote_code, report")
        from transformers import AutoModelForImageTextToText

        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"visprune: {path} is not a model folder (no config.json)")
        if str(batch_size).startswith("auto"):
            raise ValueError("visprune: --batch_size auto is not supported; give a number")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"visprune: batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        trust = _as_bool(trust_remote_code)
        if device is None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if torch.cuda.is_available():
                device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world > 1 else "cuda"
            else:
                device = "cpu"
        self._device = torch.device(device)
        torch_dtype: Any = "auto" if dtype in (None, "auto") else getattr(torch, str(dtype))
        if (path / PLAN_FILE).is_file():
            model = load_pruned(path, dtype=torch_dtype, device=self._device, trust_remote_code=trust)
        else:
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch_dtype,
                                                                trust_remote_code=trust).to(self._device).eval()
        self._model = model
        self.processor = load_processor(path, trust_remote_code=trust)
        self._tokenizer = self.processor.tokenizer
        self.encoder = PromptEncoder(self.processor, None, resolve_for_model(model, self.processor, path))
        self.pretrained = str(path)
        self.hardened = getattr(model, "visprune_plan", None) is not None
        self.visual_flops = plan_flops(model)
        self.timer = PrefillTimer(model)
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

    # ---- prompts -------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list:
        from PIL import Image

        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat = []
        for visual in visuals:
            if isinstance(visual, (list, tuple)):
                flat += list(visual)
            else:
                flat.append(visual)
        for visual in flat:
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(f"visprune: task {task!r} gives a {type(visual).__name__} visual; only "
                                          "images (PIL) are supported (no video, audio or file paths)")
        return [visual.convert("RGB") for visual in flat]

    def prompt(self, context: str, num_images: int) -> str:
        """The chat-templated prompt of one request: the context as the user turn, each `<image>` in it
        (or, when it has none, one per image in front of it, as lmms-eval's LLaVA models do) becoming the
        family's image text, then the generation prompt."""
        count = context.count(IMAGE_PLACEHOLDER)
        if count and count != num_images:
            raise DataError(f"visprune: the context has {count} {IMAGE_PLACEHOLDER} but the request has {num_images} "
                            "images")
        if not count and num_images:
            context = " ".join([IMAGE_PLACEHOLDER] * num_images) + "\n" + context
        row = {"id": "lmms-eval", "images": [], "conversations": [{"from": "human", "value": context}]}
        return self.encoder.prompt(row)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(self._model.parameters()).dtype
        return {key: value.to(self._device, dtype) if value.is_floating_point() else value.to(self._device)
                for key, value in batch.items()}

    # ---- requests ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to `generate_until` requests, in request order; requests with equal generation kwargs
        are batched, longest prompts first."""
        from tqdm.auto import tqdm

        items = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = self._visuals(doc_to_visual, task, split, doc_id)
            items.append((index, self.prompt(context, len(images)), images, dict(gen_kwargs or {})))
        groups: dict[str, list] = defaultdict(list)
        for item in items:
            groups[json.dumps(item[3], sort_keys=True, default=str)].append(item)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="visprune generate", disable=self.rank != 0)
        self.timer.kind = "generate"
        for group in groups.values():
            group.sort(key=lambda item: -len(item[1]))
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                for (index, _, _, _), text in zip(chunk, self._generate(chunk)):
                    results[index] = text
                bar.update(len(chunk))
        bar.close()
        self._report_done()
        return results  # type: ignore[return-value]

    def _generate(self, chunk: list) -> list[str]:
        gen_kwargs = dict(chunk[0][3])
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        settings: dict[str, Any] = {"do_sample": temperature > 0, "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1)}
        if temperature > 0:
            settings["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                settings["top_p"] = float(gen_kwargs["top_p"])
        batch = self.encoder.encode([item[1] for item in chunk], [image for item in chunk for image in item[2]])
        before = dict(self.timer.stats["generate"])
        start = time.perf_counter()
        with torch.no_grad():
            out = self._model.generate(**self._inputs(batch), max_new_tokens=max_new_tokens,
                                       pad_token_id=self._tokenizer.pad_token_id,
                                       eos_token_id=self.encoder.stop_ids, **settings)
        seconds = time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1]:].cpu()
        texts = self._tokenizer.batch_decode(new, skip_special_tokens=True)
        for stop in until:
            texts = [text.split(stop)[0] if stop else text for text in texts]
        prefill = self.timer.stats["generate"]["seconds"] - before["seconds"]
        self._log_throughput(seconds, int((new != self._tokenizer.pad_token_id).sum()), len(chunk), prefill)
        return [text.strip() for text in texts]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding produces it) per request,
        in request order. The context is chat-templated with the generation prompt; the continuation's
        tokens are those the tokenizer gives the prompt + continuation text beyond the prompt's own."""
        from tqdm.auto import tqdm

        items = []
        for index, request in enumerate(requests):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation = doc_to_target if isinstance(doc_to_target, str) else \
                doc_to_target(self._doc(task, split, doc_id))
            images = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self.prompt(context, len(images))
            items.append((index, prompt, images, self._continuation_ids(prompt, str(continuation))))
        order = sorted(items, key=lambda item: -len(item[1]) - len(item[3]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="visprune loglikelihood", disable=self.rank != 0)
        self.timer.kind = "loglikelihood"
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for (index, _, _, _), result in zip(chunk, self._loglikelihood(chunk)):
                results[index] = result
            bar.update(len(chunk))
        bar.close()
        self.timer.kind = "generate"
        self._report_done()
        return results  # type: ignore[return-value]

    def _add_special(self, text: str) -> bool:
        bos = self._tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def _continuation_ids(self, prompt: str, continuation: str) -> list[int]:
        # lm-eval's convention: a context's trailing spaces belong to the continuation
        spaces = len(prompt) - len(prompt.rstrip(" "))
        if spaces:
            prompt, continuation = prompt[:-spaces], prompt[-spaces:] + continuation
        special = self._add_special(prompt)
        whole = self._tokenizer(prompt + continuation, add_special_tokens=special)["input_ids"]
        alone = self._tokenizer(prompt, add_special_tokens=special)["input_ids"]
        if whole[:len(alone)] != alone:  # the boundary merged into one token: encode the continuation alone
            return self._tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return whole[len(alone):]

    def _loglikelihood(self, chunk: list) -> list[tuple[float, bool]]:
        """One right-padded forward over prompt + continuation ids of every item of `chunk`."""
        batch = self.encoder.encode([item[1] for item in chunk], [image for item in chunk for image in item[2]],
                                    padding_side="right")
        mask = batch["attention_mask"].bool()
        token_keys = [key for key, value in batch.items() if key != "input_ids" and value.dim() == 2
                      and value.shape == batch["input_ids"].shape]
        rows, starts = [], []
        for b, item in enumerate(chunk):
            prompt_ids = batch["input_ids"][b][mask[b]]
            starts.append(prompt_ids.numel())
            rows.append(torch.cat([prompt_ids, torch.tensor(item[3], dtype=torch.long)]))
        length = max(row.numel() for row in rows)
        ids = torch.full((len(rows), length), self._tokenizer.pad_token_id, dtype=torch.long)
        full = {key: torch.zeros((len(rows), length), dtype=batch[key].dtype) for key in token_keys}
        for b, row in enumerate(rows):
            ids[b, :row.numel()] = row
            for key in token_keys:
                values = batch[key][b][mask[b]]
                full[key][b, :values.numel()] = values
                if key == "attention_mask":
                    full[key][b, :row.numel()] = 1
        inputs = {**{k: v for k, v in batch.items() if k not in token_keys and k != "input_ids"}, **full,
                  "input_ids": ids}
        keep = length - min(starts) + 1  # logits from the first continuation's predicting position on
        with torch.no_grad():
            logits = self._model(**self._inputs(inputs), logits_to_keep=keep).logits.float().cpu()
        offset = length - keep
        results = []
        for b, (item, start) in enumerate(zip(chunk, starts)):
            target = torch.tensor(item[3], dtype=torch.long)
            if not target.numel():
                results.append((0.0, True))
                continue
            rows_logits = logits[b, start - 1 - offset:start - 1 - offset + target.numel()]
            logprobs = torch.log_softmax(rows_logits, dim=-1)
            total = float(logprobs.gather(1, target[:, None]).sum())
            results.append((total, bool((rows_logits.argmax(dim=-1) == target).all())))
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

    def _log_throughput(self, seconds: float, new_tokens: int, samples: int, prefill_seconds: float) -> None:
        """One entry of lmms-eval's throughput log per generation batch; its results JSON then carries
        `throughput.avg_prefill_ms_per_sample` (the mean over batches) and `avg_visual_flops_ratio`."""
        extra = {"prefill_ms_per_sample": 1000 * prefill_seconds / samples,
                 "visual_flops_ratio": self.visual_flops["ratio"], "batch_samples": samples}
        try:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
        except ImportError:  # another lmms-eval layout: the report file still has everything
            return
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=new_tokens,
                    avg_speed=new_tokens / seconds if seconds > 0 else 0.0, additional_metrics=extra)

    def _report_done(self) -> None:
        report = self.report()
        prefill = report["prefill"].get("generate") or report["prefill"].get("loglikelihood") or {}
        logger.info(f"visprune: visual FLOPs {self.visual_flops['ratio']:.1%} of dense; mean prefill "
                    f"{prefill.get('ms_per_sample', 0.0):.2f} ms/sample over {int(prefill.get('samples', 0))} samples")
        if self.report_path and self.rank == 0:
            path = Path(self.report_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
            os.replace(tmp, path)


# ---- registration ---------------------------------------------------------------------------------------
def manifest():
    """The `lmms_eval.models` entry-point payload: `visprune = "visprune.trainer.lmms_plugin:manifest"`."""
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
    """`python -m visprune.trainer.lmms_plugin ARGS`: lmms-eval's command line with `visprune` registered;
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


__all__ = ["MODEL_NAME", "PrefillTimer", "VisPrune", "main", "manifest", "register"]

if __name__ == "__main__":
    main()
