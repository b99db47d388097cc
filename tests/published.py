"""Loadable tiny assets built from the published processor files in tests/fixtures/processors/: a processor
folder (published files plus a small local tokenizer), a tiny model of the family and a LLaVA-format data set.

The fixture files are facts about the real checkpoints (see each folder's SOURCE.md); everything else here is
built locally, so nothing is downloaded."""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "processors"
PUBLISHED = {"llava": "llava-1.5", "llava_next": "llava-next", "qwen2_vl": "qwen2-vl", "internvl": "internvl3"}

TEMPLATE_TEXT = (
    ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
     "detailed, and polite answers to the user's questions."),
    "USER: ASSISTANT: USER ASSISTANT system user assistant",
    "You are a helpful assistant.",
    "Picture Video describe the image please answer with one word",
)
# Files copied byte-for-byte into a built folder when the fixture has them (none of them carries token ids).
VERBATIM_FILES = ("chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
                  "special_tokens_map.json")
TOKEN_FLAGS = ("lstrip", "normalized", "rstrip", "single_word", "special")

# InternVL3-8B-hf's own tokenizer_config / preprocessor_config / config were not found verbatim (SOURCE.md); these
# values are the ones transformers' convert_internvl_weights_to_hf.py states for the "-hf" conversion.
INTERNVL_EXTRA_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
INTERNVL_ADDITIONAL = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
INTERNVL_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "GotOcr2ImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225], "processor_class": "InternVLProcessor",
    "rescale_factor": 1 / 255, "size": {"height": 448, "width": 448},
}
INTERNVL_CONTEXT_LENGTH = 8192
INTERNVL_TILE, INTERNVL_PATCH, INTERNVL_DOWNSAMPLE = 448, 14, 0.5


@dataclass(frozen=True)
class Family:
    """What the builders need to know about one fixture: its tokenizer style and model family."""

    family: str        # key of PUBLISHED
    tokenizer: str     # "llama" (sentencepiece-style BPE with byte fallback) or "qwen2" (byte-level BPE)
    image_size: tuple[int, int]  # (width, height) of the sample images written by write_published_assets


FAMILIES = {
    "llava-1.5": Family("llava", "llama", (48, 40)),
    "llava-next": Family("llava_next", "llama", (60, 40)),
    "qwen2-vl": Family("qwen2_vl", "qwen2", (84, 56)),
    "internvl3": Family("internvl", "qwen2", (64, 48)),
}


def fixture_dir(name: str) -> Path:
    """The fixture folder of a published checkpoint (`name` is a value of PUBLISHED)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown fixture {name!r}; known: {sorted(FAMILIES)}")
    return FIXTURES / name


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def published_json(name: str, file_name: str) -> Any | None:
    """A published JSON file of the fixture, or None when the checkpoint's file was not found."""
    path = fixture_dir(name) / file_name
    return read_json(path) if path.is_file() else None


# ---- published special tokens --------------------------------------------------------------------------------
def token_entry(content: str, special: bool = True) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def published_tokenizer_config(name: str) -> dict[str, Any]:
    """The published tokenizer_config.json, or for checkpoints whose file was not found the closest statement of
    it (documented in SOURCE.md): LLaVA-NeXT from its special_tokens_map.json + added_tokens.json, InternVL3 from
    Qwen2-VL's published Qwen2 special tokens plus the tokens transformers' InternVL conversion adds."""
    config = published_json(name, "tokenizer_config.json")
    if config is not None:
        return config
    if name == "llava-next":
        return llava_next_tokenizer_config()
    if name == "internvl3":
        return internvl_tokenizer_config()
    raise FileNotFoundError(f"{name}: no tokenizer_config.json and no documented stand-in")


def llava_next_tokenizer_config() -> dict[str, Any]:
    """LLaVA-NeXT (vicuna-7b-v1.5 vocabulary): ids 0-2 as in LLaVA-1.5's published decoder (same base
    vocabulary), `<image>` from added_tokens.json, roles from special_tokens_map.json."""
    decoder = {str(idx): entry for idx, entry in read_json(fixture_dir("llava-1.5") / "tokenizer_config.json")
               ["added_tokens_decoder"].items() if int(idx) < 3}
    for content, idx in published_json("llava-next", "added_tokens.json").items():
        decoder[str(idx)] = token_entry(content)
    roles = {key: value["content"] if isinstance(value, dict) else value
             for key, value in published_json("llava-next", "special_tokens_map.json").items()}
    return {"added_tokens_decoder": decoder, **roles, "tokenizer_class": "LlamaTokenizer"}


