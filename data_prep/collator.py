"""Collation: `ChatCollator` encodes dataset rows for training (their images opened by `images.ImageLoader`,
their conversations rendered by `rendering.ChatRenderer`, both through the processor) into token ids whose
labels supervise only the assistant answers and their end-of-turn tokens, and right-pads them into batches."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from .images import MAX_IMAGE_PIXELS, ImageLoader, ImageProblem
from .records import IGNORE_INDEX, IMAGE_PLACEHOLDER, DataError, quote, row_videos, shorten, validate_row
from .rendering import ChatRenderer, Spans
from .templates import ChatTemplate

logger = logging.getLogger(__name__)

# a raw row with more turns + images or characters than these has its length bounded from one render of its
# whole conversation before its images are decoded and its answer prefixes rendered (`length_floors`)
_FLOOR_ITEMS = 32
_FLOOR_CHARS = 1 << 16


class OverLengthError(DataError):
    """A raw sample found over-long from a lower bound on its tokens (`ChatCollator.length_floors`) before it
    was encoded; `length` is that bound."""

    def __init__(self, sample_id: str, length: int, max_length: int):
        super().__init__(f"sample {quote(sample_id)}: at least {length} tokens (its text alone) > data.max_length "
                         f"{max_length}; raise max_length (--max-length) or set data.drop_overlong")
        self.length = length


def check_positive(name: str, value: int) -> int:
    """`value` when it is an int >= 1.

    Raises:
        ValueError: naming the parameter `name`.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value

TEXT_KEYS = {"input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets", "token_type_ids"}
TOKEN_KEYS = ("mm_token_type_ids",)  # per-token tensors beside input_ids (Qwen2-VL's M-RoPE needs it): padded with 0
# a video as the processor takes it: (T, C, H, W) uint8 frames, with the processor loader's metadata for a file (the
# processor refuses a call that mixes paths and frame lists, so files are decoded up front by its own loader)
Video = tuple[torch.Tensor, Any]


