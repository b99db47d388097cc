"""The synthetic see-task: LLaVA-format samples about images of a grid of cells, each empty or holding
a coloured shape. Two kinds of samples, both scored:

- describe: "describe the grid." -> every cell in raster order, "<colour> <shape>" or "none",
  separated by commas (scored as token accuracy, like dense captioning or reading);
- ask: the colour or the shape in a given cell, how many shapes of a colour, whether a given
  coloured shape exists (yes/no); scored by exact match.

Everything is deterministic per seed. `write_seetask(out_dir, cfg)` writes `train.json`, `val.json`,
`test.json`, `images/*.png` and `scenes.json` (the ground truth every answer is derived from).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .toy import COLOURS, IMAGE, SHAPES, draw_shape, words_in

logger = logging.getLogger(__name__)

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty", "twenty-one", "twenty-two", "twenty-three", "twenty-four", "twenty-five")
ASK_TYPES = ("colour_at", "shape_at", "count", "exists")
DESCRIBE = "describe"
SPLITS = ("train", "val", "test")
BACKGROUND = (245, 245, 240)


@dataclass
class SeeTaskConfig:
    """Generator parameters. Cells are `image_size // grid` px; with `patch_size` smaller than a cell,
    a shape spans several visual tokens (so the neighbour window matters)."""

    image_size: int = 36
    grid: int = 3
    patch_size: int = 6
    num_colours: int = 4
    num_shapes: int = 3
    empty_fraction: float = 0.35
    describe_fraction: float = 0.5  # the rest are ask samples, spread evenly over ASK_TYPES
    num_train: int = 4000
    num_val: int = 200
    num_test: int = 400
    seed: int = 0
    colours: list[str] = field(default_factory=list)  # filled from num_colours
    shapes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.num_colours <= len(COLOURS):
            raise ValueError(f"num_colours must be in [1, {len(COLOURS)}], got {self.num_colours}")
        if not 1 <= self.num_shapes <= len(SHAPES):
            raise ValueError(f"num_shapes must be in [1, {len(SHAPES)}], got {self.num_shapes}")
        if self.grid < 1 or self.grid * self.grid >= len(NUMBER_WORDS):
            raise ValueError(f"grid must be in [1, {int((len(NUMBER_WORDS) - 1) ** 0.5)}], got {self.grid}")
        if self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} is not a multiple of grid {self.grid}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.empty_fraction < 1.0:
            raise ValueError(f"empty_fraction must be in [0, 1), got {self.empty_fraction}")
        if not 0.0 <= self.describe_fraction <= 1.0:
            raise ValueError(f"describe_fraction must be in [0, 1], got {self.describe_fraction}")
        self.colours = list(COLOURS)[: self.num_colours]
        self.shapes = list(SHAPES)[: self.num_shapes]

    @property
    def cell_size(self) -> int:
        return self.image_size // self.grid

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size


Scene = list  # grid*grid cells in raster order, each None or [colour, shape]


def make_scene(rng: random.Random, cfg: SeeTaskConfig) -> Scene:
    return [None if rng.random() < cfg.empty_fraction else [rng.choice(cfg.colours), rng.choice(cfg.shapes)]
            for _ in range(cfg.grid * cfg.grid)]


def render(scene: Scene, cfg: SeeTaskConfig) -> Image.Image:
    image = Image.new("RGB", (cfg.image_size, cfg.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = cfg.cell_size
    margin = max(1, cell // 8)
    for idx, item in enumerate(scene):
        if item is None:
            continue
        row, col = divmod(idx, cfg.grid)
        box = (col * cell + margin, row * cell + margin, (col + 1) * cell - 1 - margin, (row + 1) * cell - 1 - margin)
        draw_shape(draw, item[1], box, COLOURS[item[0]])
    return image


def describe_answer(scene: Scene) -> str:
    return ", ".join("none" if item is None else f"{item[0]} {item[1]}" for item in scene)


def ordinal(index: int) -> str:
    return NUMBER_WORDS[index + 1]


def ask(rng: random.Random, scene: Scene, cfg: SeeTaskConfig, qtype: str) -> tuple[str, str, str]:
    """(qtype asked, question, answer) about `scene`, the answer derived from the scene only; an empty
    grid turns a colour_at / shape_at request into a count question."""
    filled = [idx for idx, item in enumerate(scene) if item is not None]
    if qtype in ("colour_at", "shape_at") and not filled:
        qtype = "count"  # an empty grid has no cell to ask about
    if qtype == "colour_at":
        idx = rng.choice(filled)
        row, col = divmod(idx, cfg.grid)
        return qtype, f"what colour is the shape in row {ordinal(row)}, column {ordinal(col)}?", scene[idx][0]
    if qtype == "shape_at":
        idx = rng.choice(filled)
        row, col = divmod(idx, cfg.grid)
        return qtype, f"what shape is in row {ordinal(row)}, column {ordinal(col)}?", scene[idx][1]
    if qtype == "count":
        colour = rng.choice(cfg.colours)
        count = sum(1 for item in scene if item is not None and item[0] == colour)
        return qtype, f"how many {colour} shapes are there?", NUMBER_WORDS[count]
    if qtype == "exists":
        present = sorted({(item[0], item[1]) for item in scene if item is not None})
        if present and rng.random() < 0.5:
            colour, shape = rng.choice(present)
        else:
            colour, shape = rng.choice(cfg.colours), rng.choice(cfg.shapes)
        answer = "yes" if [colour, shape] in scene else "no"
        return qtype, f"is there a {colour} {shape}?", answer
    raise ValueError(f"unknown question type {qtype!r}; known: {ASK_TYPES}")


def answer_from_scene(scene: Scene, question: str, cfg: SeeTaskConfig) -> str:
    """Recompute the answer of a generated question from the scene (used by tests and `eval`)."""
    words = question.rstrip("?").replace(",", "").split()
    if question.startswith("describe"):
        return describe_answer(scene)
    if question.startswith(("what colour is the shape in row", "what shape is in row")):
        row, col = NUMBER_WORDS.index(words[-3]) - 1, NUMBER_WORDS.index(words[-1]) - 1
        item = scene[row * cfg.grid + col]
        return item[0] if question.startswith("what colour") else item[1]
    if question.startswith("how many"):
        colour = words[2]
        return NUMBER_WORDS[sum(1 for item in scene if item is not None and item[0] == colour)]
    if question.startswith("is there a"):
        return "yes" if [words[3], words[4]] in scene else "no"
    raise ValueError(f"not a see-task question: {question!r}")


def make_split(split: str, num: int, cfg: SeeTaskConfig) -> tuple[list[dict], dict[str, Image.Image], dict]:
    """Records, images by file name and scenes by id for one split (its own derived seed)."""
    rng = random.Random(f"{cfg.seed}-{split}")
    records, images, scenes = [], {}, {}
    num_describe = round(num * cfg.describe_fraction)
    kinds = [DESCRIBE] * num_describe + [ASK_TYPES[i % len(ASK_TYPES)] for i in range(num - num_describe)]
    rng.shuffle(kinds)
    for idx, qtype in enumerate(kinds):
        sample_id = f"see-{split}-{idx}"
        scene = make_scene(rng, cfg)
        if qtype == DESCRIBE:
            question, answer = "describe the grid.", describe_answer(scene)
        else:
            qtype, question, answer = ask(rng, scene, cfg, qtype)
        file_name = f"{sample_id}.png"
        images[file_name] = render(scene, cfg)
        scenes[sample_id] = scene
        records.append({"id": sample_id, "image": file_name, "kind": DESCRIBE if qtype == DESCRIBE else "ask",
                        "qtype": qtype,
                        "conversations": [{"from": "human", "value": f"{IMAGE}\n{question}"},
                                          {"from": "gpt", "value": answer}]})
    return records, images, scenes


def seetask_words(cfg: SeeTaskConfig) -> list[str]:
    """Every word the see-task can use, for `toy.build_tokenizer`."""
    texts = [("describe the grid none what colour is the shape in row column what shape is in how many "
             "shapes are there is there a yes no"), " ".join(COLOURS), " ".join(SHAPES), " ".join(NUMBER_WORDS)]
    return words_in(texts)


def write_seetask(out_dir: str | Path, cfg: SeeTaskConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the three splits, their images and scenes under `out_dir`; returns the paths."""
    from tqdm.auto import tqdm

    cfg = cfg or SeeTaskConfig()
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"image_folder": str(image_dir)}
    all_scenes = {}
    sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    for split in SPLITS:
        records, images, scenes = make_split(split, sizes[split], cfg)
        for file_name, image in tqdm(images.items(), desc=f"see-task {split}", disable=not progress,
                                     total=len(images)):
            image.save(image_dir / file_name, format="PNG")
        path = out_dir / f"{split}.json"
        path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        paths[split] = str(path)
        all_scenes.update(scenes)
    (out_dir / "scenes.json").write_text(json.dumps({"config": asdict(cfg), "scenes": all_scenes}) + "\n")
    paths["scenes"] = str(out_dir / "scenes.json")
    logger.info("see-task: %s samples (train/val/test) in %s", "/".join(str(sizes[s]) for s in SPLITS), out_dir)
    return paths


__all__ = ["ASK_TYPES", "DESCRIBE", "SeeTaskConfig", "answer_from_scene", "describe_answer", "make_split",
           "render", "seetask_words", "write_seetask"]