def internvl_tokenizer_config() -> dict[str, Any]:
    """InternVL3-hf: the Qwen2 special tokens (ids as published for Qwen2-VL), then the conversion's additions."""
    qwen = read_json(fixture_dir("qwen2-vl") / "tokenizer_config.json")
    decoder = dict(qwen["added_tokens_decoder"])
    next_idx = max(int(idx) for idx in decoder) + 1
    for content in (*INTERNVL_ADDITIONAL, INTERNVL_EXTRA_TOKENS["video_token"]):
        decoder[str(next_idx)] = token_entry(content)
        next_idx += 1
    return {
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": [*qwen["additional_special_tokens"], *INTERNVL_ADDITIONAL],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "extra_special_tokens": dict(INTERNVL_EXTRA_TOKENS),
        "model_max_length": INTERNVL_CONTEXT_LENGTH, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def published_added_tokens(name: str) -> list[tuple[int, dict[str, Any]]]:
    """(published id, token entry) pairs of the published added tokens, by id."""
    decoder = published_tokenizer_config(name)["added_tokens_decoder"]
    return sorted(((int(idx), entry) for idx, entry in decoder.items()), key=lambda item: item[0])


# ---- local tokenizer -------------------------------------------------------------------------------------------
def training_corpus(words=()) -> list[str]:
    """The text the local BPE is trained on: template wording, the toy data's words and `words`."""
    from visprune.data_prep.toy import toy_words

    return [*TEMPLATE_TEXT, " ".join(toy_words()), " ".join(words)]


def train_llama_bpe(corpus: list[str], base_tokens: list[str], vocab_size: int = 1200) -> tuple[dict, list]:
    """A sentencepiece-style BPE ("▁" marks a word start): `base_tokens` (unk, bos, eos), the 256 byte-fallback
    tokens `<0x00>`..`<0xFF>`, then the learned pieces, in the order the published Llama vocabulary uses."""
    trainer_tok = Tokenizer(models.BPE(unk_token=base_tokens[0]))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = trainer_tok.get_vocab()
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    ordered = [*base_tokens, *byte_tokens, *sorted(learned, key=learned.__getitem__)]
    vocab = {token: idx for idx, token in enumerate(dict.fromkeys(ordered))}
    return vocab, trained_merges(trainer_tok)


def trained_merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The merges of a trained BPE (serialised as "a b" strings or [a, b] pairs depending on the version)."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in merges]


def train_qwen2_bpe(corpus: list[str], vocab_size: int = 1200) -> tuple[dict, list]:
    """A byte-level BPE with the Qwen2 split regex (the 256 byte symbols first, then the learned merges)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = qwen2_pre_tokenizer(PRETOKENIZE_REGEX)
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return trainer_tok.get_vocab(), trained_merges(trainer_tok)


def qwen2_pre_tokenizer(regex: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_backend(name: str, words=()) -> tuple[Tokenizer, dict[int, int]]:
    """The local `tokenizers` backend and the map published id -> local id of every published added token.

    The added tokens keep their published order after the trained vocabulary (as the published tokenizers put
    them after the base vocabulary), so ids are local and small while contents and flags are the published ones.
    """
    corpus = training_corpus(words)
    added = published_added_tokens(name)
    if FAMILIES[name].tokenizer == "llama":
        base = [entry["content"] for idx, entry in added if idx < 3]  # <unk> <s> </s> sit inside the vocabulary
        vocab, merges = train_llama_bpe(corpus, base)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=base[0], fuse_unk=True,
                                       byte_fallback=True))
        # as the published Llama tokenizer.json: prepend "▁" and replace spaces, no pre-tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        id_map = {idx: vocab[entry["content"]] for idx, entry in added if idx < 3}
        added = [(idx, entry) for idx, entry in added if idx >= 3]
    else:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        vocab, merges = train_qwen2_bpe(corpus)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = qwen2_pre_tokenizer(PRETOKENIZE_REGEX)
        backend.decoder = decoders.ByteLevel()
        id_map = {}
    for offset, (idx, entry) in enumerate(added):
        id_map[idx] = len(vocab) + offset
    backend.add_tokens([AddedToken(entry["content"], **{flag: entry[flag] for flag in TOKEN_FLAGS})
                        for _, entry in added])
    for idx, entry in added:
        assert backend.token_to_id(entry["content"]) == id_map[idx], entry
    return backend, id_map


def local_tokenizer_config(name: str, id_map: dict[int, int]) -> dict[str, Any]:
    """The published tokenizer_config with `added_tokens_decoder` re-keyed to local ids (every other key as
    published)."""
    config = dict(published_tokenizer_config(name))
    config["added_tokens_decoder"] = {str(id_map[int(idx)]): entry
                                      for idx, entry in config["added_tokens_decoder"].items()}
    return config


def add_post_processor(name: str, backend: Tokenizer, config: dict[str, Any]) -> None:
    """BOS added by the post-processor when the published tokenizer adds it (Llama's TemplateProcessing)."""
    bos = config.get("bos_token")
    add_bos = config.get("add_bos_token", FAMILIES[name].tokenizer == "llama")
    if bos and add_bos:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])


