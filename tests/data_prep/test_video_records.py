"""LLaVA-format `video` entries: a video file, or a list of videos each a file or a list of frame files, one `<video>`
placeholder per video; checked like images (path rules, frames decoded under the pixel limit, a video file by its
container bytes), rendered by the published Qwen2-VL chat template and visprune's chatml as the family's video
text, and collated into `pixel_values_videos` / `video_grid_thw` that the Qwen2-VL model (published geometry) runs
gated and hardened.

transformers 5.x's Qwen2-VL processor cannot be built here (its video processor needs torchvision, which does not
install beside this torch), so the collator is driven by `QwenVideoStandIn`: the published tokenizer and chat
template, with the processor's placeholder expansion (`<|video_pad|>` x t*h*w / merge^2), its output keys and its
video loader's interface. What the stand-in mirrors was read off the real `Qwen2VLProcessor` (transformers 5.23.0
with torch 2.14.1 + torchvision 0.29.1 and torchcodec 0.17, in a separate environment): 4 frames of 56x56 give
`video_grid_thw` [2, 4, 4], 32 patch rows of 1176 and 8 video tokens; `mm_token_type_ids` is 2 on them; frames as
PIL images or as a (T, C, H, W) uint8 tensor give equal pixels; an MP4 path and its `fetch_videos` tensor give
equal pixels; one call that mixes a path and a frame list fails inside transformers, hence the collator decodes
files with `fetch_videos` first; without torchcodec `fetch_videos` raises ImportError."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from visprune.data_prep.check import Judge
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.images import is_video_container
from visprune.data_prep.records import MAX_VIDEO_FRAMES, DataError, build_dataset, normalize_record
from visprune.data_prep.templates import resolve_template, to_blocks, to_messages
from visprune.modeling import GateConfig, attach_gates

MP4_HEAD = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00"  # an ISO BMFF file's first box


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def record(video, question="<video>\nwhat happens?", sample_id="v"):
    return {"id": sample_id, "video": video, "conversations": [human(question), gpt("a red square moves")]}


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    from published import build_processor_folder

    return build_processor_folder("qwen2-vl", tmp_path_factory.mktemp("qwen2-vl"))


@pytest.fixture
def media(tmp_path):
    """Four 56x56 frames of a moving square, a 40x40 frame, and a file that starts like an MP4."""
    for i in range(4):
        frame = Image.new("RGB", (56, 56), "white")
        frame.paste((200, 30, 30), (4 * i, 8, 4 * i + 16, 24))
        frame.save(tmp_path / f"f{i}.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "small.png")
    (tmp_path / "clip.mp4").write_bytes(MP4_HEAD + bytes(64))
    (tmp_path / "fake.mp4").write_text("not a video")
    return tmp_path


class QwenVideoStandIn:
    """The published Qwen2-VL tokenizer and chat template, called as the collator calls `Qwen2VLProcessor`: each
    `<|video_pad|>` becomes t*h*w / merge^2 pads (t = frames / temporal_patch_size, h, w = the frame in 14 px
    patches), with offsets, text replacement offsets, `mm_token_type_ids` (2 on video tokens) and
    `pixel_values_videos` (t*h*w patch rows of 3*2*14*14) / `video_grid_thw`. A video file is taken as 4 frames of
    56x56 (nothing decodes it here)."""

    def __init__(self, folder):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.chat_template = self.tokenizer.chat_template
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(self.video_token)
        self.fetched = []
        self.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2, patch_size=14,
                                               fetch_videos=self.fetch_videos)
        self.calls = []

    def fetch_videos(self, path):
        """The loader's interface: (T, C, H, W) uint8 frames and metadata; here 4 frames of 56x56 (nothing decodes)."""
        self.fetched.append(path)
        return torch.zeros(4, 3, 56, 56, dtype=torch.uint8), {"total_num_frames": 4, "fps": 2.0}

    def apply_chat_template(self, conversations, **kwargs):
        return self.tokenizer.apply_chat_template(conversations, **kwargs)

    @staticmethod
    def grid(video):
        frames, _, height, width = video.shape
        return [math.ceil(frames / 2), round(height / 28) * 2, round(width / 28) * 2]

    def __call__(self, text, images=None, videos=None, add_special_tokens=True, return_offsets_mapping=False,
                 return_text_replacement_offsets=False, return_tensors=None, video_metadata=None, **kwargs):
        assert not images, "a video stand-in"
        assert all(isinstance(video, torch.Tensor) and video.dtype == torch.uint8 for video in videos or [])
        self.calls.append((videos, video_metadata))
        grids = iter([self.grid(video) for video in videos or []])
        used, texts, replacements = [], [], []
        for item in text:
            out, moves, start = "", [], 0
            while (at := item.find(self.video_token, start)) >= 0:
                grid = next(grids)
                used.append(grid)
                out += item[start:at]
                pads = self.video_token * (math.prod(grid) // 4)
                moves.append({"span": (at, at + len(self.video_token)), "new_span": (len(out), len(out) + len(pads))})
                out += pads
                start = at + len(self.video_token)
            texts.append(out + item[start:])
            replacements.append(moves)
        assert next(grids, None) is None, "more videos than video tokens"
        result = dict(self.tokenizer(texts, add_special_tokens=add_special_tokens,
                                     return_offsets_mapping=return_offsets_mapping))
        result["mm_token_type_ids"] = [[2 if t == self.video_token_id else 0 for t in ids] for ids in result["input_ids"]]
        if return_text_replacement_offsets:
            result["text_replacement_offsets"] = replacements
        if used:
            result["video_grid_thw"] = torch.tensor(used)
            result["pixel_values_videos"] = torch.randn(sum(math.prod(g) for g in used), 3 * 2 * 14 * 14,
                                                        generator=torch.Generator().manual_seed(len(self.calls)))
        if return_tensors == "pt":
            result["input_ids"] = torch.tensor(result["input_ids"])
        return result


# ---- records -------------------------------------------------------------------------------------------------
def test_video_entries_are_files_or_frame_lists():
    _, row, reasons = normalize_record(record("clip.mp4"), 0)
    assert reasons == [] and row["videos"] == [{"file": "clip.mp4", "frames": []}]
    two = record(["clip.mp4", ["f0.png", "f1.png"]], "<video><video>\ncompare")
    _, row, reasons = normalize_record(two, 0)
    assert reasons == [] and row["videos"] == [{"file": "clip.mp4", "frames": []}, {"file": "", "frames": ["f0.png", "f1.png"]}]
    assert row["images"] == []


@pytest.mark.parametrize("video, question, reason", [
    ("clip.mp4", "what happens?", "0 <video> placeholders but 1 videos"),
    (["a.mp4", "b.mp4"], "<video>\nwhat?", "1 <video> placeholders but 2 videos"),
    ("../clip.mp4", "<video>\nwhat?", "video '../clip.mp4': '..' is not allowed"),
    ([["f0.png", "/etc/passwd"]], "<video>\nwhat?", "video '/etc/passwd': absolute paths are not allowed"),
    ([[]], "<video>\nwhat?", "video[0] has no frames"),
    ([["f.png"] * (MAX_VIDEO_FRAMES + 1)], "<video>\nwhat?", f"has {MAX_VIDEO_FRAMES + 1} frame files; at most"),
    ({"file": "clip.mp4"}, "<video>\nwhat?", "'video' must be a video file, or a list of videos"),
    ([["f0.png", 3]], "<video>\nwhat?", "video[0]: 'video' must be a video file"),
    ("", "<video>\nwhat?", "video '': empty path or NUL byte"),
])
def test_bad_video_entries_are_named(video, question, reason):
    name, _row, reasons = normalize_record(record(video, question), 0)
    assert name == "'v'" and any(reason in item for item in reasons), reasons


def test_a_video_placeholder_in_an_answer_is_refused():
    bad = {"id": "v", "video": "clip.mp4", "conversations": [human("<video>\nwhat?"), gpt("it is <video>")]}
    assert any("<video> outside a human turn" in reason for reason in normalize_record(bad, 0)[2])


def test_build_dataset_keeps_videos(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record([["f0.png", "f1.png"]]), {"id": "t", "conversations": [human("hi"), gpt("yo")]}]))
    dataset = build_dataset(path)
    assert dataset[0]["videos"] == [{"file": "", "frames": ["f0.png", "f1.png"]}] and dataset[1]["videos"] == []
    path.write_text(json.dumps([record("clip.mp4", "what?")]))
    with pytest.raises(DataError, match=r"1 of 1 samples are invalid: 'v': 0 <video> placeholders but 1 videos"):
        build_dataset(path)


