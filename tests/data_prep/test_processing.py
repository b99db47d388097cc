"""`load_processor`: the processors of the published checkpoints load (LLaVA-NeXT's without a
processor_config.json, completed from the model's config.json); a processor that needs torchvision, a
torchvision that does not import, a folder without a processor, and a path that does not exist are one
clear line through the CLI."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from visprune.data_prep.processing import ProcessorError, load_processor, matching_torchvision
from visprune.trainer.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from published import build_processor_folder, fixture_dir

    root = tmp_path_factory.mktemp("processing")
    folders = {name: build_processor_folder(name, root / name) for name in ("llava-next", "qwen2-vl")}
    (folders["llava-next"] / "config.json").write_bytes((fixture_dir("llava-next") / "config.json").read_bytes())
    return folders


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "hello"}]}]))
    return path


def test_llava_next_without_processor_config_is_completed_from_the_model_config(assets, caplog):
    assert not (assets["llava-next"] / "processor_config.json").exists()
    with caplog.at_level("INFO", logger="visprune.data_prep.processing"):
        processor = load_processor(assets["llava-next"])
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert (processor.patch_size, processor.vision_feature_select_strategy, processor.num_additional_image_tokens) == \
        (14, "default", 1)
    assert "using the model config's patch_size 14" in caplog.text
    from PIL import Image

    out = processor(text="<image>\nhi", images=[Image.new("RGB", (60, 40), "red")])
    assert out["input_ids"][0].count(processor.image_token_id) > 576  # base grid + high-res grid + newlines


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_a_processor_that_needs_torchvision_names_the_wheel(assets, records, capsys):
    with pytest.raises(ProcessorError, match=r"needs torchvision .* pip install 'torchvision==0\.\d+\.\*'"):
        load_processor(assets["qwen2-vl"])
    assert main(["data", "check", "--json", str(records), "--processor", str(assets["qwen2-vl"]),
                 "--family", "qwen2_vl"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("visprune data check: error: the processor of")
    assert matching_torchvision() in err


def test_a_torchvision_that_does_not_import_is_named(assets, records, tmp_path, monkeypatch, capsys):
    """What a CUDA torchvision wheel beside a CPU torch does: found, then failing at import."""
    site = tmp_path / "site"
    (site / "torchvision").mkdir(parents=True)
    (site / "torchvision" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    (site / "torchvision-0.28.0.dist-info").mkdir()
    (site / "torchvision-0.28.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\n"
                                                                   "Version: 0.28.0\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    importlib.invalidate_caches()
    with pytest.raises(ProcessorError, match=r"torchvision 0\.28\.0 is installed but does not import beside torch .*"
                                             r"RuntimeError: operator torchvision::nms does not exist"):
        load_processor(assets["llava-next"])
    assert main(["data", "check", "--json", str(records), "--processor", str(assets["llava-next"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "install the build that matches your torch" in err


def test_folders_without_a_processor(tmp_path, records, capsys):
    from visprune.data_prep.toy import build_tokenizer, toy_words

    build_tokenizer(toy_words()).save_pretrained(tmp_path / "tokenizer-only")
    with pytest.raises(ProcessorError, match="no multimodal processor"):
        load_processor(tmp_path / "tokenizer-only")
    for folder in (tmp_path / "tokenizer-only", tmp_path / "missing"):
        assert main(["data", "check", "--json", str(records), "--processor", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
