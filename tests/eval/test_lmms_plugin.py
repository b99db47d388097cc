"""lmms-eval plugin `visprune` on CPU: a tiny hardened folder, hand-built lmms-eval `Instance`s
(generation and log-likelihood; count, order, batching, `until`), log-likelihoods against a direct
computation, the report, registration, and one `simple_evaluate` run of a local task (no downloads)."""

import json
import textwrap

import pytest
import torch

try:
    import lmms_eval  # noqa: F401
except ImportError as exc:  # a loud collection error, not a silent skip: CI installs it (see docs/evaluation.md)
    raise ImportError("these tests need lmms-eval: pip install --no-deps lmms-eval==0.7.3 && pip install loguru pytz "
                      "evaluate sacrebleu tenacity pytablewriter") from exc

from lmms_eval.api.instance import Instance
from PIL import Image
from tiny_eval import make_tiny, one_thread
from transformers import AutoModelForImageTextToText, AutoProcessor
from visprune.trainer.eval.lmms_plugin import MODEL_NAME, VisPrune, manifest, register
from visprune.trainer.eval.lmms_requests import continuation_ids
from visprune.trainer.eval.prompts import to_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, _one_thread):
    root = tmp_path_factory.mktemp("lmms")
    tiny = make_tiny(root)
    records = json.loads(tiny["test"].read_text())
    tiny["docs"] = [{"image": Image.open(tiny["images"] / r["image"]).convert("RGB"),
                     "question": r["conversations"][0]["value"].replace("<image>\n", ""),
                     "answer": r["conversations"][1]["value"]} for r in records]
    return tiny


def plugin(tiny, batch_size: int, **args) -> VisPrune:
    extra = "".join(f",{key}={value}" for key, value in args.items())
    lm = VisPrune.create_from_arg_string(f"pretrained={tiny['pruned']}{extra}", {"batch_size": batch_size})
    lm.task_dict = {"tiny": {"test": tiny["docs"]}}
    return lm


def visual(doc):
    return [doc["image"]]


def gen_request(i: int, context: str, gen_kwargs: dict) -> Instance:
    return Instance("generate_until", (context, dict(gen_kwargs), visual, i, "tiny", "test"), i,
                    {"task": "tiny", "doc_id": i, "repeats": 1})


def ll_request(i: int, context: str, continuation: str) -> Instance:
    return Instance("loglikelihood", (context, continuation, visual, i, "tiny", "test"), i,
                    {"task": "tiny", "doc_id": i, "repeats": 1})


def test_generate_until_batches_keep_request_order(tiny):
    docs = tiny["docs"]
    kwargs = [{"max_new_tokens": 3}, {"max_new_tokens": 2, "until": ["\n"]}]
    requests = [gen_request(i, doc["question"], kwargs[i % 2]) for i, doc in enumerate(docs)]
    lm = plugin(tiny, batch_size=3)
    assert lm.hardened and lm.visual_flops["ratio"] < 1.0
    batched = lm.generate_until(requests)
    one = plugin(tiny, batch_size=1)
    assert batched == [one.generate_until([request])[0] for request in requests]  # order and padding-invariance
    assert len(batched) == len(docs) and all(isinstance(text, str) for text in batched)
    assert all(len(text.split()) <= 3 for text in batched)
    # `until` cuts the answer at the stop string
    first = batched[0].split()
    if len(first) > 1:
        cut = lm.generate_until([gen_request(0, docs[0]["question"], {"max_new_tokens": 3, "until": [first[1]]})])
        assert cut == [batched[0].split(first[1])[0].strip()]
    # the prefill of every generate call was timed, per sample
    report = lm.report()["prefill"]["generate"]
    assert report["samples"] == len(docs) + (len(first) > 1) and report["ms_per_sample"] > 0


def direct_loglikelihood(tiny, question: str, image, continuation: str) -> tuple[float, bool]:
    """Independent of the plugin: one unpadded forward of the chat-templated prompt + continuation."""
    processor = AutoProcessor.from_pretrained(tiny["pruned"])
    from visprune.modeling import load_pruned

    model = load_pruned(tiny["pruned"])
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\n" + question}], tokenize=False,
                                           add_generation_prompt=True)
    whole = processor(text=[prompt + continuation], images=[image], return_tensors="pt", add_special_tokens=False)
    alone = processor(text=[prompt], images=[image], return_tensors="pt", add_special_tokens=False)["input_ids"]
    n = alone.shape[1]
    assert torch.equal(whole["input_ids"][0, :n], alone[0])
    with torch.no_grad():
        logits = model(**whole).logits[0].float()
    target = whole["input_ids"][0, n:]
    logprobs = torch.log_softmax(logits[n - 1:-1], dim=-1)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logits[n - 1:-1].argmax(-1) == target).all())


