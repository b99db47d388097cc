"""`visprune data check`: every fault injected into a LLaVA JSON + image folder becomes a named reason,
found up front; the CLI fails listing every bad id, or with --skip-bad writes rejected.jsonl with counts."""

from __future__ import annotations

import json

from visprune.data_prep.check import REJECTED_FILE, check_records
from visprune.data_prep.templates import ChatTemplate
from visprune.trainer.cli import main


def sample(sample_id, image=None, question="what colour?", answer="red"):
    record = {"id": sample_id, "conversations": [{"from": "human", "value": question},
                                                 {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
        record["conversations"][0]["value"] = "<image>\n" + question
    return record


FAULTS = [
    (sample("missing", "nowhere.png"), "image_missing"),
    (sample("truncated", "truncated.png"), "image_undecodable"),
    (sample("truncated-jpeg", "truncated.jpg"), "image_undecodable"),
    (sample("gif-as-jpg", "gif.jpg"), "image_mislabelled"),
    (sample("dotdot", "../outside.png"), "image_path"),
    (sample("absolute", "/etc/passwd"), "image_path"),
    (sample("link-out", "link_out.png"), "image_outside_folder"),
    (sample("fifo", "fifo.png"), "image_not_a_file"),
    ({"id": "two-placeholders", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image> <image> what?"}, {"from": "gpt", "value": "red"}]}, "placeholder_count"),
    (sample("too-long", "red.png", question="what colour? " * 80), "over_length"),
    ({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "red"}]}, "conversation"),
    ({"id": "no-turns-list", "conversations": "hi"}, "malformed_record"),
]


def test_every_fault_is_named_and_good_samples_pass(processor, template, folder):
    records = [sample("ok-image", "red.png"), sample("ok-text")] + [record for record, _ in FAULTS]
    report = check_records(records, folder, processor, template, max_length=128, progress=False)
    assert report.num_samples == len(records) and report.num_ok == 2
    assert {item["id"]: item["reason"] for item in report.rejected} == {
        repr(record["id"]): reason for record, reason in FAULTS}
    assert report.counts["image_path"] == 2
    assert "fifo.png" in report.summary()


def test_a_template_that_supervises_nothing_is_caught(processor, folder):
    # renders only the user turns: training would see loss 0 (resolve_template refuses it up front)
    blind = ChatTemplate("processor", "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                         "{% endif %}{% endfor %}", False, "<image>", ("</s>",))
    report = check_records([sample("answerless", "red.png")], folder, processor, blind, progress=False)
    assert [item["reason"] for item in report.rejected] == ["no_supervised_tokens"]


def test_cli_fails_listing_ids_or_skips_them_into_rejected_jsonl(processor, folder, tmp_path, capsys):
    processor.save_pretrained(tmp_path / "processor")
    data = tmp_path / "mix.json"
    data.write_text(json.dumps([sample("ok", "red.png"), sample("missing", "nowhere.png"),
                                sample("fifo", "fifo.png")]))
    args = ["data", "check", "--json", str(data), "--images", str(folder), "--processor", str(tmp_path / "processor")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "'missing': image_missing" in err and "'fifo': image_not_a_file" in err
    assert main(args + ["--skip-bad", "--out", str(tmp_path / "scan")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "scan" / REJECTED_FILE).read_text().splitlines()]
    assert [line["id"] for line in lines[:-1]] == ["'missing'", "'fifo'"]
    assert lines[-1] == {"counts": {"image_missing": 1, "image_not_a_file": 1}, "num_samples": 3, "num_ok": 1}