def id_to_content(name: str) -> dict[int, str]:
    """Published token id -> content, for rewriting the generation config's ids."""
    return {idx: entry["content"] for idx, entry in published_added_tokens(name)}


def local_generation_config(name: str, id_map: dict[int, int]) -> dict[str, Any]:
    """The published generation_config with every token id replaced by the local id of the same content."""
    config = published_json(name, "generation_config.json")
    contents = id_to_content(name)

    def local(value):
        if isinstance(value, list):
            return [local(item) for item in value]
        if value not in contents:
            raise KeyError(f"{name}: published token id {value} has no content in the published decoder")
        return id_map[value]

    return {key: local(value) if key.endswith("token_id") and value is not None else value
            for key, value in config.items()}


def build_processor_folder(name: str, out_dir: str | Path, words=()) -> Path:
    """Write a folder that `AutoTokenizer.from_pretrained` (and for LLaVA-1.5 / LLaVA-NeXT `AutoProcessor`) loads.

    The published chat template, preprocessor_config.json, processor_config.json and special_tokens_map.json are
    copied byte-for-byte. The tokenizer is built locally with `tokenizers`: a BPE trained on the template words,
    the toy words and `words` (a few hundred to ~1,200 entries), sentencepiece-style with byte fallback for the
    Llama-based LLaVA checkpoints, byte-level with the Qwen2 split regex (no BOS) for Qwen2-VL / InternVL3. It
    carries every published added token with its published content, flags and role (bos/eos/unk/pad, image and
    model-specific tokens) and the published tokenizer class and flags, but token ids are local: the vocabulary is
    small. generation_config.json is the one file not byte-identical: its token ids are rewritten to the local ids
    of the same token contents (published id -> content via the published added_tokens_decoder).

    Returns:
        The folder (created if needed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = fixture_dir(name)
    for file_name in VERBATIM_FILES:
        if (source / file_name).is_file():
            shutil.copyfile(source / file_name, out_dir / file_name)
    if name == "internvl3":  # no published preprocessor_config.json found: the conversion script's values
        (out_dir / "preprocessor_config.json").write_text(json.dumps(INTERNVL_PREPROCESSOR, indent=2) + "\n")

    backend, id_map = build_backend(name, words)
    config = local_tokenizer_config(name, id_map)
    add_post_processor(name, backend, config)
    backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    (out_dir / "generation_config.json").write_text(
        json.dumps(local_generation_config(name, id_map), indent=2) + "\n", encoding="utf-8")
    logger.info("built %s processor folder in %s (%d tokens)", name, out_dir, backend.get_vocab_size())
    return out_dir


# ---- tiny models -----------------------------------------------------------------------------------------------
def load_tokenizer(processor_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(processor_dir))


def tiny_text_config(config_class, tokenizer, num_layers: int, **kwargs):
    """A 2-layer LM: hidden 64, 4 heads of 16, 2 KV heads, sized to the local tokenizer."""
    return config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)


def build_tiny_model(name: str, processor_dir: str | Path, seed: int = 0, num_layers: int = 2):
    """A tiny randomly initialised model of the family (eval mode, SDPA) whose vision geometry is the published
    one (image/tile size, patch size, Qwen's merge/temporal patch, InternVL's downsample ratio, LLaVA-NeXT's
    pinpoints, feature layer and strategy) and whose token ids come from the tokenizer in `processor_dir`.

    Initialisation is seeded in a forked RNG, so the caller's global torch RNG is left untouched.
    """
    tokenizer = load_tokenizer(processor_dir)
    builder = {"llava-1.5": tiny_llava_config, "llava-next": tiny_llava_next_config,
               "qwen2-vl": tiny_qwen2_vl_config, "internvl3": tiny_internvl_config}[name]
    config, model_class = builder(tokenizer, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation="sdpa")
    return model.eval()


def clip_vision(published: dict[str, Any]):
    from transformers import CLIPVisionConfig

    vision = published["vision_config"]
    return CLIPVisionConfig(image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


def tiny_llava_config(tokenizer, num_layers: int):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    published = published_json("llava-1.5", "config.json")
    vision = clip_vision(published)
    grid = vision.image_size // vision.patch_size
    config = LlavaConfig(vision_config=vision, text_config=tiny_text_config(LlamaConfig, tokenizer, num_layers),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=grid * grid,
                         vision_feature_layer=published["vision_feature_layer"],
                         vision_feature_select_strategy=published["vision_feature_select_strategy"],
                         projector_hidden_act=published["projector_hidden_act"],
                         pad_token_id=tokenizer.pad_token_id)
    return config, LlavaForConditionalGeneration


def tiny_llava_next_config(tokenizer, num_layers: int):
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    published = published_json("llava-next", "config.json")
    vision = clip_vision(published)
    grid = vision.image_size // vision.patch_size
    config = LlavaNextConfig(vision_config=vision,
                             text_config=tiny_text_config(LlamaConfig, tokenizer, num_layers),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=grid * grid,
                             image_grid_pinpoints=published["image_grid_pinpoints"],
                             vision_feature_layer=published["vision_feature_layer"],
                             vision_feature_select_strategy=published["vision_feature_select_strategy"],
                             projector_hidden_act=published["projector_hidden_act"])
    return config, LlavaNextForConditionalGeneration


def tiny_qwen2_vl_config(tokenizer, num_layers: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    published = published_json("qwen2-vl", "config.json")
    vision = published["vision_config"]
    head_dim = 64 // 4
    # M-RoPE sections split head_dim / 2 rotary frequencies over (t, h, w); published [16, 24, 24] for 128
    mrope_section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    assert sum(mrope_section) == head_dim // 2
    vision_config = Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                        in_channels=vision["in_chans"], patch_size=vision["patch_size"],
                                        spatial_merge_size=vision["spatial_merge_size"],
                                        temporal_patch_size=vision["temporal_patch_size"])
    text = tiny_text_config(Qwen2VLTextConfig, tokenizer, num_layers, rope_parameters={
        "rope_type": "default", "rope_theta": published["rope_theta"], "mrope_section": mrope_section})
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen2VLConfig(vision_config=vision_config, text_config=text, **ids), Qwen2VLForConditionalGeneration


def tiny_internvl_config(tokenizer, num_layers: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    image_seq_length = published_json("internvl3", "processor_config.json")["image_seq_length"]
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  image_size=INTERNVL_TILE, patch_size=INTERNVL_PATCH,
                                  use_absolute_position_embeddings=True)
    per_tile = int((INTERNVL_TILE // INTERNVL_PATCH) ** 2 * INTERNVL_DOWNSAMPLE ** 2)
    assert per_tile == image_seq_length, (per_tile, image_seq_length)
    image_token_id = tokenizer.convert_tokens_to_ids(INTERNVL_EXTRA_TOKENS["context_image_token"])
    config = InternVLConfig(vision_config=vision, text_config=tiny_text_config(Qwen2Config, tokenizer, num_layers),
                            image_token_id=image_token_id, image_seq_length=image_seq_length,
                            downsample_ratio=INTERNVL_DOWNSAMPLE)
    return config, InternVLForConditionalGeneration


# ---- assets: a complete local checkpoint and a LLaVA-format data set -------------------------------------------
def sample_records(num_samples: int) -> list[dict[str, Any]]:
    """LLaVA-format records cycling through the shapes a converter must handle: single turn, multi-turn, a system
    turn, the image in a later turn, two images, and text only. `image` holds file-name placeholders `{i}`."""
    shapes = [
        {"image": "{0}", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the square?"}, {"from": "gpt", "value": "red"}]},
        {"image": "{0}", "conversations": [
            {"from": "human", "value": "<image>\nwhat shape is at the top left?"}, {"from": "gpt", "value": "circle"},
            {"from": "human", "value": "where is the triangle?"}, {"from": "gpt", "value": "bottom right"}]},
        {"image": "{0}", "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "what colour is the circle?\n<image>"}, {"from": "gpt", "value": "blue"}]},
        {"image": "{0}", "conversations": [
            {"from": "human", "value": "what is the opposite of top?"}, {"from": "gpt", "value": "bottom"},
            {"from": "human", "value": "<image>\nwhat shape is at the bottom left?"},
            {"from": "gpt", "value": "square"}]},
        {"image": ["{0}", "{1}"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nwhat colour is the square?"},
            {"from": "gpt", "value": "green"}]},
        {"conversations": [
            {"from": "human", "value": "what colour is grass?"}, {"from": "gpt", "value": "green"}]},
    ]
    return [dict(shapes[idx % len(shapes)], id=f"published-{idx}") for idx in range(num_samples)]


def draw_image(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A light image with one coloured rectangle: small, so the family gives few visual tokens."""
    image = Image.new("RGB", size, (245, 245, 240))
    width, height = size
    left, top = rng.randrange(width // 2), rng.randrange(height // 2)
    colour = tuple(rng.randrange(256) for _ in range(3))
    ImageDraw.Draw(image).rectangle((left, top, left + width // 3, top + height // 3), fill=colour)
    return image


def write_published_assets(name: str, out_dir: str | Path, num_samples: int = 8, seed: int = 0) -> dict[str, str]:
    """Write `out_dir/model/` (tiny model + the processor folder's files: a complete local checkpoint) and
    `out_dir/data/train.json` + `out_dir/data/images/*.png`; deterministic for a given seed.

    Returns:
        {"model": model folder, "data": JSON file, "image_folder": image folder} as strings.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    out_dir = Path(out_dir)
    model_dir, data_dir = out_dir / "model", out_dir / "data"
    image_dir = data_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    build_processor_folder(name, model_dir)
    generation_config = (model_dir / "generation_config.json").read_bytes()
    build_tiny_model(name, model_dir, seed=seed).save_pretrained(model_dir)
    # save_pretrained writes the model's own generation config: keep the published one (with local ids)
    (model_dir / "generation_config.json").write_bytes(generation_config)

    rng = random.Random(seed)
    records = []
    for record in sample_records(num_samples):
        files = [f"{record['id']}-{idx}.png" for idx in range(2)]
        if "image" in record:
            placeholders = record["image"] if isinstance(record["image"], list) else [record["image"]]
            names = [placeholder.format(*files) for placeholder in placeholders]
            for file_name in names:
                draw_image(rng, FAMILIES[name].image_size).save(image_dir / file_name, format="PNG")
            record = dict(record, image=names if isinstance(record["image"], list) else names[0])
        records.append(record)
    data_path = data_dir / "train.json"
    data_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote %d %s samples to %s and a tiny model to %s", len(records), name, data_dir, model_dir)
    return {"model": str(model_dir), "data": str(data_path), "image_folder": str(image_dir)}


def spatio_temporal_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (on the batch's attention mask) of copies of a tiny 2-layer Qwen2-VL `model` under one spatio-temporal
    plan (window [3, 3, 3]), gated and hardened; `batch` without labels."""
    import copy

    from visprune.modeling import LayerPlan, Plan, apply_plan

    plan = Plan(family="qwen2_vl", window=3, num_layers=2, num_heads=4, temporal_window=3,
                layers=(LayerPlan(heads=(0, 2), mlp=True), LayerPlan(heads=(1,), mlp=False)))
    gated, hardened = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(gated, plan)
    apply_plan(hardened, plan, mode="hardened")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        return gated(**batch).logits[mask], hardened(**batch).logits[mask]