def test_video_containers_are_told_by_their_first_bytes():
    assert is_video_container(MP4_HEAD) and is_video_container(b"\x1aE\xdf\xa3" + bytes(12))
    assert is_video_container(b"RIFF\x00\x00\x00\x00AVI LIST") and is_video_container(b"GIF89a" + bytes(10))
    assert not is_video_container(b"\x89PNG\r\n\x1a\n" + bytes(8)) and not is_video_container(b"not a video")


# ---- templates -------------------------------------------------------------------------------------------------
def test_video_blocks_and_the_published_qwen_template(qwen_folder):
    assert to_blocks("<video>\nwhat <image> is it?") == [{"type": "video"}, {"type": "text", "text": "what"},
                                                         {"type": "image"}, {"type": "text", "text": "is it?"}]
    processor = QwenVideoStandIn(qwen_folder)
    conversation = [human("<video>\nwhat happens?"), gpt("a red square moves")]
    for requested, blocks in (("processor", True), ("chatml", True)):
        template = resolve_template(processor, requested, "qwen2_vl")
        assert template.blocks == blocks and template.video_text == "<|vision_start|><|video_pad|><|vision_end|>"
        text = processor.apply_chat_template([to_messages(conversation, template)], tokenize=False,
                                             chat_template=template.source)[0]
        assert "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what happens?<|im_end|>" in text
    strings = dataclasses.replace(template, blocks=False)  # string content: <video> becomes the family's video text
    assert to_messages(conversation, strings)[0]["content"] == "<|vision_start|><|video_pad|><|vision_end|>\nwhat happens?"


