"""A LLaVA-665K-shaped mix for `visprune data prepare` throughput: N samples (default 665,000), about 6%
text-only (as in llava_v1_5_mix665k.json: 40,688 of 665,298), the rest over a few thousand distinct
tiny images (24 x 24, the toy model's size, JPEG and PNG, in LLaVA's source folders: coco, gqa,
ocr_vqa, textvqa, vg) that samples share, with 1-10 question/answer rounds, short and long answers,
and a few bad samples of the kinds real mixes have (missing files, GIF data named .jpg). Writes
OUT/mix.json, OUT/images/ and OUT/processor/ (the toy LLaVA processor). Deterministic for a seed.

    python benchmarks/make_mix.py --out /tmp/mix665k
    visprune data prepare --json /tmp/mix665k/mix.json --images /tmp/mix665k/images \\
        --processor /tmp/mix665k/processor --out /tmp/mix665k/prepared --skip-bad
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw
from visprune.data_prep.toy import COLOURS, POSITIONS, SHAPES, TEXT_ONLY_QA, build_processor, build_tokenizer, toy_words

SOURCES = (("coco/train2017", ".jpg", 0.40), ("gqa/images", ".jpg", 0.20), ("ocr_vqa/images", ".jpg", 0.15),
           ("textvqa/train_images", ".jpg", 0.10), ("vg/VG_100K", ".png", 0.15))
TEXT_ONLY = 0.061
IMAGE_SIZE = 24


def draw_image(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(rng.randrange(200, 256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y = rng.randrange(0, IMAGE_SIZE - 6), rng.randrange(0, IMAGE_SIZE - 6)
        size = rng.randint(4, 10)
        draw.rectangle((x, y, x + size, y + size), fill=COLOURS[rng.choice(sorted(COLOURS))])
    return image


def write_images(folder: Path, num_images: int, rng: random.Random) -> list[str]:
    names = []
    weights = [weight for _, _, weight in SOURCES]
    for index in range(num_images):
        sub, ending, _ = rng.choices(SOURCES, weights)[0]
        name = f"{sub}/{index:09d}{ending}"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_image(rng).save(path, format="JPEG" if ending == ".jpg" else "PNG", quality=90)
        names.append(name)
    return names


def words(rng: random.Random, vocabulary: list[str], low: int, high: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(low, high)))


def question_answer(rng: random.Random, vocabulary: list[str]) -> tuple[str, str]:
    shape, colour, position = rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(POSITIONS)
    kind = rng.random()
    if kind < 0.45:  # VQA-style: a short answer
        return rng.choice((f"what colour is the {shape}?", f"what shape is at the {position}?",
                           f"where is the {shape}?")), rng.choice((colour, shape, position))
    if kind < 0.85:  # a sentence or two
        return f"where is the {shape}? {words(rng, vocabulary, 3, 8)}", words(rng, vocabulary, 8, 30) + "."
    return "describe the image.", words(rng, vocabulary, 40, 120) + "."  # detailed description


def rounds(rng: random.Random) -> int:
    return min(10, 1 + int(rng.expovariate(1 / 1.8)))


def make_record(index: int, rng: random.Random, vocabulary: list[str], images: list[str]) -> dict:
    if rng.random() < TEXT_ONLY:  # ShareGPT-like: longer text, no image
        turns = []
        for _ in range(rng.randint(1, 4)):
            question, answer = rng.choice(TEXT_ONLY_QA)
            turns += [{"from": "human", "value": f"{question} {words(rng, vocabulary, 0, 20)}"},
                      {"from": "gpt", "value": f"{answer}. {words(rng, vocabulary, 10, 150)}"}]
        return {"id": f"sharegpt-{index}", "conversations": turns}
    image = rng.choice(images)
    turns = []
    for turn in range(rounds(rng)):
        question, answer = question_answer(rng, vocabulary)
        if turn == 0:
            question = f"{question}\n<image>" if rng.random() < 0.1 else f"<image>\n{question}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"{image.split('/')[0]}-{index}", "image": image, "conversations": turns}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (mix.json, images/, processor/)")
    parser.add_argument("--num-samples", type=int, default=665_000)
    parser.add_argument("--num-images", type=int, default=5_000, help="distinct image files")
    parser.add_argument("--num-bad", type=int, default=60, help="bad samples: missing image / GIF named .jpg")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    out = Path(args.out)
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    images = write_images(folder, args.num_images, rng)
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "green").save(folder / "ocr_vqa/images/gif-named.jpg", format="GIF")
    vocabulary = toy_words()
    build_processor(build_tokenizer(vocabulary), image_size=IMAGE_SIZE).save_pretrained(out / "processor")

    bad = set(rng.sample(range(args.num_samples), min(args.num_bad, args.num_samples)))
    counts = {"samples": args.num_samples, "text_only": 0, "with_images": 0, "bad": 0}
    with open(out / "mix.json", "w", encoding="utf-8") as handle:
        handle.write("[\n")
        for index in range(args.num_samples):
            record = make_record(index, rng, vocabulary, images)
            if index in bad and "image" in record:
                record["image"] = "ocr_vqa/images/gif-named.jpg" if index % 2 else "coco/train2017/missing.jpg"
                counts["bad"] += 1
            counts["with_images" if "image" in record else "text_only"] += 1
            handle.write(("" if index == 0 else ",\n") + json.dumps(record))
        handle.write("\n]\n")
    counts.update(distinct_images=len(images), json_bytes=(out / "mix.json").stat().st_size,
                  seconds=round(time.perf_counter() - began, 1))
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
