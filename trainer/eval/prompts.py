"""Generation prompts: `PromptEncoder` renders prompt rows (or a bare user turn) with the model's chat template and
its generation prompt and tokenizes them with their images; `to_model` moves a batch to the model. What is done
with the batch (generation, log-likelihood, timing) is left to the callers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.records import IMAGE_PLACEHOLDER, DataError
from visprune.data_prep.templates import ChatTemplate, end_of_turn_ids, render, to_messages


class PromptEncoder:
    """Generation prompts of prompt rows, tokenized with their images in padded batches.

    Images are opened by `ChatCollator.load_image` (paths must stay inside `image_folder`); the turns
    are rendered with `template` (the model's, see `resolve_for_model`) and its generation prompt.
    """

    def __init__(self, processor: Any, image_folder: str | Path | None, template: ChatTemplate):
        self.processor = processor
        self.template = template
        self.collator = ChatCollator(processor, template, image_folder=image_folder)
        tokenizer = processor.tokenizer
        self.bos_token = tokenizer.bos_token
        self.pad_token_id = tokenizer.pad_token_id
        self.stop_ids = end_of_turn_ids(processor, template)

    def messages(self, row: dict) -> list[dict]:
        return to_messages(row["conversations"], self.template)

    def prompt(self, row: dict) -> str:
        """The template's text of a row's turns plus the generation prompt (the answer's prefix)."""
        return self.prompts([row])[0]

    def prompts(self, rows: list[dict]) -> list[str]:
        from jinja2 import TemplateError

        try:
            return render(self.processor, [self.messages(row) for row in rows], self.template.source,
                          add_generation_prompt=True)
        except (TemplateError, TypeError) as exc:
            if len(rows) > 1:
                return [self.prompt(row) for row in rows]
            raise DataError(f"sample {rows[0]['id']!r}: the chat template rejected it: {exc}") from exc

    def user_prompt(self, text: str, num_images: int, name: str = "prompt") -> str:
        """The prompt of one user turn `text` with `num_images` images: each `<image>` in it stands for one
        image; when it has none, one per image goes in front of it (as lmms-eval's LLaVA models do). `name`
        names the sample in errors.

        Raises:
            DataError: `text` has `<image>` placeholders, but not `num_images` of them.
        """
        count = text.count(IMAGE_PLACEHOLDER)
        if count and count != num_images:
            raise DataError(f"{name}: the prompt has {count} {IMAGE_PLACEHOLDER} but there are {num_images} images")
        if not count and num_images:
            text = " ".join([IMAGE_PLACEHOLDER] * num_images) + "\n" + text
        return self.prompt({"id": name, "images": [], "conversations": [{"from": "human", "value": text}]})

    def images(self, row: dict) -> list:
        """The row's images opened. A row with videos is refused: generation prompts are built for images only."""
        if row.get("videos"):
            raise DataError(f"sample {row['id']!r} has a video: generation metrics (vqa, pope, mc) take images only; "
                            "score videos with --metric teacher_forced")
        return [self.collator.load_image(row["id"], image) for image in row["images"]]

    def add_special_tokens(self, text: str) -> bool:
        """Whether the tokenizer should add its special tokens to `text`: not when the rendered template
        already starts with the BOS token (it would be doubled)."""
        return not (self.bos_token and text.startswith(self.bos_token))

    def encode(self, texts: list[str], images: list, padding_side: str = "left") -> dict[str, torch.Tensor]:
        """`texts` (rendered prompts, their image placeholders in place) and all their images in order."""
        kwargs = {"images": images} if images else {}
        try:
            out = self.processor(text=texts, padding=True, padding_side=padding_side, return_tensors="pt",
                                 add_special_tokens=self.add_special_tokens(texts[0]), **kwargs)
        except ValueError as exc:
            raise DataError(f"the processor rejected a batch: {exc}") from exc
        return dict(out)

    def batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [image for row in rows for image in self.images(row)]
        return self.encode(self.prompts(rows), images)


def batches(items: list, size: int) -> list[list]:
    """`items` in consecutive chunks of `size` (the last one shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [items[start:start + size] for start in range(0, len(items), size)]


def to_model(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tensors to the model's device; floating tensors (pixel values) to its dtype."""
    param = next(model.parameters())
    return {key: value.to(param.device, param.dtype) if value.is_floating_point() else value.to(param.device)
            for key, value in batch.items()}


__all__ = ["PromptEncoder", "batches", "to_model"]
