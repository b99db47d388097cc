"""`visprune eval --metric vqa|pope|mc` and `visprune compare` on a tiny dense model and its hardened
copy: batched left-padded greedy answers equal one-at-a-time ones, the scores follow from the answers,
file-format errors name the sample, and the compare report has every quantity."""

import json

import pytest
from tiny_eval import make_tiny, one_thread, records_with, write_json
from visprune.data_prep.records import DataError
from visprune.trainer.cli import build_parser
from visprune.trainer.eval.generation import generate_answers, read_samples
from visprune.trainer.eval.loading import load_for_eval
from visprune.trainer.eval.scoring import pope_metrics, vqa_accuracy

MAX_NEW = 4


def run(argv: list[str], capsys) -> dict:
    """Run one `visprune` verb without `main`'s error boundary; its JSON output."""
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, _one_thread):
    root = tmp_path_factory.mktemp("vqa")
    tiny = make_tiny(root)
    model, processor = load_for_eval(tiny["dense"])
    rows = [sample.row for sample in read_samples(tiny["test"], "vqa")]
    # one at a time: no padding at all; the reference the batched runs must reproduce
    tiny["answers"] = [generate_answers(model, processor, [row], tiny["images"], batch_size=1,
                                        max_new_tokens=MAX_NEW, progress=False)[0] for row in rows]
    tiny["root"] = root
    return tiny


def test_vqa_batched_answers_equal_unbatched_and_score_follows(tiny, capsys, tmp_path):
    data = write_json(tmp_path / "own.json", records_with(tiny, tiny["answers"]))
    preds = tmp_path / "preds.jsonl"
    out = run(["eval", str(tiny["dense"]), "--data", str(data), "--images", str(tiny["images"]), "--metric", "vqa",
               "--batch-size", "3", "--max-new-tokens", str(MAX_NEW), "--predictions", str(preds), "--json"], capsys)
    assert out["metric"] == "vqa" and out["samples"] == 8 and not out["hardened"]
    assert out["score"] == 1.0 and out["predictions"] == str(preds)
    assert sum(entry["samples"] for entry in out["by_category"].values()) == 8
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [line["prediction"] for line in lines] == tiny["answers"]
    assert set(lines[0]) >= {"id", "category", "prediction", "reference", "score"}


def test_vqa_answers_list_and_hardened_folder(tiny, capsys, tmp_path):
    # 10 human answers: 2 of them the model's own answer -> min(1, matches / 3) over the leave-one-out sets
    records = records_with(tiny, ["x"] * 8)
    for record, answer in zip(records, tiny["answers"]):
        record["answers"] = [answer, {"answer": answer}] + ["zzz"] * 8
        record["category"] = "c" + record["qtype"][0]
    data = write_json(tmp_path / "ten.json", records)
    out = run(["eval", str(tiny["dense"]), "--data", str(data), "--images", str(tiny["images"]), "--metric", "vqa",
               "--max-new-tokens", str(MAX_NEW), "--json"], capsys)
    assert out["score"] == pytest.approx(0.6)
    assert set(out["by_category"]) <= {"cd", "cc", "cs", "ce"}
    pruned = run(["eval", str(tiny["pruned"]), "--data", str(data), "--images", str(tiny["images"]),
                  "--metric", "vqa", "--max-new-tokens", str(MAX_NEW), "--json"], capsys)
    assert pruned["hardened"] and pruned["visual_flops"]["ratio"] < 1.0 and 0.0 <= pruned["score"] <= 1.0


def test_pope_metrics_follow_the_predictions(tiny, capsys, tmp_path):
    records = records_with(tiny, ["Yes." if i % 2 else "no" for i in range(8)])
    data = write_json(tmp_path / "pope.json", records)
    preds = tmp_path / "pope.jsonl"
    out = run(["eval", str(tiny["pruned"]), "--data", str(data), "--images", str(tiny["images"]), "--metric", "pope",
               "--max-new-tokens", str(MAX_NEW), "--predictions", str(preds), "--json"], capsys)
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [line["target"] for line in lines] == ["no", "yes"] * 4
    expected = pope_metrics([line["parsed"] for line in lines], [line["target"] for line in lines])
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "other_ratio"):
        assert out[key] == pytest.approx(expected[key])
    assert out["score"] == out["accuracy"]
    assert all("f1" in entry for entry in out["by_category"].values())


