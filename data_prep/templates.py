"""Chat templates for training: which text a LLaVA-format conversation becomes, and which part of it is
supervised. `resolve_template` picks one of visprune's training templates (`llava_v1`, `chatml`) or the
processor's own (`processor`), checks it renders what training needs, and returns a `ChatTemplate`
that the collator, the pre-flight scan, evaluation and the exported model all render with.

Choices (`data.template`, `--template`):
- `llava_v1`: LLaVA-1.5's training conversation (vicuna_v1: system prompt, `USER: <image>\\n... ASSISTANT:
  answer</s>`), for `llava` and Vicuna-based `llava_next` checkpoints;
- `chatml`: `<|im_start|>role\\n...<|im_end|>\\n` with the family's image text and default system prompt
  (Qwen2-VL / Qwen2.5-VL, InternVL);
- `processor`: the processor's chat template as published;
- `auto`: the processor's template when it renders the image, the answer and, after every answer, an
  end-of-turn token the model generates; otherwise the family's training template.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .records import IMAGE_PLACEHOLDER, ROLES, VIDEO_PLACEHOLDER, DataError, read_json, shorten

logger = logging.getLogger(__name__)

TEMPLATE_CHOICES = ("auto", "llava_v1", "chatml", "processor")
TEMPLATE_FILE = "visprune_template.json"  # the resolved template, in a run folder and every checkpoint
TEMPLATE_FORMAT = "visprune-template/1"

# LLaVA's conv_vicuna_v1 (llava/conversation.py): system, then "USER: q ASSISTANT: a</s>" turns
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class ChatmlStyle:
    """How a family's chatml conversations look: the text of one image block and the system turn its
    published template adds when a conversation has none (None: no system turn)."""

    image_text: Callable[[Any], str]  # processor -> text of one image
    system: str | None


# What each family was trained with (its training template) and, for chatml, how its images look.
TRAINING_TEMPLATES = {"llava": "llava_v1", "llava_next": "llava_v1", "qwen2_vl": "chatml", "qwen2_5_vl": "chatml",
                      "internvl": "chatml"}
_QWEN = ChatmlStyle(lambda processor: f"<|vision_start|>{processor.image_token}<|vision_end|>",
                    "You are a helpful assistant.")
CHATML_STYLES = {
    "qwen2_vl": _QWEN,  # Qwen/Qwen2-VL-7B-Instruct's chat_template.json
    "qwen2_5_vl": _QWEN,
    "internvl": ChatmlStyle(lambda processor: f"{processor.image_token}\n", None),  # OpenGVLab/InternVL3-*-hf
}


class TemplateError(DataError):
    """A chat template that cannot train: the message says what it fails to render and which
    `data.template` to use instead."""


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved chat template.

    Attributes:
        name: `llava_v1`, `chatml` or `processor`.
        source: the Jinja text rendered (through the processor's `apply_chat_template`).
        blocks: LLaVA turns are given as content blocks (`{"type": "image"}`, `{"type": "text"}`);
            otherwise as strings in which each `<image>` became `image_text`.
        image_text: what an `<image>` becomes in string content (the family's image text).
        end_of_turn: the token texts that close an answer; supervised with it.
        requested: what the user asked for (`auto`, or a name).
        reason: why `auto` chose this template.
        video_text: what a `<video>` becomes in string content ("" for a family without videos).
    """

    name: str
    source: str
    blocks: bool
    image_text: str
    end_of_turn: tuple[str, ...]
    requested: str = "auto"
    reason: str = ""
    video_text: str = ""

    @property
    def sha256(self) -> str:
        """Hash of everything that decides the rendered text and the supervised span."""
        parts = [self.source, self.blocks, self.image_text, list(self.end_of_turn)]
        if self.video_text:  # (templates without videos hash as they did before videos)
            parts.append(self.video_text)
        return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"format": TEMPLATE_FORMAT, **asdict(self), "end_of_turn": list(self.end_of_turn),
                "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatTemplate:
        if not isinstance(data, dict) or data.get("format") != TEMPLATE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise DataError(f"not a visprune chat template (format {shorten(repr(found), 100)})")
        try:
            return cls(name=str(data["name"]), source=str(data["source"]), blocks=bool(data["blocks"]),
                       image_text=str(data["image_text"]), end_of_turn=tuple(str(t) for t in data["end_of_turn"]),
                       requested=str(data.get("requested", "auto")), reason=str(data.get("reason", "")),
                       video_text=str(data.get("video_text", "")))
        except KeyError as exc:
            raise DataError(f"the saved chat template lacks {exc}") from exc
        except TypeError as exc:  # end_of_turn not a list
            raise DataError(f"the saved chat template is malformed: {exc}") from exc

    def save(self, folder: str | os.PathLike) -> Path:
        """`folder/visprune_template.json` (written atomically)."""
        from .files import write_atomic

        return write_atomic(Path(folder) / TEMPLATE_FILE, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ChatTemplate | None:
        """The template saved in `folder` (None when the folder has none)."""
        path = Path(folder) / TEMPLATE_FILE
        if not os.path.lexists(path):
            return None
        data = read_json(path, "chat template")  # duplicate keys, NaN and a FIFO are refused, naming the file
        try:
            return cls.from_dict(data)
        except DataError as exc:
            raise DataError(f"cannot read {path}: {exc}") from exc


# ---- visprune's training templates ---------------------------------------------------------------

def _literal(text: str) -> str:
    """`text` as a Jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


_TEXT_OF = ("{%- macro text_of(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
            "{{- content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
            "{%- endif -%}{%- endmacro -%}")


def llava_v1_template(image_text: str = "<image>", system: str = LLAVA_V1_SYSTEM) -> str:
    """LLaVA-1.5's training conversation as a Jinja template: `SYSTEM USER: <image>\\nq ASSISTANT:
    a</s>USER: q2 ASSISTANT: a2</s>`; a generation prompt ends with `ASSISTANT:`.

    A system turn replaces the default system prompt. Content blocks are rendered as LLaVA prepares its
    data: every image first (`image_text` + newline), then the text blocks joined by spaces; string
    content is rendered as is. The answer and `eos_token` sit in a `{% generation %}` block. The BOS token
    is left to the tokenizer, as in LLaVA's training and llava-hf's template, so the text after it
    tokenizes as a sentence start.
    """
    image = _literal(image_text + "\n")
    return (
        _TEXT_OF
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = text_of(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = " + _literal(system) + " -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- system + ' ' -}}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
        "{%- if message['content'] is not string -%}"
        "{%- for block in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- " + image + " -}}"
        "{%- endfor -%}{%- endif -%}"
        "{{- text_of(message['content']) + ' ' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
        "{%- generation -%}{{- text_of(message['content']) + eos_token -}}{%- endgeneration -%}"
        "{%- else -%}{{- raise_exception('llava_v1: a ' + message['role'] + ' turn may only come first') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def chatml_template(image_text: str, system: str | None = None, video_text: str = "") -> str:
    """ChatML as a Jinja template: `<|im_start|>role\\ncontent<|im_end|>\\n` per turn, a system turn with
    `system` first when the conversation has none (None: no system turn), content blocks rendered in
    order (an image as `image_text`, a video as `video_text` when given), and `<|im_start|>assistant\\n` as the
    generation prompt. The answer and its `<|im_end|>` sit in a `{% generation %}` block."""
    video = ("{%- elif block['type'] == 'video' -%}{%- set ns.text = ns.text + " + _literal(video_text) + " -%}"
             if video_text else "")
    default_system = "" if system is None else (
        "{%- if messages and messages[0]['role'] != 'system' -%}"
        "{{- '<|im_start|>system\\n' + " + _literal(system) + " + '<|im_end|>\\n' -}}{%- endif -%}")
    return (
        default_system
        + "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- set ns = namespace(text='') -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
        "{%- else -%}{%- for block in message['content'] -%}"
        "{%- if block['type'] == 'image' -%}{%- set ns.text = ns.text + " + _literal(image_text) + " -%}"
        + video +
        "{%- elif block['type'] == 'text' -%}{%- set ns.text = ns.text + block['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- ns.text + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
        "{%- else -%}{{- ns.text + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


# ---- LLaVA turns -> chat messages ----------------------------------------------------------------------

def to_blocks(text: str) -> list[dict[str, str]]:
    """A LLaVA turn as content blocks in order: `{"type": "image"}` for each `<image>`, `{"type": "video"}` for
    each `<video>`, `{"type": "text", "text": ...}` for the text between them, whitespace next to an image or
    video dropped (LLaVA strips it too)."""
    split = _MEDIA.split(text)  # text, placeholder, text, ...
    pieces, kinds = split[0::2], split[1::2]
    blocks: list[dict[str, str]] = []
    for idx, piece in enumerate(pieces):
        if idx > 0:
            blocks.append({"type": "image" if kinds[idx - 1] == IMAGE_PLACEHOLDER else "video"})
            piece = piece.lstrip()
        if idx < len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


_MEDIA = re.compile("(" + re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER) + ")")


def to_messages(conversations: Sequence[dict], template: ChatTemplate) -> list[dict[str, Any]]:
    """LLaVA turns (`{"from", "value"}`) as the messages `template` renders: content blocks, or strings in
    which each `<image>` became the family's image text and each `<video>` its video text."""
    if template.blocks:
        return [{"role": ROLES[turn["from"]], "content": to_blocks(turn["value"])} for turn in conversations]
    video_text = template.video_text or VIDEO_PLACEHOLDER
    return [{"role": ROLES[turn["from"]],
             "content": turn["value"].replace(IMAGE_PLACEHOLDER, template.image_text).replace(VIDEO_PLACEHOLDER,
                                                                                              video_text)}
            for turn in conversations]


# ---- checking and choosing ----------------------------------------------------------------------------

_PROBE_Q = ("visprunequestionone", "visprunequestiontwo")
_PROBE_A = ("visprunereplyone", "visprunereplytwo")
PROBE = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{_PROBE_Q[0]}"}, {"from": "gpt", "value": _PROBE_A[0]},
         {"from": "human", "value": _PROBE_Q[1]}, {"from": "gpt", "value": _PROBE_A[1]}]


def render(processor: Any, conversations: list[list[dict]], source: str, add_generation_prompt: bool = False
           ) -> list[str]:
    """Render message lists with the Jinja `source` through the processor (its special tokens are the
    template's variables). Template errors propagate (jinja2.TemplateError, TypeError)."""
    return processor.apply_chat_template(conversations, chat_template=source, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def stop_tokens(processor: Any, generation_config: Any = None) -> tuple[str, ...]:
    """Token texts that end the model's generation: the tokenizer's EOS and the generation config's
    `eos_token_id`(s)."""
    tokenizer = processor.tokenizer
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    tokens = [tokenizer.eos_token] + [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return tuple(dict.fromkeys(token for token in tokens if token))


def load_generation_config(folder: str | os.PathLike | None) -> Any:
    """`folder`'s generation_config.json as a GenerationConfig, or None when it has none."""
    if folder is None or not (Path(folder) / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {Path(folder) / 'generation_config.json'}: {exc}") from exc


def check_template(processor: Any, source: str, blocks: bool, image_text: str, stops: Sequence[str]
                   ) -> tuple[list[str], tuple[str, ...]]:
    """What `source` fails to render for training (a list of problems, [] when none) and the end-of-turn
    texts found after its answers, from a two-answer probe conversation with one image."""
    from jinja2 import TemplateError as JinjaError

    probe = ChatTemplate("probe", source, blocks, image_text, ())
    messages = to_messages(PROBE, probe)
    try:
        text, through = render(processor, [messages, messages[:2]], source)
        before = render(processor, [messages[:1]], source, add_generation_prompt=True)[0]
    except (JinjaError, TypeError, ValueError, KeyError, AttributeError) as exc:
        return [f"fails on LLaVA turns given as {'content blocks' if blocks else 'strings'} ({exc})"], ()
    problems = []
    image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    found = text.count(image_token) if blocks else text.count(image_text)
    if found != 1:
        problems.append(f"renders {found} image placeholders ({image_token!r}) for one image")
    missing = [marker for marker in _PROBE_Q + _PROBE_A if marker not in text]
    if any(marker in _PROBE_A for marker in missing):
        problems.append("renders no answer (the assistant turns' text is missing)")
    elif missing:
        problems.append("renders no question (the user turns' text is missing)")
    ends = []
    for answer in _PROBE_A:
        if answer not in text:
            continue
        rest = text[text.index(answer) + len(answer):]
        end = next((token for token in stops if rest.lstrip(" ").startswith(token)), None)
        if end is None:
            shown = repr(rest[:8]) if rest else "nothing"
            problems.append(f"renders no end-of-turn token after an answer (it closes answers with {shown}, not "
                            f"one of {list(stops)} that the model generates)")
            break
        ends.append(end)
    if not problems and not (through.startswith(before) and text.startswith(through)):
        problems.append("does not render conversation prefixes as text prefixes, so the answers cannot be "
                        "located")
    return problems, tuple(dict.fromkeys(ends))


def training_template(name: str, processor: Any, family: str | None, stops: Sequence[str]) -> ChatTemplate:
    """visprune's `llava_v1` or `chatml` for `family` (its image text; chatml's system prompt)."""
    image_text = family_image_text(processor, family)
    if name == "llava_v1":
        eos = processor.tokenizer.eos_token
        if not eos:
            raise TemplateError("data.template llava_v1 closes answers with the tokenizer's EOS token, and this "
                                "tokenizer has none")
        source, end = llava_v1_template(image_text), (eos,)
    else:
        if IM_END not in processor.tokenizer.get_vocab():
            raise TemplateError(f"data.template chatml closes answers with {IM_END}, which this tokenizer does not "
                                f"have; use data.template {TRAINING_TEMPLATES.get(family or '', 'processor')}")
        style = CHATML_STYLES.get(family or "")
        block_text = style.image_text(processor) if style else image_text
        source = chatml_template(block_text, style.system if style else None, family_video_text(processor, family))
        end = (IM_END,)
    if end[0] not in stops:
        logger.info("data.template %s closes answers with %s, which the model's generation config does not stop "
                    "on (%s); the exported model stops on it as well", name, end[0], list(stops))
    return ChatTemplate(name, source, True, image_text, end, video_text=family_video_text(processor, family))


def family_video_text(processor: Any, family: str | None) -> str:
    """What a `<video>` of the data becomes in string content: the family's video text (`video_text`, Qwen2-VL),
    "" for a family or processor without videos."""
    from visprune.modeling.families import FAMILIES

    own = getattr(FAMILIES.get(family or ""), "video_text", None)
    return own(processor) if own is not None and getattr(processor, "video_token", None) else ""


def family_image_text(processor: Any, family: str | None) -> str:
    """What an `<image>` of the data becomes in string content: the family's image text (`Family.image_text`),
    or the processor's image token for a model without a visprune family."""
    if family is not None:
        from visprune.modeling.families import FAMILIES

        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
        return FAMILIES[family].image_text(processor)
    return getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER


def processor_template(processor: Any, family: str | None, stops: Sequence[str]) -> tuple[ChatTemplate | None, str]:
    """The processor's own template if it trains (content blocks preferred over strings), else (None, why)."""
    source = getattr(processor, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one
        source = source.get("default")
    if not source:
        return None, "the processor has no chat template"
    image_text = family_image_text(processor, family)
    failures = []
    for blocks in (True, False):
        problems, ends = check_template(processor, source, blocks, image_text, stops)
        if not problems:
            return ChatTemplate("processor", source, blocks, image_text, ends,
                                video_text=family_video_text(processor, family)), ""
        failures.append(problems)
    # report the mode that got furthest: blocks unless it could not render at all
    problems = failures[0] if not failures[0][0].startswith("fails on") else failures[1]
    return None, "the processor's chat template " + "; ".join(problems)


def _uses_vicuna_roles(processor: Any) -> bool:
    """Whether the processor's template renders LLaVA-1.5 / Vicuna roles (`USER:` ... `ASSISTANT:`)."""
    from jinja2 import TemplateError as JinjaError

    source = getattr(processor, "chat_template", None)
    if not isinstance(source, str):
        return False
    for blocks in (True, False):
        probe = ChatTemplate("probe", source, blocks, family_image_text(processor, None), ())
        try:
            text = render(processor, [to_messages(PROBE[:2], probe)], source)[0]
        except (JinjaError, TypeError, ValueError, KeyError, AttributeError):  # not renderable this way
            continue
        if "USER:" in text and "ASSISTANT:" in text:
            return True
    return False


def resolve_template(processor: Any, requested: str = "auto", family: str | None = None,
                     generation_config: Any = None) -> ChatTemplate:
    """The chat template a run trains (and evaluates) with; see the module docstring.

    Args:
        processor: the model's processor (its tokenizer's special tokens are the template's variables).
        requested: `auto`, `llava_v1`, `chatml` or `processor`.
        family: the visprune family (`llava`, `qwen2_vl`, ...): its image text and training template.
        generation_config: the model's GenerationConfig (its `eos_token_id`s count as end-of-turn tokens).

    Raises:
        TemplateError: the requested template cannot train on this processor (naming what it fails to
            render and the `data.template` to use), or `auto` finds none.
    """
    if requested not in TEMPLATE_CHOICES:
        raise TemplateError(f"data.template must be one of {', '.join(TEMPLATE_CHOICES)}, got {requested!r}")
    stops = stop_tokens(processor, generation_config)
    suggestion = TRAINING_TEMPLATES.get(family or "")
    if requested in ("llava_v1", "chatml"):
        chosen = training_template(requested, processor, family, stops)
        return ChatTemplate(**{**asdict(chosen), "requested": requested})
    own, why = processor_template(processor, family, stops)
    if requested == "processor":
        if own is None:
            hint = f"data.template: {suggestion} (this family's training format)" if suggestion else \
                "data.template: llava_v1 or chatml"
            raise TemplateError(f"{why}; use {hint}")
        return ChatTemplate(**{**asdict(own), "requested": requested, "reason": "requested"})
    if own is not None:
        reason = "the processor's chat template renders the image, the answer and an end-of-turn token"
        return ChatTemplate(**{**asdict(own), "requested": "auto", "reason": reason})
    if suggestion is None:
        raise TemplateError(f"{why}, and visprune has no training template for this model"
                            f"{f' (family {family!r})' if family else ''}; set data.template")
    if family == "llava_next" and not _uses_vicuna_roles(processor):
        raise TemplateError(f"{why}, and it is not Vicuna-style (USER: / ASSISTANT:), so LLaVA-1.5's llava_v1 may "
                            "not be this checkpoint's training format; set data.template explicitly")
    chosen = training_template(suggestion, processor, family, stops)
    return ChatTemplate(**{**asdict(chosen), "requested": "auto", "reason": why})


def folder_family(model_dir: str | os.PathLike | None, family: str | None = None) -> str | None:
    """`family` when given (checked), else the `model_type` of `model_dir/config.json` when it names a
    visprune family, else None."""
    from visprune.modeling.families import FAMILIES

    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
        return family
    config = None if model_dir is None else Path(model_dir) / "config.json"
    if config is None or not os.path.lexists(config):
        return None
    data = read_json(config, "model config")  # not JSON, duplicate keys or NaN: refused, naming the file
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return model_type if model_type in FAMILIES else None


def resolve_for_folder(processor: Any, model_dir: str | os.PathLike | None, requested: str = "auto",
                       family: str | None = None) -> tuple[str | None, ChatTemplate]:
    """(family, template) for a processor loaded from `model_dir`: the family from `family` or the folder's
    config.json, the generation config from its generation_config.json (see `resolve_template`)."""
    family = folder_family(model_dir, family)
    template = resolve_template(processor, requested, family, load_generation_config(model_dir))
    logger.info("chat template: %s (data.template %s%s)", template.name, requested,
                f": {template.reason}" if requested == "auto" else "")
    return family, template


def resolve_for_model(model: Any, processor: Any, model_dir: str | os.PathLike | None = None,
                      requested: str = "auto") -> ChatTemplate:
    """The template to prompt `model` with: with `auto`, the one saved beside an exported model (what it
    was trained with), else `resolve_template` for the model's family and generation config."""
    if requested == "auto" and model_dir is not None:
        saved = ChatTemplate.load(model_dir)
        if saved is not None:
            return saved
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    from visprune.modeling.families import FAMILIES

    family = model_type if model_type in FAMILIES else None
    return resolve_template(processor, requested, family, getattr(model, "generation_config", None))


def end_of_turn_ids(processor: Any, template: ChatTemplate) -> list[int]:
    """Token ids that end an answer when generating: the tokenizer's EOS and the template's end-of-turn
    tokens."""
    tokenizer = processor.tokenizer
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in template.end_of_turn:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


__all__ = [
    "CHATML_STYLES",
    "LLAVA_V1_SYSTEM",
    "TEMPLATE_CHOICES",
    "TEMPLATE_FILE",
    "TRAINING_TEMPLATES",
    "ChatTemplate",
    "ChatmlStyle",
    "TemplateError",
    "chatml_template",
    "check_template",
    "end_of_turn_ids",
    "family_image_text",
    "folder_family",
    "llava_v1_template",
    "load_generation_config",
    "render",
    "resolve_for_folder",
    "resolve_for_model",
    "resolve_template",
    "stop_tokens",
    "to_blocks",
    "to_messages",
    "training_template",
]
