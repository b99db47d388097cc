"""Tiny LLaVA models and batches built from configs: CPU only, no downloads, fixed seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3
VOCAB = 64
IMAGE_SIZE, PATCH = 24, 6  # 4 x 4 grid, 16 image tokens per image
GRID = IMAGE_SIZE // PATCH
TOKENS_PER_IMAGE = GRID * GRID


def tiny_llava(num_kv_heads: int = 4, attention_bias: bool = False, seed: int = 0,
               num_layers: int = 3) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                       attention_bias=attention_bias, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         image_seq_length=TOKENS_PER_IMAGE, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    if attention_bias:  # random biases so a wrong bias rule shows up
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.o_proj.bias.normal_(0, 0.5)
    return model.eval()


def tiny_batch(images_per_sample=(1, 2, 0), padding: str = "left", seed: int = 1, text_len: int = 5):
    """A batch of samples with `images_per_sample[i]` images each (0 = text-only), padded to one length."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, num_images in enumerate(images_per_sample):
        ids = [1] + torch.randint(4, VOCAB, (2 + i,), generator=gen).tolist()
        for _ in range(num_images):
            ids += [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + torch.randint(4, VOCAB, (1,), generator=gen).tolist()
        ids += torch.randint(4, VOCAB, (text_len,), generator=gen).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        if padding == "left":
            input_ids[b, length - len(ids):] = torch.tensor(ids)
            attention_mask[b, length - len(ids):] = 1
        else:
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1
    num_images = sum(images_per_sample)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if num_images:
        batch["pixel_values"] = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return batch


@pytest.fixture
def model():
    return tiny_llava()


@pytest.fixture
def batch():
    return tiny_batch()


@pytest.fixture(scope="session")
def processor():
    """The toy LLaVA processor (local word-level tokenizer, 24 px images, 6 px patches)."""
    from visprune.data_prep.toy import build_processor, build_tokenizer, toy_words

    return build_processor(build_tokenizer(toy_words()))


@pytest.fixture(scope="session")
def template(processor):
    """The toy processor's chat template as training resolves it (`data.template: auto`, family llava)."""
    from visprune.data_prep.templates import resolve_template

    return resolve_template(processor, "auto", "llava")


@pytest.fixture
def folder(tmp_path):
    """An image folder with one image of every kind the pre-flight scan must tell apart."""
    import os

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (24, 24), "red").save(images / "red.png")
    Image.new("RGB", (24, 24), "blue").save(images / "blue.png")
    data = (images / "red.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.effect_noise((64, 64), 60).convert("RGB").save(images / "photo.jpg", quality=90)
    jpeg = (images / "photo.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # a download that stopped half-way
    Image.new("RGB", (24, 24), "green").save(images / "gif.jpg", format="GIF")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (24, 24), "red").save(outside)
    (images / "link_out.png").symlink_to(outside)
    os.mkfifo(images / "fifo.png")
    return images


def checkpoint_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor a training checkpoint saved (gates + λ, adapter), keyed `file:tensor`."""
    from safetensors.torch import load_file

    out = {}
    for name in ("gates.safetensors", "adapter_model.safetensors"):
        out.update({f"{name}:{key}": value for key, value in load_file(checkpoint / name).items()})
    return out


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=atol, rtol=0, msg=key)