# ---- collation -------------------------------------------------------------------------------------------------
def test_videos_collate_into_the_processors_video_tensors(qwen_folder, media):
    processor = QwenVideoStandIn(qwen_folder)
    template = resolve_template(processor, "processor", "qwen2_vl")
    collator = ChatCollator(processor, template, image_folder=media)
    frames = {"id": "frames", "images": [], "videos": [{"file": "", "frames": [f"f{i}.png" for i in range(4)]}],
              "conversations": [human("<video>\nwhat happens?"), gpt("a red square moves")]}
    both = {"id": "both", "images": [], "conversations": [human("<video><video>\ncompare"), gpt("the same")],
            "videos": [{"file": "clip.mp4", "frames": []}, {"file": "", "frames": ["f0.png", "f1.png"]}]}
    batch = collator([frames, both])
    (first, first_metadata), (second, second_metadata) = processor.calls
    assert first[0].shape == (4, 3, 56, 56) and first_metadata is None  # frames: no loader metadata
    expected = torch.from_numpy(np.array(Image.open(media / "f1.png").convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(first[0][1], expected)
    assert processor.fetched == [str((media / "clip.mp4").resolve())]  # a file: the loader gets its real path
    assert second[0].shape == (4, 3, 56, 56) and second[1].shape == (2, 3, 56, 56) and second_metadata is None
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4], [1, 4, 4]]
    assert batch["pixel_values_videos"].shape == (32 + 32 + 16, 1176)
    video = batch["input_ids"] == processor.video_token_id
    assert video.sum(dim=1).tolist() == [8, 8 + 4]
    assert not bool((batch["labels"][video] != -100).any())  # video tokens are never supervised
    assert bool((batch["mm_token_type_ids"][video] == 2).all())
    answer = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert answer.startswith("a red square moves")
    collator.encode({**both, "videos": both["videos"][:1], "conversations": [human("<video>\nwhat?"), gpt("x")]})
    assert processor.calls[-1][1] == [{"total_num_frames": 4, "fps": 2.0}]  # only files: the loader's metadata