def test_loglikelihood_matches_a_direct_computation(tiny):
    docs = tiny["docs"][:5]
    lm = plugin(tiny, batch_size=2)
    # a continuation greedy decoding produces: the model's own two greedy tokens, special ones included
    prompt = lm.prompt(docs[0]["question"], 1)
    batch = lm.encoder.encode([prompt], [docs[0]["image"]])
    own = lm.model.generate(**to_model(batch, lm.model), max_new_tokens=2, do_sample=False)[0, batch["input_ids"].shape[1]:]
    greedy = " " + lm.tokenizer.decode(own, skip_special_tokens=False)
    assert continuation_ids(lm.encoder, prompt, greedy) == own.tolist()
    continuations = [greedy, " yes", " " + docs[2]["answer"], " no", " red square"]
    requests = [ll_request(i, doc["question"], cont) for i, (doc, cont) in enumerate(zip(docs, continuations))]
    got = lm.loglikelihood(requests)
    assert len(got) == 5 and all(isinstance(lp, float) and isinstance(g, bool) for lp, g in got)
    for (logprob, is_greedy), doc, cont in zip(got, docs, continuations):
        ref_logprob, ref_greedy = direct_loglikelihood(tiny, doc["question"], doc["image"], cont)
        assert logprob == pytest.approx(ref_logprob, abs=1e-4) and is_greedy == ref_greedy and logprob < 0
    assert got[0][1] and not all(g for _, g in got)  # the model's own greedy tokens are greedy, not everything
    assert lm.report()["prefill"]["loglikelihood"]["samples"] == 5


def test_plain_folder_report_file_and_refusals(tiny, tmp_path):
    report = tmp_path / "r" / "visprune_report.json"
    lm = VisPrune(pretrained=str(tiny["dense"]), batch_size=2, report=str(report))
    lm.task_dict = {"tiny": {"test": tiny["docs"]}}
    assert not lm.hardened and lm.visual_flops["ratio"] == 1.0
    assert isinstance(lm.model, type(AutoModelForImageTextToText.from_pretrained(tiny["dense"])))
    lm.generate_until([gen_request(i, tiny["docs"][i]["question"], {"max_new_tokens": 1}) for i in range(3)])
    saved = json.loads(report.read_text())
    assert saved["model"] == str(tiny["dense"]) and saved["prefill"]["generate"]["samples"] == 3
    with pytest.raises(TypeError, match="unknown model_args"):
        VisPrune(pretrained=str(tiny["dense"]), temperture=0)
    with pytest.raises(ValueError, match="batch_size auto"):
        VisPrune(pretrained=str(tiny["dense"]), batch_size="auto")
    with pytest.raises(FileNotFoundError):
        VisPrune(pretrained=str(tmp_path / "nope"))
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    video = Instance("generate_until", ("q", {}, lambda doc: ["clip.mp4"], 0, "tiny", "test"), 0,
                     {"task": "tiny", "doc_id": 0, "repeats": 1})
    with pytest.raises(NotImplementedError, match="only images"):
        lm.generate_until([video])


def test_registration_resolves_visprune():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    register()
    assert get_model(MODEL_NAME) is VisPrune
    assert MODEL_REGISTRY_V2._coerce_payload_to_manifests(manifest)[0].simple_class_path == \
        "visprune.trainer.eval.lmms_plugin.VisPrune"  # what the `lmms_eval.models` entry point would load


def test_simple_evaluate_runs_a_local_task(tiny, tmp_path):
    """lmms-eval's own evaluator end to end on a 4-document yes/no task read from a local JSON file."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    records = [r for r in json.loads(tiny["test"].read_text())][:4]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"image": r["image"], "question": "is there a red square?",
                                        "answer": "yes" if i % 2 else "no"}) + "\n" for i, r in enumerate(records)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_yesno.yaml").write_text(textwrap.dedent(f"""\
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {docs}
          cache_dir: {tmp_path / "hf-cache"}
        task: visprune_tiny_yesno
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 2
          temperature: 0
        process_results: !function utils.process_results
        metric_list:
          - metric: accuracy
            aggregation: mean
            higher_is_better: true
        metadata:
          - version: 0.0
        """))
    (tasks / "utils.py").write_text(textwrap.dedent(f"""\
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open({str(tiny['images'])!r} + "/" + doc["image"]).convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]

        def process_results(doc, results):
            return {{"accuracy": float(results[0].strip().lower() == doc["answer"])}}
        """))
    register()  # VisPrune() itself makes lmms-eval 0.7.3's evaluator work with filelock 4 (`filelock_compat`)
    results = simple_evaluate(model=MODEL_NAME, model_args=f"pretrained={tiny['pruned']}",
                              tasks=["visprune_tiny_yesno"], batch_size=2, device="cpu",
                              task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert 0.0 <= results["results"]["visprune_tiny_yesno"]["accuracy,none"] <= 1.0
    throughput = results["throughput"]
    assert throughput["avg_prefill_ms_per_sample"] > 0 and throughput["avg_visual_flops_ratio"] < 1.0
