"""Chat templates on the published processors (tests/fixtures/processors): which template `auto` picks and
why, the exact text of `llava_v1` and `chatml` (beside what the published templates render), and golden
token ids and label masks: the answer and its end-of-turn token supervised, never the roles or prompt."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer
from visprune.data_prep.collator import ChatCollator
from visprune.data_prep.records import IGNORE_INDEX
from visprune.data_prep.templates import (
    LLAVA_V1_SYSTEM,
    ChatTemplate,
    TemplateError,
    render,
    resolve_template,
    to_blocks,
    to_messages,
)
from visprune.trainer.cli import main

SYSTEM = LLAVA_V1_SYSTEM


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


# the conversation shapes every template is checked on
MULTI_TURN = [human("<image>\nwhat colour is the square?"), gpt("red"), human("where is the square?"), gpt("top left")]
SYSTEM_TURN = [{"from": "system", "value": "be brief"}, human("what colour is the circle?\n<image>"), gpt("blue")]
LATER_IMAGE = [human("what is the opposite of top?"), gpt("bottom"), human("<image>\nwhat shape is it?"), gpt("square")]
TEXT_ONLY = [human("what colour is grass?"), gpt("green")]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """name -> processor folder built from the published files, once per session."""
    from published import build_processor_folder

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_processor_folder(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def llava(built):
    return AutoProcessor.from_pretrained(built("llava-1.5"))


@pytest.fixture
def red(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    return tmp_path


class TokenizerProcessor:
    """A text-only stand-in for the Qwen2-VL / InternVL processors, which need torchvision (not installable
    here): the published tokenizer and chat template, called the way the collator calls a processor."""

    def __init__(self, folder, image_token):
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.chat_template = self.tokenizer.chat_template
        self.image_token = image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)

    def apply_chat_template(self, conversations, **kwargs):
        return self.tokenizer.apply_chat_template(conversations, **kwargs)

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, **kwargs):
        assert "images" not in kwargs, "text-only stand-in"
        return self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=return_offsets_mapping)


def qwen_chat_template(folder) -> str:
    return json.loads((folder / "chat_template.json").read_text())["chat_template"]


def supervised(processor, sample) -> list[str]:
    """The supervised tokens of an encoded sample, as token strings."""
    ids = sample["input_ids"][sample["labels"] != IGNORE_INDEX].tolist()
    assert torch.equal(sample["labels"][sample["labels"] != IGNORE_INDEX], sample["input_ids"][sample["labels"] != IGNORE_INDEX])
    return processor.tokenizer.convert_ids_to_tokens(ids)


# ---- auto: which template, and why ----------------------------------------------------------------------

def test_llava_hf_template_is_an_inference_template_so_auto_trains_with_llava_v1(llava):
    template = resolve_template(llava, "auto", "llava")
    assert template.name == "llava_v1" and template.end_of_turn == ("</s>",)
    assert "renders no end-of-turn token after an answer (it closes answers with ' USER: v'" in template.reason
    with pytest.raises(TemplateError, match=r"^the processor's chat template renders no end-of-turn token .*"
                                            r"use data.template: llava_v1 \(this family's training format\)$"):
        resolve_template(llava, "processor", "llava")


def test_auto_per_published_processor(built):
    next_processor = AutoProcessor.from_pretrained(built("llava-next"))
    assert resolve_template(next_processor, "auto", "llava_next").name == "llava_v1"  # Vicuna roles, no </s>
    qwen = TokenizerProcessor(built("qwen2-vl"), "<|image_pad|>")
    chosen = resolve_template(qwen, "auto", "qwen2_vl")
    assert (chosen.name, chosen.blocks, chosen.end_of_turn) == ("processor", True, ("<|im_end|>",))
    internvl = TokenizerProcessor(built("internvl3"), "<IMG_CONTEXT>")
    chosen = resolve_template(internvl, "auto", "internvl")
    assert (chosen.name, chosen.blocks, chosen.end_of_turn) == ("processor", True, ("<|im_end|>",))


def test_a_non_vicuna_llava_next_template_is_not_guessed(built):
    processor = AutoProcessor.from_pretrained(built("llava-next"))
    processor.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}"
                               "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                               " [/INST]{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}"
                               "{% endfor %}")
    with pytest.raises(TemplateError, match="not Vicuna-style .* set data.template explicitly"):
        resolve_template(processor, "auto", "llava_next")
    assert resolve_template(processor, "llava_v1", "llava_next").name == "llava_v1"  # the user may say so


def test_processor_template_failures_name_what_is_missing(llava):
    broken = {
        "renders 0 image placeholders": "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                                        "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
                                        "{% endfor %}",
        "renders no answer": "{% for m in messages %}{% if m['role'] == 'user' %}{% for c in m['content'] %}"
                             "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                             "{% endif %}{% endfor %}",
    }
    for problem, source in broken.items():
        llava.chat_template, saved = source, llava.chat_template
        try:
            with pytest.raises(TemplateError, match=problem + ".*use data.template: llava_v1"):
                resolve_template(llava, "processor", "llava")
            assert resolve_template(llava, "auto", "llava").name == "llava_v1"
        finally:
            llava.chat_template = saved
    with pytest.raises(TemplateError, match="chatml closes answers with <\\|im_end\\|>, which this tokenizer does not have"):
        resolve_template(llava, "chatml", "llava")
    with pytest.raises(TemplateError, match="must be one of auto, llava_v1, chatml, processor"):
        resolve_template(llava, "vicuna", "llava")


def test_llava_turns_become_content_blocks_like_llava_prepares_them():
    assert to_blocks("<image>\nwhat is it?") == [{"type": "image"}, {"type": "text", "text": "what is it?"}]
    assert to_blocks("what is it?\n<image>") == [{"type": "text", "text": "what is it?"}, {"type": "image"}]
    assert to_blocks("compare <image> with <image>.") == [
        {"type": "text", "text": "compare"}, {"type": "image"}, {"type": "text", "text": "with"}, {"type": "image"},
        {"type": "text", "text": "."}]
    assert to_blocks("no image  here ") == [{"type": "text", "text": "no image  here "}]


# ---- llava_v1 -----------------------------------------------------------------------------------------------

LLAVA_V1_TEXT = {
    "multi_turn": f"{SYSTEM} USER: <image>\nwhat colour is the square? ASSISTANT: red</s>USER: where is the square? "
                  "ASSISTANT: top left</s>",
    "system_turn": "be brief USER: <image>\nwhat colour is the circle? ASSISTANT: blue</s>",
    "later_image": f"{SYSTEM} USER: what is the opposite of top? ASSISTANT: bottom</s>USER: <image>\nwhat shape is "
                   "it? ASSISTANT: square</s>",
    "text_only": f"{SYSTEM} USER: what colour is grass? ASSISTANT: green</s>",
}
LLAVA_V1_ANSWERS = {"multi_turn": ["▁red", "</s>", "▁top", "▁left", "</s>"], "system_turn": ["▁blue", "</s>"],
                    "later_image": ["▁bottom", "</s>", "▁square", "</s>"], "text_only": ["▁green", "</s>"]}
SHAPES = {"multi_turn": MULTI_TURN, "system_turn": SYSTEM_TURN, "later_image": LATER_IMAGE, "text_only": TEXT_ONLY}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_llava_v1_golden_text_ids_and_labels(llava, red, shape):
    """LLaVA's conv_vicuna_v1 text (the image moved before the question, as LLaVA's preprocessing does), token
    ids equal to the published processor on that text (BOS added once, by the tokenizer), and exactly the
    answers and their </s> supervised."""
    template = resolve_template(llava, "llava_v1", "llava")
    turns = SHAPES[shape]
    assert render(llava, [to_messages(turns, template)], template.source)[0] == LLAVA_V1_TEXT[shape]
    images = ["red.png"] if any("<image>" in turn["value"] for turn in turns) else []
    sample = ChatCollator(llava, template, image_folder=red).encode({"id": shape, "images": images,
                                                                     "conversations": turns})
    expected = llava(text=LLAVA_V1_TEXT[shape], images=[Image.open(red / name) for name in images] or None)
    assert sample["input_ids"].tolist() == expected["input_ids"][0]
    assert sample["input_ids"][0] == llava.tokenizer.bos_token_id == expected["input_ids"][0][0]
    assert int((sample["input_ids"] == llava.tokenizer.bos_token_id).sum()) == 1
    assert int((sample["input_ids"] == llava.image_token_id).sum()) == 576 * len(images)  # 336 px / patch 14
    assert supervised(llava, sample) == LLAVA_V1_ANSWERS[shape]


def test_llava_v1_golden_token_ids_of_a_text_only_sample(llava):
    template = resolve_template(llava, "auto", "llava")
    sample = ChatCollator(llava, template).encode({"id": "t", "images": [], "conversations": TEXT_ONLY})
    tokens = ["<s>", "▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial",
              "▁intelligence", "▁assistant.", "▁The", "▁assistant", "▁gives", "▁helpful,", "▁detailed,", "▁and",
              "▁polite", "▁answers", "▁to", "▁the", "▁user's", "▁questions.", "▁USER:", "▁what", "▁colour", "▁is",
              "▁grass", "<0x3F>", "▁ASSISTANT:", "▁green", "</s>"]
    assert sample["input_ids"].tolist() == llava.tokenizer.convert_tokens_to_ids(tokens)
    assert (sample["labels"] != IGNORE_INDEX).tolist() == [False] * 31 + [True, True]


def test_llava_v1_generation_prompt_and_the_exported_template_round_trip(llava):
    template = resolve_template(llava, "auto", "llava")
    prompt = render(llava, [to_messages(MULTI_TURN[:3], template)], template.source, add_generation_prompt=True)[0]
    assert prompt == f"{SYSTEM} USER: <image>\nwhat colour is the square? ASSISTANT: red</s>USER: where is the square? " \
                     "ASSISTANT:"
    # what harden writes beside the model reads back equal, and llava-hf style content blocks render alike
    assert ChatTemplate.from_dict(json.loads(json.dumps(template.to_dict()))) == template
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    assert llava.apply_chat_template(hf_messages, chat_template=template.source, add_generation_prompt=True) == \
        f"{SYSTEM} USER: <image>\nwhat is it? ASSISTANT:"


# ---- chatml ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "family", "image_token"), [("qwen2-vl", "qwen2_vl", "<|image_pad|>"),
                                                               ("internvl3", "internvl", "<IMG_CONTEXT>")])
def test_chatml_renders_what_the_published_template_renders(built, name, family, image_token):
    processor = TokenizerProcessor(built(name), image_token)
    chatml = resolve_template(processor, "chatml", family)
    published = processor.chat_template
    for turns in SHAPES.values():
        blocks = [{"role": m["role"], "content": m["content"]} for m in to_messages(turns, chatml)]
        ours = render(processor, [blocks], chatml.source)[0]
        assert ours == render(processor, [blocks], published)[0]
        assert render(processor, [blocks[:1]], chatml.source, add_generation_prompt=True)[0] == \
            render(processor, [blocks[:1]], published, add_generation_prompt=True)[0]


QWEN_TEXT = {
    "multi_turn": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                  "<|image_pad|><|vision_end|>what colour is the square?<|im_end|>\n<|im_start|>assistant\nred"
                  "<|im_end|>\n<|im_start|>user\nwhere is the square?<|im_end|>\n<|im_start|>assistant\ntop left"
                  "<|im_end|>\n",
    "system_turn": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat colour is the circle?"
                   "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n",
}


def test_chatml_golden_text_for_qwen2_vl(built):
    processor = TokenizerProcessor(built("qwen2-vl"), "<|image_pad|>")
    chatml = resolve_template(processor, "chatml", "qwen2_vl")
    for shape, text in QWEN_TEXT.items():
        assert render(processor, [to_messages(SHAPES[shape], chatml)], chatml.source)[0] == text
    internvl = TokenizerProcessor(built("internvl3"), "<IMG_CONTEXT>")
    chatml = resolve_template(internvl, "chatml", "internvl")
    assert render(internvl, [to_messages(SYSTEM_TURN, chatml)], chatml.source)[0] == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat colour is the circle?<IMG_CONTEXT>\n"
        "<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n")  # InternVL3-hf: no default system turn


@pytest.mark.parametrize("template_name", ["chatml", "processor"])
def test_chatml_golden_token_ids_and_labels_on_the_qwen_tokenizer(built, template_name):
    """Text-only conversations through the published Qwen2-VL tokenizer (the processor needs torchvision): the
    answer and <|im_end|> supervised, not the newline after it, the role words or the default system turn."""
    processor = TokenizerProcessor(built("qwen2-vl"), "<|image_pad|>")
    template = resolve_template(processor, template_name, "qwen2_vl")
    turns = [human("what colour is grass?"), gpt("green"), human("and the sky?"), gpt("blue")]
    sample = ChatCollator(processor, template).encode({"id": "t", "images": [], "conversations": turns})
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nwhat colour is grass?"
            "<|im_end|>\n<|im_start|>assistant\ngreen<|im_end|>\n<|im_start|>user\nand the sky?<|im_end|>\n"
            "<|im_start|>assistant\nblue<|im_end|>\n")
    assert sample["input_ids"].tolist() == processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sample["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS in Qwen2
    assert supervised(processor, sample) == processor.tokenizer.tokenize("green<|im_end|>") + \
        processor.tokenizer.tokenize("blue<|im_end|>")
    assert sample["input_ids"][-1] == processor.tokenizer.convert_tokens_to_ids("Ċ")
    assert sample["labels"][-1] == IGNORE_INDEX and sample["labels"][-2] != IGNORE_INDEX


# ---- the CLI on the published llava-hf processor --------------------------------------------------------------

def test_data_check_passes_on_the_published_llava_processor(built, red, tmp_path, capsys):
    data = tmp_path / "two.json"
    data.write_text(json.dumps([{"id": "a", "image": "red.png", "conversations": MULTI_TURN},
                                {"id": "b", "conversations": TEXT_ONLY}]))
    base = ["data", "check", "--json", str(data), "--images", str(red), "--processor", str(built("llava-1.5")),
            "--family", "llava"]
    assert main(base) == 0
    assert "2 of 2 samples ok" in capsys.readouterr().out
    assert main(base + ["--template", "processor"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("visprune data check: error: the processor's chat template renders no end-of-turn token")
    assert err.endswith("use data.template: llava_v1 (this family's training format)")