@pytest.mark.parametrize("video, message", [
    ({"file": "", "frames": ["f0.png", "small.png"]}, "differ in size (40x40, 56x56)"),
    ({"file": "fake.mp4", "frames": []}, "video 'fake.mp4' is not a video file"),
    ({"file": "missing.mp4", "frames": []}, "video 'missing.mp4' not found in"),
    ({"file": "", "frames": ["f0.png", "nope.png"]}, "image 'nope.png' not found in"),
])
def test_bad_videos_are_named_by_sample(video, message, qwen_folder, media):
    processor = QwenVideoStandIn(qwen_folder)
    collator = ChatCollator(processor, resolve_template(processor, "processor", "qwen2_vl"), image_folder=media)
    row = {"id": "bad", "images": [], "videos": [video], "conversations": [human("<video>\nwhat?"), gpt("x")]}
    with pytest.raises(DataError, match=r"sample 'bad': .*" + message.replace("(", r"\(").replace(")", r"\)")):
        collator.encode(row)


def test_a_processor_without_videos_refuses_a_video_sample(media):
    from published import build_processor_folder
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(build_processor_folder("llava-1.5", media / "llava"))
    template = resolve_template(processor, "auto", "llava")
    row = {"id": "vid", "images": [], "videos": [{"file": "clip.mp4", "frames": []}],
           "conversations": [human("<video>\nwhat?"), gpt("x")]}
    with pytest.raises(DataError, match=r"sample 'vid' has 1 video\(s\) but the processor \(LlavaProcessor\) takes "
                                        r"no videos"):
        ChatCollator(processor, template, image_folder=media).encode(row)
    judge = Judge(media, processor, template)
    _, rejected = judge(0, record("clip.mp4", sample_id="vid"))
    assert rejected["reason"] == "video_unsupported"


def test_the_check_judges_video_files_and_frames(qwen_folder, media):
    processor = QwenVideoStandIn(qwen_folder)
    judge = Judge(media, processor, resolve_template(processor, "processor", "qwen2_vl"))
    cases = {"ok": record([["f0.png", "f1.png"]]), "file": record("clip.mp4"), "fake": record("fake.mp4"),
             "gone": record("gone.mp4"), "frame": record([["f0.png", "gone.png"]]),
             "count": record("clip.mp4", "no placeholder"), "escape": record("../x.mp4"),
             "link": record("link.mp4")}
    (media / "link.mp4").symlink_to(media.parent / "outside.mp4")  # a symlink that leaves the image folder
    (media.parent / "outside.mp4").write_bytes(MP4_HEAD)
    verdicts = {}
    for name, raw in cases.items():
        kept, rejected = judge(0, {**raw, "id": name})
        verdicts[name] = "ok" if kept else rejected["reason"]
    assert verdicts == {"ok": "ok", "file": "ok", "fake": "video_not_a_video", "gone": "video_missing",
                        "frame": "image_missing", "count": "placeholder_count", "escape": "image_path",
                        "link": "image_outside_folder"}


