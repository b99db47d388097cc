"""Prefill timing: `PrefillTimer` measures prefill forwards (device-synchronised wall clock), either calls it is
handed (`time`) or every prefill a model runs inside `generate` (`watch`, forward hooks: nothing runs twice);
`time_alternating` times two or more prefills against each other on one machine. What is timed is the caller's."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA work on `device` (a no-op elsewhere), so a clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class PrefillStats:
    """The prefills recorded under one label: per-call seconds and the samples (batch rows) they covered."""

    times: list[float] = field(default_factory=list)
    samples: int = 0

    @property
    def seconds(self) -> float:
        return sum(self.times)


class PrefillTimer:
    """Seconds of prefill forwards on `device`, per label.

    `time(fn, label)` times one call; `watch(model)` adds forward hooks timing every prefill forward of `model`
    (one without a KV cache or with an empty one: the first forward of a `generate` call) under `self.label`.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.label = "prefill"  # what `watch` records under
        self.stats: dict[str, PrefillStats] = defaultdict(PrefillStats)
        self._start: float | None = None
        self._handles: list[Any] = []

    def _clock(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def record(self, label: str, seconds: float, samples: int = 1) -> None:
        entry = self.stats[label]
        entry.times.append(seconds)
        entry.samples += samples

    def time(self, fn: Callable[[], Any], label: str, samples: int = 1) -> Any:
        """Call `fn()`, record its seconds under `label` (covering `samples` samples); returns its output."""
        start = self._clock()
        out = fn()
        self.record(label, self._clock() - start, samples)
        return out

    # ---- in-line prefills of a model -----------------------------------------------------------------
    def watch(self, model: torch.nn.Module) -> None:
        """Time every prefill forward of `model` from now on, under `self.label` (set it per kind of request)."""
        self._handles += [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                          model.register_forward_hook(self._post, with_kwargs=True)]

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def is_prefill(kwargs: dict[str, Any]) -> bool:
        cache = kwargs.get("past_key_values")
        return cache is None or cache.get_seq_length() == 0

    def _pre(self, module, args, kwargs) -> None:
        if self.is_prefill(kwargs):
            self._start = self._clock()

    def _post(self, module, args, kwargs, output) -> None:
        if self._start is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.record(self.label, self._clock() - self._start, int(ids.shape[0]) if ids is not None else 0)
        self._start = None

    # ---- reading ---------------------------------------------------------------------------------------
    def seconds(self, label: str) -> float:
        return self.stats[label].seconds if label in self.stats else 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        """{label: calls, samples, seconds, ms_per_call, ms_per_sample}."""
        out = {}
        for label, entry in self.stats.items():
            calls, seconds = len(entry.times), entry.seconds
            out[label] = {"calls": calls, "samples": entry.samples, "seconds": seconds,
                          "ms_per_call": 1000 * seconds / calls if calls else 0.0,
                          "ms_per_sample": 1000 * seconds / entry.samples if entry.samples else 0.0}
        return out


def time_alternating(runs: dict[str, Callable[[], Any]], repeats: int, device: str | torch.device,
                     after: Callable[[str, Any], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each run's call, under `torch.no_grad()`: one untimed warm-up call of each, then `repeats`
    timed calls of each, the order of the runs reversed every other repeat (drift on a busy machine hits
    them alike). `after(name, output)` sees every timed call's output (e.g. to read its KV cache).

    Returns:
        {name: [seconds of each timed call]}, in the order of `runs`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timer = PrefillTimer(device)
    names = list(runs)
    with torch.no_grad():
        for name in names:
            runs[name]()
        for rep in range(repeats):
            for name in names if rep % 2 == 0 else names[::-1]:
                out = timer.time(runs[name], name)
                if after is not None:
                    after(name, out)
                del out
    return {name: timer.stats[name].times for name in names}


__all__ = ["PrefillStats", "PrefillTimer", "synchronize", "time_alternating"]
