"""Videos through the real transformers `Qwen2VLProcessor`, where it can be built (it needs torchvision, and
decoding a video file needs torchcodec with FFmpeg; the CPU test machine has neither, so this is not part of the
suite). Builds the published Qwen2-VL processor folder (`tests/published.py`), collates a frame-list video and, with
PyAV installed to write one, an MP4 file through `ChatCollator`, and runs the batch through a tiny model of the
published geometry gated and hardened under a spatio-temporal plan.

Run (an environment with visprune importable, torch + the matching torchvision, torchcodec, av):
    python tests/manual/check_qwen_video_processor.py
Seen with transformers 5.23.0, torch 2.14.1 + torchvision 0.29.1, torchcodec 0.17.0, av 18.1.0: every check passes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: published.py

from published import build_processor_folder, build_tiny_model, spatio_temporal_logits
from transformers import AutoProcessor
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.templates import resolve_template


def write_frames(folder: Path, count: int, size: int = 56) -> list[str]:
    names = []
    for i in range(count):
        frame = Image.new("RGB", (size, size), "white")
        frame.paste((200, 30, 30), (4 * i, 8, 4 * i + 16, 24))
        frame.save(folder / f"f{i}.png")
        names.append(f"f{i}.png")
    return names


def write_mp4(path: Path, frames: int = 8, size: int = 64) -> bool:
    """An MPEG-4 clip of a moving square, written with PyAV; False when PyAV is not installed."""
    try:
        import av
        import numpy as np
    except ImportError:
        return False
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), 255, np.uint8)
            image[8:24, 4 * i:4 * i + 16] = (200, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return True


def main() -> None:
    root = Path(tempfile.mkdtemp())
    folder = build_processor_folder("qwen2-vl", root / "qwen2-vl")
    processor = AutoProcessor.from_pretrained(str(folder))
    media = root / "media"
    media.mkdir()
    frames = write_frames(media, 4)
    human = lambda value: {"from": "human", "value": value}
    gpt = lambda value: {"from": "gpt", "value": value}
    rows = [{"id": "frames", "images": [], "videos": [{"file": "", "frames": frames}],
             "conversations": [human("<video>\nwhat happens?"), gpt("a red square moves")]},
            {"id": "two", "images": [], "videos": [{"file": "", "frames": frames[:2]}],
             "conversations": [human("<video>\nwhat?"), gpt("it moves")]}]
    expected_grids = [[2, 4, 4], [1, 4, 4]]
    if write_mp4(media / "clip.mp4"):
        rows.append({"id": "file", "images": [], "videos": [{"file": "clip.mp4", "frames": []},
                                                            {"file": "", "frames": frames[:2]}],
                     "conversations": [human("<video><video>\ncompare"), gpt("the same square")]})
        expected_grids += [[4, 4, 4], [1, 4, 4]]
    else:
        print("PyAV is not installed: no MP4 file is written or decoded")
    collator = ChatCollator(processor, resolve_template(processor, "processor", "qwen2_vl"), image_folder=media)
    batch = collator(rows)
    assert batch["video_grid_thw"].tolist() == expected_grids, batch["video_grid_thw"].tolist()
    video = batch["input_ids"] == processor.video_token_id
    assert int(video.sum()) == sum(t * h * w // 4 for t, h, w in expected_grids)
    assert not bool((batch["labels"][video] != -100).any()) and bool((batch["mm_token_type_ids"][video] == 2).all())
    print("collated:", {key: tuple(value.shape) for key, value in batch.items()}, "grids", expected_grids)

    model = build_tiny_model("qwen2-vl", folder, num_layers=2)
    gated, hardened = spatio_temporal_logits(model, {key: value for key, value in batch.items() if key != "labels"})
    difference = (gated - hardened).abs().max()
    with torch.no_grad():
        loss = model(**batch).loss
    assert float(difference) < 1e-4 and torch.isfinite(loss)
    print(f"hardened vs gated: max |difference| {float(difference):.1e}; loss {float(loss):.3f}; every check passed")


if __name__ == "__main__":
    main()