def test_a_collated_video_batch_runs_the_published_geometry_model_gated_and_hardened(qwen_folder, media):
    """The collated batch (2 videos of 2 and 1 slices, left as the collator pads them) through Qwen2-VL with the
    published vision geometry: the window [3, 3, 3] reaches the neighbouring slice; hardened == gated."""
    from published import build_tiny_model, spatio_temporal_logits

    processor = QwenVideoStandIn(qwen_folder)
    collator = ChatCollator(processor, resolve_template(processor, "processor", "qwen2_vl"), image_folder=media)
    rows = [{"id": f"r{i}", "images": [], "videos": [{"file": "", "frames": [f"f{j}.png" for j in range(n)]}],
             "conversations": [human("<video>\nwhat happens?"), gpt("it moves")]} for i, n in enumerate((4, 2))]
    collated = collator(rows)
    batch = {k: v for k, v in collated.items() if k != "labels"}
    model = build_tiny_model("qwen2-vl", qwen_folder, num_layers=2)
    expected, got = spatio_temporal_logits(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    trained = copy.deepcopy(model).train()  # learnable gates train on it: a loss and gate gradients
    gates = attach_gates(trained, GateConfig(window=3, temporal_window=3))
    loss = trained(**collated).loss
    loss.backward()
    assert torch.isfinite(loss) and gates.head.log_alpha.grad.abs().sum() > 0


def test_generation_prompts_refuse_a_video_sample(qwen_folder, media):
    """`visprune eval`'s generation metrics build image prompts: a video sample is refused, never run without
    its video."""
    from visprune.trainer.eval.prompts import PromptEncoder

    processor = QwenVideoStandIn(qwen_folder)
    encoder = PromptEncoder(processor, media, resolve_template(processor, "processor", "qwen2_vl"))
    row = {"id": "vid", "images": [], "videos": [{"file": "clip.mp4", "frames": []}],
           "conversations": [human("<video>\nwhat?")]}
    with pytest.raises(DataError, match="sample 'vid' has a video: generation metrics .* take images only"):
        encoder.batch([row])


def test_a_video_file_without_a_decoder_is_one_line_naming_the_sample(qwen_folder, media):
    """transformers decodes video files with torchcodec; without it the processor raises ImportError (the message
    below is transformers 5.23's, seen with the real Qwen2VLProcessor): the sample is named, in one line."""
    class NoDecoder(QwenVideoStandIn):
        def fetch_videos(self, path):
            raise ImportError("`torchcodec` is not installed or can't be loaded, so it cannot decode the video by "
                              "default. Video decoding with `torchvision` is not available: ...\nmore")

    processor = NoDecoder(qwen_folder)
    collator = ChatCollator(processor, resolve_template(processor, "processor", "qwen2_vl"), image_folder=media)
    row = {"id": "clip", "images": [], "videos": [{"file": "clip.mp4", "frames": []}],
           "conversations": [human("<video>\nwhat?"), gpt("x")]}
    with pytest.raises(DataError, match=r"^sample 'clip': the processor cannot decode its video file here "
                                        r"\(`torchcodec` is not installed[^\n]*\)$"):
        collator.encode(row)
    _, rejected = Judge(media, processor, collator.template)(0, record("clip.mp4", sample_id="clip"))
    assert rejected["reason"] == "encoding" and "cannot decode its video file here" in rejected["detail"]

    class Corrupt(QwenVideoStandIn):  # what torchcodec raises for an MP4 header with no stream behind it
        def fetch_videos(self, path):
            raise RuntimeError(f"SingleStreamDecoder, SingleStreamDecoder.cpp:41, Could not open input file: {path}")

    processor = Corrupt(qwen_folder)
    collator = ChatCollator(processor, collator.template, image_folder=media)
    with pytest.raises(DataError, match=r"^sample 'clip': cannot decode video 'clip.mp4' with the processor's video "
                                        r"loader: SingleStreamDecoder"):
        collator.encode(row)


def test_the_check_decodes_each_frame_once(qwen_folder, media, monkeypatch):
    """`data check` hands the frames it decoded to the encoding instead of decoding them again."""
    from visprune.data_prep.images import ImageLoader

    opened = []
    original = ImageLoader.open
    monkeypatch.setattr(ImageLoader, "open", lambda self, image: opened.append(image) or original(self, image))
    processor = QwenVideoStandIn(qwen_folder)
    kept, rejected = Judge(media, processor, resolve_template(processor, "processor", "qwen2_vl"))(
        0, record([["f0.png", "f1.png", "f2.png"]]))
    assert rejected is None and kept[1]["input_ids"].numel() > 0
    assert sorted(opened) == ["f0.png", "f1.png", "f2.png"]
