"""The named see-task variants of `visprune demo --task`: each is the data generator's settings and the
dense base's shape, as overrides of `SeeTaskConfig` and `BaseModelConfig` (a light module: the CLI reads
it to build its help)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SeeTaskPreset:
    """A named see-task: the generator's settings and the dense base's shape (both as overrides)."""

    description: str
    data: dict[str, Any] = field(default_factory=dict)  # SeeTaskConfig fields
    base: dict[str, Any] = field(default_factory=dict)  # BaseModelConfig fields


TASKS = {
    "basic": SeeTaskPreset("3x3 grid, 6 px patches (2x2 visual tokens a cell), 4 colours x 3 shapes, 2-layer vision "
                           "tower"),
    "fine": SeeTaskPreset("3x3 grid, 4 px patches (3x3 visual tokens a cell, 81 in all), 4 colours x 3 shapes; the "
                          "projector reads the patch embeddings, so the language model's own layers must see the shapes",
                          data={"patch_size": 4}, base={"vision_layers": 1, "vision_feature_layer": -2}),
}
DEFAULT_TASK = "fine"
TASK_OPTIONS = ("image_size", "grid", "patch_size", "num_colours", "num_shapes", "empty_fraction", "describe_fraction")


__all__ = ["DEFAULT_TASK", "TASKS", "TASK_OPTIONS", "SeeTaskPreset"]