class ChatCollator:
    """Turn dataset rows into a right-padded training batch.

    Output: `input_ids`, `attention_mask`, `labels` (B, T) long, per-token tensors the processor
    returns beside them (`mm_token_type_ids`, padded with 0), and `pixel_values` with every image of
    the batch in sample order when there is at least one (plus any other per-image tensor the
    processor returns; LLaVA-NeXT's per-image tile stacks of different sizes are zero-padded). Labels are
    IGNORE_INDEX except on each assistant answer and its end-of-turn token. Conversations are rendered
    with `template` (see `templates.resolve_template`). Nothing is truncated: an over-long sample (more
    than `max_length` tokens, image tokens included) is an error or, with `drop_overlong`, dropped and
    counted in `num_dropped` (per process: DataLoader workers count in their own copy). Images are
    opened inside `image_folder`, never outside it, and refused over `max_image_pixels` (`ImageLoader`).
    Videos (Qwen2-VL / Qwen2.5-VL processors) are given to the processor as frame tensors: frame files opened as
    images are (all of one size), or a video file inside `image_folder` decoded by the processor's own video loader
    (`video_processor.fetch_videos`, with its metadata); the batch then has `pixel_values_videos` and
    `video_grid_thw`.
    """

    def __init__(self, processor: Any, template: ChatTemplate, image_folder: str | os.PathLike | None = None,
                 max_length: int = 2048, drop_overlong: bool = False, max_image_pixels: int = MAX_IMAGE_PIXELS):
        check_positive("max_length", max_length)
        check_positive("max_image_pixels", max_image_pixels)
        if image_folder is not None and os.path.exists(image_folder) and not os.path.isdir(image_folder):
            raise DataError(f"image folder {image_folder} is not a folder")
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("ChatCollator: the processor's tokenizer has no pad token")
        self.processor = processor
        self.template = template
        self.renderer = ChatRenderer(processor, template)
        self.image_loader = ImageLoader(image_folder, max_image_pixels)
        self.max_length = max_length
        self.drop_overlong = drop_overlong
        self.pad_token_id = tokenizer.pad_token_id
        self.bos_token = tokenizer.bos_token
        self.image_token_id = getattr(processor, "image_token_id", None)
        self.video_token_id = getattr(processor, "video_token_id", None)
        self.takes_videos = (getattr(processor, "video_token", None) is not None
                             and getattr(processor, "video_processor", None) is not None)
        self.num_dropped = 0
        self._max_token_chars: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        samples, dropped = [], []
        for row in rows:
            try:
                sample = self.encode(row)
                length, at_least = sample["input_ids"].numel(), ""
            except OverLengthError as exc:  # bounded before encoding: it has at least exc.length tokens
                sample, length, at_least = None, exc.length, "at least "
            if length <= self.max_length:
                samples.append(sample)
            elif not self.drop_overlong:
                counted = "its text alone" if at_least else "image tokens included"
                raise DataError(f"sample {quote(row['id'])}: {at_least}{length} tokens ({counted}) > data.max_length "
                                f"{self.max_length}; raise max_length (--max-length) or set data.drop_overlong")
            else:
                self.num_dropped += 1
                dropped.append(row["id"])
                logger.warning("dropping over-long sample %s: %s%d tokens > data.max_length %d (%d dropped so far)",
                               quote(row["id"]), at_least, length, self.max_length, self.num_dropped)
        if not samples:
            raise DataError(f"every sample of the batch is over-long (> data.max_length {self.max_length}) "
                            f"and was dropped: {shorten(', '.join(map(quote, dropped)))}")
        return self.pad(samples)

    def encode(self, row: dict, images: list[Image.Image] | None = None) -> dict[str, torch.Tensor]:
        """One row -> `input_ids`, `labels` (T,) long, and the processor's image (video) tensors if it has images
        (videos).

        A prepared row (`visprune data prepare`: it has `input_ids` and `labels`) is not rendered or
        tokenized again; see `encode_prepared`. `images`: the row's images already opened (as RGB, by a
        caller that checked them the way `load_image` does); default: `load_image` opens them.
        """
        if row.get("input_ids") is not None:
            return self.encode_prepared(row, images)
        sample_id = row["id"]
        reasons = validate_row(row)
        if reasons:
            raise DataError(f"sample {quote(sample_id)}: {shorten('; '.join(reasons))}")
        floor = self.length_floors([row])[0]
        if floor is not None and floor > self.max_length:
            raise OverLengthError(sample_id, floor, self.max_length)
        if images is None:
            images = [self.load_image(sample_id, image) for image in row["images"]]
        videos = self.load_videos(row)
        text, spans = self.render(sample_id, self.messages(row))
        out = self._process([sample_id], [text], images, videos)
        sample = self._token_sample(out, 0, spans)
        if images or videos:
            sample.update(self._image_tensors(out))
        return sample

    def encode_tokens(self, rows: list[dict], images: list[list[Image.Image] | None] | None = None,
                      videos: list[list[Video | None] | None] | None = None) -> list[dict[str, torch.Tensor] | DataError]:
        """The token side of `encode` (`input_ids`, `labels` and per-token tensors, no image tensors) for
        many raw rows with one chat-template render and one processor call for all of them, which is
        several times cheaper per row than `encode` (`visprune data prepare` uses it; equal to `encode`
        row by row, tested). A row that cannot be encoded gets its DataError in its place; when the
        processor rejects the batch, every row is encoded alone so the error lands on its own row.
        `images` / `videos`: per row, its images (videos) already loaded by a caller that checked them, or None
        (a video None: loaded here)."""
        results: list[Any] = [None] * len(rows)
        valid = []
        for pos, row in enumerate(rows):
            reasons = validate_row(row)
            if reasons:
                results[pos] = DataError(f"sample {quote(row['id'])}: {shorten('; '.join(reasons))}")
            else:
                valid.append(pos)
        todo = []  # (position, row, images)
        for pos, floor in zip(valid, self.length_floors([rows[pos] for pos in valid])):
            row = rows[pos]
            if floor is not None and floor > self.max_length:
                results[pos] = OverLengthError(row["id"], floor, self.max_length)
                continue
            try:
                opened = images[pos] if images is not None and images[pos] is not None else \
                    [self.load_image(row["id"], image) for image in row["images"]]
                loaded = videos[pos] if videos is not None and videos[pos] is not None else None
                todo.append((pos, row, opened, self.load_videos(row, loaded)))
            except DataError as exc:
                results[pos] = exc
        rendered = self.render_many([item[1]["id"] for item in todo], [self.messages(item[1]) for item in todo])
        ready = []
        for (pos, row, opened, row_videos_loaded), result in zip(todo, rendered):
            if isinstance(result, DataError):
                results[pos] = result
            else:
                ready.append((pos, row, opened, row_videos_loaded, *result))
        # texts that start with the template's own BOS are tokenized without adding one: one call per kind
        for add_bos in (False, True):
            group = [item for item in ready if self._add_special_tokens(item[4]) == add_bos]
            if not group:
                continue
            flat = [image for item in group for image in item[2]]
            flat_videos = [video for item in group for video in item[3]]
            try:
                out = self._process([item[1]["id"] for item in group], [item[4] for item in group], flat, flat_videos)
            except DataError as exc:
                if len(group) == 1:
                    results[group[0][0]] = exc
                    continue
                for pos, row, opened, row_loaded, _, _ in group:  # find the row the processor rejects
                    results[pos] = self.encode_tokens([row], [opened], [row_loaded])[0]
                continue
            for index, (pos, _, _, _, _, spans) in enumerate(group):
                results[pos] = self._token_sample(out, index, spans)
        return results

    def length_floors(self, rows: list[dict]) -> list[int | None]:
        """A lower bound on the tokens of each raw row big enough to need one (more than `_FLOOR_ITEMS` turns
        and images, or `_FLOOR_CHARS` characters), None for the others and where the template rejects the
        conversation.

        The bound is the whole conversation rendered once and tokenized without the processor's image
        expansion (which only adds tokens), so a sample of 100,000 turns or a 10 MB answer is found over-long
        in time linear in its size, before its images are decoded and before the answer prefixes are
        rendered (`render_many`, quadratic in the turns). A text longer than the longest vocabulary entry
        times `max_length` characters is over-long without being tokenized."""
        floors: list[int | None] = [None] * len(rows)
        todo = [pos for pos, row in enumerate(rows) if self._needs_floor(row)]
        if not todo:
            return floors
        texts = self.renderer.render_texts([self.messages(rows[pos]) for pos in todo])
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self.processor.tokenizer.get_vocab()), default=1) or 1
        for pos, text in zip(todo, texts):
            if text is None:
                continue
            if len(text) > self._max_token_chars * (self.max_length + 1):
                floors[pos] = -(-len(text) // self._max_token_chars)
            else:
                floors[pos] = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        return floors

    def _needs_floor(self, row: dict) -> bool:
        if row.get("input_ids") is not None:
            return False
        turns = row["conversations"]
        if len(turns) + len(row["images"]) + len(row_videos(row)) > _FLOOR_ITEMS:
            return True
        return sum(len(turn["value"]) for turn in turns) > _FLOOR_CHARS

    def _add_special_tokens(self, text: str) -> bool:
        return not (self.bos_token and text.startswith(self.bos_token))

    def _process(self, sample_ids: list[str], texts: list[str], images: list[Image.Image],
                 videos: list[Video] | None = None) -> Any:
        """The processor on `texts` (one add_special_tokens choice for all) and their images (videos) in order;
        image tensors as "pt" (what the model gets), the text as lists (converting offsets is slow)."""
        kwargs = {"images": images, "images_kwargs": {"return_tensors": "pt"}} if images else {}
        if videos:
            kwargs.update(_video_kwargs(videos), videos_kwargs={"return_tensors": "pt"})
        try:
            out = self.processor(text=texts, return_offsets_mapping=True, return_text_replacement_offsets=True,
                                 add_special_tokens=self._add_special_tokens(texts[0]), **kwargs)
        except (ValueError, OSError, RuntimeError) as exc:
            name = quote(sample_ids[0]) if len(sample_ids) == 1 else f"{quote(sample_ids[0])} (of {len(sample_ids)})"
            raise DataError(f"sample {name}: the processor rejected it: {shorten(str(exc))}") from exc
        if "offset_mapping" not in out:
            raise ValueError("ChatCollator needs a fast (tokenizers) tokenizer that returns offset mappings")
        if (images or videos) and "text_replacement_offsets" not in out:  # without them the spans would silently shift
            raise ValueError("ChatCollator needs a processor that returns text_replacement_offsets")
        return out

    def _token_sample(self, out: Any, index: int, spans: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Text `index` of a processor output -> `input_ids`, `labels` and per-token tensors."""
        replacements = (out.get("text_replacement_offsets") or [[]] * (index + 1))[index]
        spans = [(shift_char(start, replacements), shift_char(end, replacements)) for start, end in spans]
        input_ids = torch.tensor(out["input_ids"][index], dtype=torch.long)
        offsets = torch.tensor(out["offset_mapping"][index], dtype=torch.long).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        # a token is supervised when it overlaps an assistant span; zero-width (added) tokens never do
        supervised = torch.zeros_like(input_ids, dtype=torch.bool)
        for span_start, span_end in spans:
            supervised |= (starts < span_end) & (ends > span_start)
        supervised &= ends > starts
        for token_id in (self.image_token_id, self.video_token_id):
            if token_id is not None:
                supervised &= input_ids != token_id
        sample = {"input_ids": input_ids, "labels": torch.where(supervised, input_ids, IGNORE_INDEX)}
        sample.update({key: torch.tensor(out[key][index], dtype=torch.long) for key in TOKEN_KEYS if key in out})
        return sample

    def _image_tensors(self, out: Any) -> dict[str, torch.Tensor]:
        """The processor output's image entries, converted as the processor converts for return_tensors="pt"."""
        from transformers import BatchFeature

        images = {key: value for key, value in out.items() if key not in TEXT_KEYS and key not in TOKEN_KEYS}
        return dict(BatchFeature(images, tensor_type="pt",
                                 skip_tensor_conversion=getattr(self.processor, "skip_tensor_conversion", None)))

    def encode_prepared(self, row: dict, images: list[Image.Image] | None = None) -> dict[str, torch.Tensor]:
        """A prepared row -> the stored `input_ids`, `labels` (and per-token columns) as long tensors, plus
        the image tensors of its images.

        The image tensors come from the processor called on the images with a minimal prompt (one image
        token per image): the same `_process_images` call with the same image kwargs `encode` makes, so
        the same tensors for any processor whose image tensors do not depend on the text (LLaVA,
        LLaVA-NeXT, Qwen2-VL, InternVL in transformers 5.x; tested equal to `encode` for LLaVA and
        LLaVA-NeXT). The prompt's image tokens must number those stored for the row: otherwise the images
        or the processor changed since the folder was prepared, and that is an error, never re-encoded.
        """
        sample_id = row["id"]
        input_ids = torch.tensor(row["input_ids"], dtype=torch.long)
        labels = torch.tensor(row["labels"], dtype=torch.long)
        if labels.shape != input_ids.shape:
            raise DataError(f"sample {quote(sample_id)}: prepared labels and input_ids differ in length")
        sample = {"input_ids": input_ids, "labels": labels}
        sample.update({key: torch.tensor(row[key], dtype=torch.long) for key in TOKEN_KEYS if row.get(key) is not None})
        if images is None:
            images = [self.load_image(sample_id, image) for image in row["images"]]
        videos = self.load_videos(row)
        if not images and not videos:
            return sample
        image_token = getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)
        text = image_token * len(images) + (self.processor.video_token * len(videos) if videos else "")
        kwargs = {"images": images} if images else {}
        if videos:
            kwargs.update(_video_kwargs(videos))
        try:
            out = self.processor(text=[text], return_tensors="pt", **kwargs)
        except (ValueError, OSError, RuntimeError) as exc:
            raise DataError(f"sample {quote(sample_id)}: the processor rejected it: {shorten(str(exc))}") from exc
        for token_id, what in ((self.image_token_id, "image"), (self.video_token_id, "video")):
            if token_id is None:
                continue
            expected = int((out["input_ids"] == token_id).sum())
            stored = int((input_ids == token_id).sum())
            if expected != stored:
                raise DataError(f"sample {quote(sample_id)}: its {what}s now take {expected} {what} tokens but the "
                                f"prepared dataset has {stored}; the {what}s or the processor changed since "
                                "`visprune data prepare`: prepare the data again")
        sample.update(self._image_tensors(out))
        return sample

    def messages(self, row: dict) -> list[dict]:
        """A row's turns as the template's messages (`ChatRenderer.messages`)."""
        return self.renderer.messages(row)

    def render(self, sample_id: str, messages: list[dict]) -> tuple[str, Spans]:
        """The text and answer spans of one conversation (`ChatRenderer.render`)."""
        return self.renderer.render(sample_id, messages)

    def render_many(self, sample_ids: list[str], conversations: list[list[dict]]) -> list[tuple[str, Spans] | DataError]:
        """`render` for many conversations in two template calls (`ChatRenderer.render_many`)."""
        return self.renderer.render_many(sample_ids, conversations)

    def load_image(self, sample_id: str, image: str) -> Image.Image:
        """Open `image` (relative to the image folder, which it may not leave) as RGB, its size checked
        against `max_image_pixels` before any pixel is decoded (`ImageLoader.load`)."""
        return self.image_loader.load(sample_id, image)

    def load_videos(self, row: dict, loaded: list[Video | None] | None = None) -> list[Video]:
        """A row's videos as the processor takes them (see the class docstring); [] without videos. `loaded`: per
        video, the video a caller already loaded, or None.

        Raises:
            DataError: naming the sample: the processor takes no videos, a frame or the file is refused (as
                images are, or `ImageLoader.video_file`), or a video's frames differ in size.
        """
        videos = row_videos(row)
        if not videos:
            return []
        sample_id = row["id"]
        if not self.takes_videos:
            raise DataError(f"sample {quote(sample_id)} has {len(videos)} video(s) but the processor "
                            f"({type(self.processor).__name__}) takes no videos (Qwen2-VL / Qwen2.5-VL processors do)")
        loaded = loaded or [None] * len(videos)
        return [self.load_video(sample_id, video) if done is None else done for video, done in zip(videos, loaded)]

    def load_video(self, sample_id: str, video: dict) -> Video:
        """One video as (T, C, H, W) uint8 frames and its metadata: its frame files opened (`load_image`, the same
        rules; no metadata), or its file, checked (`ImageLoader.video_file`) and decoded by the processor's own
        video loader."""
        if not video["frames"]:  # a video file
            if self.image_loader.folder is None:
                raise DataError(f"sample {quote(sample_id)} has video {quote(video['file'])} but data.image_folder "
                                "is not set")
            try:
                path = self.image_loader.video_file(video["file"])
            except ImageProblem as exc:
                raise DataError(f"sample {quote(sample_id)}: {exc.message}") from None
            try:
                frames, metadata = self.processor.video_processor.fetch_videos(str(path))
            except ImportError as exc:  # transformers decodes files with torchcodec
                raise DataError(f"sample {quote(sample_id)}: the processor cannot decode its video file here "
                                f"({shorten(str(exc).splitlines()[0], 200)})") from exc
            except (RuntimeError, OSError, ValueError, TypeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise DataError(f"sample {quote(sample_id)}: cannot decode video {quote(video['file'])} with the "
                                f"processor's video loader: {shorten(first, 300)}") from exc
            return torch.as_tensor(frames), metadata
        return frames_video(sample_id, video, [self.load_image(sample_id, frame) for frame in video["frames"]])

    def pad(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad the text tensors to the longest sample; concatenate the image tensors in sample order."""
        length = max(sample["input_ids"].numel() for sample in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for b, sample in enumerate(samples):
            num_tokens = sample["input_ids"].numel()
            input_ids[b, :num_tokens] = sample["input_ids"]
            attention_mask[b, :num_tokens] = 1
            labels[b, :num_tokens] = sample["labels"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in TOKEN_KEYS:
            if any(key in sample for sample in samples):
                batch[key] = torch.zeros((len(samples), length), dtype=torch.long)
                for b, sample in enumerate(samples):
                    if key in sample:
                        batch[key][b, :sample[key].numel()] = sample[key]
        image_keys = dict.fromkeys(key for sample in samples for key in sample if key not in batch)
        for key in image_keys:
            batch[key] = cat_images([sample[key] for sample in samples if key in sample])
        return batch


def frames_video(sample_id: str, video: dict, frames: list[Image.Image]) -> Video:
    """A frame-list video's opened frames (RGB, as `load_image` gives them) as the processor takes them: one
    (T, C, H, W) uint8 tensor, no metadata.

    Raises:
        DataError: naming the sample, when the frames differ in size.
    """
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise DataError(f"sample {quote(sample_id)}: the frames of video {quote(video['frames'][0])}... differ in "
                        f"size ({', '.join(f'{w}x{h}' for w, h in sizes[:4])}); a video's frames share one size")
    return torch.stack([torch.from_numpy(np.array(frame)).permute(2, 0, 1) for frame in frames]), None


def _video_kwargs(videos: list[Video]) -> dict[str, Any]:
    """The processor's video arguments: the frame tensors, and the loader's metadata when every video has it (the
    processor refuses a metadata list with gaps; it only samples frames by it when `do_sample_frames` is set)."""
    kwargs: dict[str, Any] = {"videos": [frames for frames, _ in videos]}
    if all(metadata is not None for _, metadata in videos):
        kwargs["video_metadata"] = [metadata for _, metadata in videos]
    return kwargs


def cat_images(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample image tensors along dim 0; LLaVA-NeXT's (images, tiles, 3, H, W) stacks
    with different tile counts are zero-padded along dim 1 first (the model reads only each image's
    own tiles, from `image_sizes`)."""
    if parts[0].dim() == 5 and len({part.shape[1] for part in parts}) > 1:
        tiles = max(part.shape[1] for part in parts)
        parts = [torch.nn.functional.pad(part, (0, 0, 0, 0, 0, 0, 0, tiles - part.shape[1])) for part in parts]
    return torch.cat(parts)


def shift_char(char: int, replacements: list[dict]) -> int:
    """Map a character position of the rendered text into the text after the processor expanded its
    image placeholders (`text_replacement_offsets`: each entry's `new_span` end minus `span` end is the
    growth so far)."""
    shift = 0
    for replacement in replacements:
        if replacement["span"][1] <= char:
            shift = replacement["new_span"][1] - replacement["span"][1]
    return char + shift
