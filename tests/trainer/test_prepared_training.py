"""Training from a `visprune data prepare` folder: the same run as from the JSON (stored tokens, bit-equal
weights), checked against the run's processor, grouped by length on request, and resumed exactly."""

from pathlib import Path

import pytest
from conftest import assert_tensors_equal, checkpoint_tensors
from transformers.trainer_pt_utils import LengthGroupedSampler
from visprune.data_prep.prepare import prepare_dataset
from visprune.data_prep.records import DataError
from visprune.data_prep.toy import write_toy_inputs
from visprune.trainer import checkpoints as ckpt
from visprune.trainer.config import load_recipe
from visprune.trainer.trainer import VispruneTrainer, train

TOY_RECIPE = "recipes/toy/flops25.yaml"
COMMON = ["train.max_steps=6", "budget.warmup_steps=3", "output.save_steps=2", "train.micro_batch_size=4",
          "output.save_total_limit=null"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    paths = write_toy_inputs(root / "toy", num_samples=48, seed=0)
    prepare_dataset(paths["data"], paths["image_folder"], root / "prepared", paths["model"], max_length=256,
                    num_proc=1, progress=False)
    return {**paths, "prepared": root / "prepared"}


def recipe(inputs, out_dir, data, *overrides):
    return load_recipe(TOY_RECIPE, [f"model.path={inputs['model']}", f"data.path={data}",
                                    f"data.image_folder={inputs['image_folder']}", f"output.dir={out_dir}",
                                    *COMMON, *overrides])


def test_a_prepared_folder_trains_exactly_like_its_json(inputs, tmp_path):
    from_json = train(recipe(inputs, tmp_path / "json", inputs["data"]), resume="never")
    from_folder = train(recipe(inputs, tmp_path / "folder", inputs["prepared"]), resume="never")
    assert_tensors_equal(checkpoint_tensors(from_json / "checkpoint-6"), checkpoint_tensors(from_folder / "checkpoint-6"))


def test_group_by_length_needs_a_prepared_folder_and_resumes_exactly(inputs, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="group_by_length needs a prepared dataset"):
        train(recipe(inputs, tmp_path / "raw", inputs["data"], "train.group_by_length=true"), resume="never")

    samplers = []
    original = VispruneTrainer._get_train_sampler

    def spy(self, train_dataset=None):
        samplers.append(original(self, train_dataset))
        return samplers[-1]

    monkeypatch.setattr(VispruneTrainer, "_get_train_sampler", spy)
    grouped = ["train.group_by_length=true"]
    straight = train(recipe(inputs, tmp_path / "straight", inputs["prepared"], *grouped), resume="never")
    assert isinstance(samplers[0], LengthGroupedSampler)
    batch = 4
    order = list(samplers[0])
    lengths = samplers[0].lengths
    megabatch = [lengths[i] for i in order[:batch * 50]]  # the sampler sorts each mega-batch by length
    assert megabatch[:batch] == sorted(megabatch[:batch], reverse=True)

    save = VispruneTrainer._save_optimizer_and_scheduler

    def crash_at_4(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("crash")
        return save(self, output_dir)

    monkeypatch.setattr(VispruneTrainer, "_save_optimizer_and_scheduler", crash_at_4)
    with pytest.raises(RuntimeError, match="crash"):
        train(recipe(inputs, tmp_path / "resumed", inputs["prepared"], *grouped), resume="never")
    monkeypatch.setattr(VispruneTrainer, "_save_optimizer_and_scheduler", save)
    assert [step for step, _ in ckpt.checkpoints(tmp_path / "resumed")] == [2]
    train(recipe(inputs, tmp_path / "resumed", inputs["prepared"], *grouped), resume="auto")
    assert_tensors_equal(checkpoint_tensors(straight / "checkpoint-6"), checkpoint_tensors(tmp_path / "resumed" / "checkpoint-6"))


def test_a_folder_prepared_with_another_processor_is_refused(inputs, tmp_path):
    other = Path(write_toy_inputs(tmp_path / "other", num_samples=8, seed=1)["model"])
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("ASSISTANT", "BOT"))
    cfg = load_recipe(TOY_RECIPE, [f"model.path={other}", f"data.path={inputs['prepared']}",
                                   f"data.image_folder={inputs['image_folder']}", f"output.dir={tmp_path / 'run'}",
                                   *COMMON])
    with pytest.raises(DataError, match="prepared with another processor"):
        train(cfg, resume="never")
