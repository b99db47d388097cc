"""`visprune bench --compare vtw,fastv`: the token-dropping peers run the stock model, drop what they say, match
the plan's visual FLOPs as closely as their rule allows, and report in the JSON contract."""

import json

import pytest
import torch
from conftest import tiny_llava
from visprune.modeling.families import family_for
from visprune.modeling.flops import token_drop_visual_flops, visual_flops
from visprune.trainer.cli import main
from visprune.trainer.eval.bench_setup import build_bench
from visprune.trainer.eval.peers import build_peer, token_drop_prefill


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llava(num_layers=4).config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(config_dir):
    return build_bench(str(config_dir), layers=4, budget=0.3)


def test_keeping_every_token_is_the_stock_prefill(setup):
    ids = setup.inputs["input_ids"]
    hidden, cache = token_drop_prefill(setup.dense, ids, setup.config.image_token_id, layer=1,
                                       keep=int((ids == setup.config.image_token_id).sum()))
    with torch.no_grad():
        stock = family_for(setup.dense).multimodal_core(setup.dense)(input_ids=ids, use_cache=True)
    torch.testing.assert_close(hidden, stock.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length(3) == ids.shape[1]


@pytest.mark.parametrize("keep", [0, 5])
def test_dropped_tokens_leave_the_cache_from_their_layer_on(setup, keep):
    ids = setup.inputs["input_ids"]
    visual = int((ids == setup.config.image_token_id).sum())
    _, cache = token_drop_prefill(setup.dense, ids, setup.config.image_token_id, layer=2, keep=keep)
    assert [cache.get_seq_length(i) for i in range(4)] == [ids.shape[1]] * 2 + [ids.shape[1] - visual + keep] * 2


def test_the_text_rows_after_a_withdrawal_see_no_visual_key(setup):
    """VTW from layer 0 is the stock model on the prompt without its image tokens."""
    ids = setup.inputs["input_ids"]
    visual = ids == setup.config.image_token_id
    hidden, _ = token_drop_prefill(setup.dense, ids, setup.config.image_token_id, layer=0, keep=0)
    positions = torch.arange(ids.shape[1])[None][:, ~visual[0]]
    with torch.no_grad():
        stock = family_for(setup.dense).multimodal_core(setup.dense)(input_ids=ids[:, ~visual[0]],
                                                                      position_ids=positions)
    torch.testing.assert_close(hidden, stock.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_peers_take_the_visual_flops_closest_to_the_plan(setup):
    dense = float(visual_flops(setup.dims, setup.layout))
    for name in ("vtw", "fastv"):
        peer = build_peer(setup, name, 0.3)
        assert peer.visual_flops_ratio == pytest.approx(
            float(token_drop_visual_flops(setup.dims, setup.layout, peer.layer, peer.keep)) / dense)
    vtw = build_peer(setup, "vtw", 0.3)
    assert (vtw.layer, vtw.keep) == (1, 0)  # 1 of 4 layers with every visual token: 25%, the closest to 30%
    fastv = build_peer(setup, "fastv", 0.3)
    assert fastv.layer == 1 and 0 < fastv.keep < setup.layout.visual
    assert abs(fastv.visual_flops_ratio - 0.3) <= abs(vtw.visual_flops_ratio - 0.3)


def test_bench_compare_json_and_bad_names(config_dir, capsys):
    assert main(["bench", "--model", str(config_dir), "--layers", "4", "--budget", "0.3", "--repeats", "1",
                 "--compare", "vtw,fastv", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["peers"]) == {"vtw", "fastv"}
    for peer in result["peers"].values():
        assert peer["ms"] > 0 and 0 < peer["visual_flops_ratio"] < 1 and peer["kv_bytes"] > 0
    for bad in ("vtw,vtw", "fastv,tome", ""):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "--model", str(config_dir), "--compare", bad])
        assert exit_info.value.code == 2
    assert "--compare" in capsys.readouterr().err