def test_mc_letters(tiny, capsys, tmp_path):
    # the model's own answer is option B of even records (answer B) and option A of odd ones (answer B: wrong)
    records = records_with(tiny, ["B"] * 8)
    for i, (record, answer) in enumerate(zip(records, tiny["answers"])):
        own = answer or "nothing"
        record["options"] = ["zzz qqq", own] if i % 2 == 0 else [own, "zzz qqq"]
    data = write_json(tmp_path / "mc.json", records)
    out = run(["eval", str(tiny["dense"]), "--data", str(data), "--images", str(tiny["images"]), "--metric", "mc",
               "--max-new-tokens", str(MAX_NEW), "--json"], capsys)
    assert out["metric"] == "mc" and out["score"] == pytest.approx(0.5)


def test_teacher_forced_is_the_default_and_refuses_predictions(tiny, capsys):
    out = run(["eval", str(tiny["dense"]), "--data", str(tiny["test"]), "--images", str(tiny["images"]), "--json"],
              capsys)
    assert out["metric"] == "teacher_forced"
    assert {"samples", "by_type", "token_accuracy", "exact_match", "visual_flops", "hardened"} <= set(out)
    args = build_parser().parse_args(["eval", str(tiny["dense"]), "--data", str(tiny["test"]), "--predictions",
                                      "x.jsonl"])
    assert args.func(args) == 2 and "needs a generation metric" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses a metric it does not know
        build_parser().parse_args(["eval", str(tiny["dense"]), "--data", str(tiny["test"]), "--metric", "bleu"])


def test_file_errors_name_the_sample(tiny, tmp_path):
    bad_pope = records_with(tiny, ["maybe"] + ["yes"] * 7)
    with pytest.raises(DataError, match=r"see-test-0.*neither yes nor no"):
        read_samples(write_json(tmp_path / "p.json", bad_pope), "pope")
    with pytest.raises(DataError, match="need 'options'"):
        read_samples(write_json(tmp_path / "m.json", records_with(tiny, ["B"] * 8)), "mc")
    outside = records_with(tiny, ["x"] * 8)
    outside[2]["image"] = "../secret.png"
    with pytest.raises(DataError, match=r"see-test-2.*'\.\.' is not allowed"):
        read_samples(write_json(tmp_path / "o.json", outside), "vqa")
    # a symlink out of the image folder is refused when the image is opened (ImageLoader.resolve)
    link_dir = tmp_path / "imgs"
    link_dir.mkdir()
    (link_dir / "x.png").symlink_to(tiny["images"] / outside[0]["image"])
    model, processor = load_for_eval(tiny["dense"])
    row = dict(read_samples(tiny["test"], "vqa")[0].row, images=["x.png"])
    with pytest.raises(DataError, match="resolves outside"):
        generate_answers(model, processor, [row], link_dir, max_new_tokens=1, progress=False)


def test_compare_dense_vs_hardened(tiny, capsys):
    args = ["compare", str(tiny["dense"]), str(tiny["pruned"]), "--data", str(tiny["test"]), "--images",
            str(tiny["images"]), "--max-new-tokens", str(MAX_NEW), "--repeats", "2", "--kv-samples", "2",
            "--batch-size", "4"]
    out = run(args + ["--json"], capsys)
    a, b, ratios = out["a"], out["b"], out["ratios"]
    assert not a["hardened"] and b["hardened"] and out["samples"] == 8 and out["timed_samples"] == 8
    assert a["flops"]["visual_flops_ratio"] == 1.0 and ratios["visual_flops"] == pytest.approx(
        b["flops"]["visual_flops_ratio"]) and ratios["visual_flops"] < 1.0
    assert a["flops"]["layout"]["system"] > 0 and a["flops"]["layout"]["visual"] == 36  # the data's layout
    assert 0 < ratios["kv_bytes"] < 1.0 and a["kv_bytes_per_sample"] > 0  # the plan drops visual K/V
    assert len(a["prefill_ms_passes"]) == 2 and ratios["prefill_latency"] > 0
    assert 0.0 <= out["agreement"] <= 1.0 and set(out["agreement_by_category"]) == set(a["by_category"])
    refs = [record["conversations"][1]["value"] for record in json.loads(tiny["test"].read_text())]
    assert a["score"] == pytest.approx(sum(vqa_accuracy(x, y) for x, y in zip(tiny["answers"], refs)) / 8)

    args = build_parser().parse_args(["compare", str(tiny["dense"]), str(tiny["dense"]), "--data", str(tiny["test"]),
                                      "--images", str(tiny["images"]), "--max-new-tokens", str(MAX_NEW), "--repeats",
                                      "1", "--kv-samples", "1", "--metric", "teacher_forced", "--limit", "4"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| answer agreement (normalised) | | | 100.00% |" in table  # a model agrees with itself
    for row in ("teacher-forced exact match", "visual FLOPs", "prefill latency", "KV cache after prefill"):
        assert row in table
