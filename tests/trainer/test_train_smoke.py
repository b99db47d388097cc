"""A few CPU steps of the real `train()` on the toy model: budget tracking, distillation, param
groups, checkpoints (adapter + gates + recipe) and exact resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from visprune.data_prep.toy import write_toy_inputs
from visprune.trainer.build import (
    build_collator,
    build_model,
    build_training_args,
    prepare_model,
    render_deepspeed_config,
)
from visprune.trainer.config import load_recipe
from visprune.trainer.gate_state import GATES_FILE
from visprune.trainer.trainer import VispruneTrainer, train

TOY_RECIPE = "recipes/toy/flops25.yaml"


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory):
    return write_toy_inputs(tmp_path_factory.mktemp("toy"), num_samples=96, seed=0)


def toy_recipe(toy_inputs, out_dir, *overrides):
    return load_recipe(TOY_RECIPE, [f"model.path={toy_inputs['model']}", f"data.path={toy_inputs['data']}",
                                    f"data.image_folder={toy_inputs['image_folder']}", f"output.dir={out_dir}",
                                    *overrides])


def test_budget_reached_and_loss_finite(toy_inputs, tmp_path):
    recipe = toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=30", "budget.warmup_steps=15",
                        "output.save_steps=30", "budget.visual_flops=0.25")
    run_dir = train(recipe, resume="never")
    state = json.loads((run_dir / "checkpoint-30" / "trainer_state.json").read_text())
    history = [e for e in state["log_history"] if "visprune/expected_visual_flops" in e]
    assert len(history) == 30
    assert all(math.isfinite(e["loss"]) for e in history)
    assert abs(history[-1]["visprune/expected_visual_flops"] - 0.25) < 0.02, [
        round(e["visprune/expected_visual_flops"], 3) for e in history]
    for name in ("adapter_model.safetensors", GATES_FILE, "recipe.yaml", "optimizer.pt"):
        assert (run_dir / "checkpoint-30" / name).is_file(), name
    gates = load_file(run_dir / "checkpoint-30" / GATES_FILE)
    assert gates["gates.head.log_alpha"].shape == (3, 4) and "sparsity.lambda_1" in gates
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def _trainer(toy_inputs, out_dir, *overrides):
    recipe = toy_recipe(toy_inputs, out_dir, *overrides)
    model, processor = build_model(recipe)
    collator = build_collator(recipe, model, processor)
    model, gates, controller = prepare_model(model, recipe)
    from visprune.data_prep.records import build_dataset

    args = build_training_args(recipe, render_deepspeed_config(recipe))
    return VispruneTrainer(model=model, args=args, train_dataset=build_dataset(recipe.data.path),
                           data_collator=collator, processing_class=processor,
                           recipe=recipe, gates=gates, controller=controller)


def test_param_groups_and_trainable_parameters(toy_inputs, tmp_path):
    trainer = _trainer(toy_inputs, tmp_path / "run")
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "visprune_gates" in n or "visprune_sparsity" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    optimizer = trainer.create_optimizer()
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    recipe = trainer.recipe
    assert {recipe.optim.lr, recipe.optim.gate_lr, recipe.optim.lambda_lr} <= set(lrs)
    gate_group = [g for g in optimizer.param_groups if any(p is trainer.gates.head.log_alpha for p in g["params"])]
    assert gate_group[0]["weight_decay"] == 0.0 and gate_group[0]["lr"] == recipe.optim.gate_lr


def test_distillation_kl_zero_for_dense_student_and_positive_otherwise(toy_inputs, tmp_path):
    trainer = _trainer(toy_inputs, tmp_path / "run", "distill.enabled=true", "lora.dropout=0.0")
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad(), model.disable_adapter(), trainer.gates.open_all():
        logits = model(**batch).logits
    with torch.no_grad():
        teacher = trainer.teacher_logits(model, batch)
        assert float(trainer.distillation_loss(batch, logits, teacher)) == pytest.approx(0.0, abs=1e-7)
        # the student: window on, gates not all open, adapters on (B=0 init: still window)
        student = model(**batch).logits
        assert float(trainer.distillation_loss(batch, student, teacher)) > 1e-6


class StopAt(TrainerCallback):
    """Simulates a stop after `step` (the checkpoint of that step is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_resume_equals_uninterrupted(toy_inputs, tmp_path):
    common = ["train.max_steps=8", "budget.warmup_steps=4", "output.save_steps=4"]
    straight = _trainer(toy_inputs, tmp_path / "straight", *common)
    straight.train()
    interrupted = _trainer(toy_inputs, tmp_path / "resumed", *common)
    interrupted.add_callback(StopAt(4))
    interrupted.train()
    assert interrupted.state.global_step == 4
    resumed = _trainer(toy_inputs, tmp_path / "resumed", *common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    for name in (GATES_FILE, "adapter_model.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoint-8" / name)
        b = load_file(tmp_path / "resumed" / "checkpoint-8" / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=f"{name}: {key}")


def test_tensorboard_has_scalars_and_gate_heatmap(toy_inputs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=4", "output.heatmap_steps=2",
                               "output.save_steps=4"), resume="never")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("loss_lm", "loss_lagrangian", "expected_visual_flops", "target_visual_flops", "lambda_1",
                "lambda_2", "open_heads", "open_layers", "lr_gates", "lr_lambda"):
        assert f"train/visprune/{tag}" in scalars, (tag, sorted(scalars))
    assert "train/learning_rate" in scalars
    assert "visprune/head_gate_prob" in events.Tags()["images"]


def test_text_only_batch_runs_the_vision_tower_and_gradient_checkpointing_with_distillation(toy_inputs, tmp_path):
    trainer = _trainer(toy_inputs, tmp_path / "run", "distill.enabled=true", "train.gradient_checkpointing=true")
    rows = [row for row in trainer.train_dataset if not row["images"]][:3]
    batch = trainer.data_collator(rows)
    assert "pixel_values" not in batch
    trainer.model.train()
    calls = []
    hook = trainer.model.get_base_model().model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    hook.remove()
    assert calls and torch.isfinite(loss)
    assert trainer.gates.head.log_alpha.grad is not None


@pytest.mark.parametrize("lora, projector", [(True, True), (False, False)])
def test_projector_and_full_fine_tuning(toy_inputs, tmp_path, lora, projector):
    overrides = [f"model.train_projector={str(projector).lower()}"] + ([] if lora else ["lora=null"])
    recipe = toy_recipe(toy_inputs, tmp_path / "run", *overrides)
    model, _ = build_model(recipe)
    model, _, _ = prepare_model(model, recipe)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable) == projector
    if lora:
        assert any("lora_A" in n for n in trainable)
    else:
        lm = [n for n, _ in model.model.language_model.named_parameters()]
        assert len([n for n in trainable if "language_model" in n]) == len(lm)


def test_annealed_temperature_is_logged_and_hardening_uses_the_final_one(toy_inputs, tmp_path):
    from visprune.trainer.export import harden
    from visprune.trainer.gate_state import stored_gate_config

    recipe = toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=6", "budget.warmup_steps=3",
                        "output.save_steps=6", "gates.temperature_start=1.5", "gates.temperature=0.3")
    run_dir = train(recipe, resume="never")
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    temps = [e["visprune/gate_temperature"] for e in state["log_history"] if "visprune/gate_temperature" in e]
    assert temps[0] == pytest.approx(1.5) and temps == sorted(temps, reverse=True) and temps[-1] > 0.3
    stored = stored_gate_config(run_dir / "checkpoint-6" / GATES_FILE)
    assert (stored.temperature, stored.temperature_start) == (0.3, 1.5)
    report = harden(run_dir / "checkpoint-6", tmp_path / "out", budget=0.25)
    assert report["visual_flops"]["ratio"] <= 0.25


def test_plan_loss_is_logged_from_its_start_and_trains(toy_inputs, tmp_path):
    recipe = toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=6", "budget.warmup_steps=2",
                        "output.save_steps=6", "plan_loss.weight=1.0", "plan_loss.start=0.5")
    run_dir = train(recipe, resume="never")
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    with_plan = [e["step"] for e in logged if "visprune/loss_plan" in e]
    assert with_plan == [4, 5, 6]  # progress 3/6 = 0.5 from the fourth step on
    assert all(math.isfinite(e["visprune/loss_plan"]) for e in logged if "visprune/loss_plan" in e)


def test_plan_loss_candidates_train_the_lowest_loss_candidate(toy_inputs, tmp_path, monkeypatch):
    from visprune.trainer.trainer import VispruneTrainer

    chosen: list[tuple[str, list[float]]] = []
    original = VispruneTrainer.choose_plan

    def spy(self, model, inputs, teacher_logits, budget):
        plan = original(self, model, inputs, teacher_logits, budget)
        candidates = self.gates.candidate_plans(budget, self.recipe.plan_loss.candidates, self.layout,
                                                fill=True, seed=self.state.global_step)
        losses = []
        with torch.no_grad():
            for candidate, _ in candidates:
                with self.gates.plan_forward(budget, self.layout, True, plan=candidate):
                    losses.append(float(self._plan_objective(inputs, model(**inputs), teacher_logits)))
        assert plan in [c for c, _ in candidates]
        assert losses[[c for c, _ in candidates].index(plan)] == pytest.approx(min(losses), rel=1e-4)
        chosen.append((self.last_plan_source, losses))
        return plan

    monkeypatch.setattr(VispruneTrainer, "choose_plan", spy)
    recipe = toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=4", "budget.warmup_steps=2",
                        "output.save_steps=4", "plan_loss.weight=1.0", "plan_loss.start=0.5",
                        "plan_loss.candidates=3")
    run_dir = train(recipe, resume="never")
    assert len(chosen) == 2  # steps 3 and 4
    assert all(len(losses) >= 1 for _, losses in chosen)
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    drawn = [e["visprune/plan_drawn"] for e in state["log_history"] if "visprune/plan_drawn" in e]
    assert len(drawn) == 2 and all(0.0 <= d <= 1.0 for d in drawn)


def test_plan_select_fixes_the_best_candidate_and_trains_it_to_the_end(toy_inputs, tmp_path):
    from visprune.modeling import Plan
    from visprune.trainer.export import HardenError, harden
    from visprune.trainer.run_folder import PLAN_CHOICE_FILE

    recipe = toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=6", "budget.warmup_steps=3",
                        "output.save_steps=2", "budget.visual_flops=0.25", "plan_select.at=0.5",
                        "plan_select.candidates=4", "plan_select.samples=6")
    run_dir = train(recipe, resume="never")
    assert not (run_dir / "checkpoint-2" / PLAN_CHOICE_FILE).exists()  # chosen at the start of step 4
    choice = json.loads((run_dir / "final" / PLAN_CHOICE_FILE).read_text())
    assert choice["step"] == 3 and choice["budget"] == pytest.approx(0.25) and choice["samples"] == 6
    losses = [c["loss"] for c in choice["candidates"]]
    assert 1 <= len(losses) <= 4 and all(math.isfinite(x) for x in losses)
    chosen = next(c for c in choice["candidates"] if c["source"] == choice["chosen"])
    assert chosen["loss"] == min(losses) and chosen["visual_flops_ratio"] <= 0.25
    plan = Plan.from_json(choice["plan"])
    # committed and frozen: the gates of every later checkpoint are the plan's, at +-10
    gates = [load_file(run_dir / name / GATES_FILE)["gates.head.log_alpha"] for name in ("checkpoint-4", "final")]
    assert torch.equal(gates[0], gates[1]) and set(gates[1].abs().flatten().tolist()) == {10.0}
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    fixed = [e for e in state["log_history"] if e.get("visprune/plan_fixed")]
    assert [e["step"] for e in fixed] == [4, 5, 6]
    assert all(e["visprune/expected_visual_flops"] == pytest.approx(chosen["visual_flops_ratio"], abs=1e-6)
               and e["visprune/open_heads"] == sum(len(layer.heads) for layer in plan.layers) for e in fixed)
    logged = {e["step"]: e for e in state["log_history"] if "visprune/lr_gates" in e}
    assert all(logged[step]["visprune/lr_gates"] == 0.0 for step in (4, 5, 6))
    rates = [logged[step]["learning_rate"] for step in (3, 4, 5, 6)]  # as transformers logs them
    assert rates[2] > rates[0] > rates[1] >= 0.0 and rates[3] < rates[2]  # decay, restart for the fixed plan, decay
    report = harden(run_dir / "final", tmp_path / "out")
    assert report["plan_rule"] == "selected in training"
    assert Plan.from_json(tmp_path / "out" / "pruning_plan.json") == plan
    with pytest.raises(HardenError, match="harden it at that budget"):
        harden(run_dir / "final", tmp_path / "out2", budget=0.5)


def test_plan_select_trains_its_finalists_in_turn_then_fixes_the_best_and_resumes_mid_trial(toy_inputs, tmp_path):
    import shutil

    from visprune.modeling import Plan
    from visprune.trainer.export import HardenError, harden
    from visprune.trainer.run_folder import PLAN_CHOICE_FILE

    overrides = ["train.max_steps=8", "budget.warmup_steps=3", "output.save_steps=2", "budget.visual_flops=0.25",
                 "plan_select.at=0.5", "plan_select.candidates=4", "plan_select.samples=6",
                 "plan_select.finalists=2", "plan_select.trial=0.25"]
    run_dir = train(toy_recipe(toy_inputs, tmp_path / "run", *overrides), resume="never")
    # scored at the start of step 5; steps 5 and 6 train the two finalists in turn; fixed from step 7
    mid = json.loads((run_dir / "checkpoint-6" / PLAN_CHOICE_FILE).read_text())
    assert mid["step"] == 4 and "plan" not in mid and len(mid["finalists"]) == 2
    with pytest.raises(HardenError, match="no plan was chosen yet; harden a later checkpoint"):
        harden(run_dir / "checkpoint-6", tmp_path / "mid")
    assert not (tmp_path / "mid").exists()
    choice = json.loads((run_dir / "final" / PLAN_CHOICE_FILE).read_text())
    assert choice["trial_end"] == 6 and {e["source"] for e in choice["finalists"]} <= {
        c["source"] for c in choice["candidates"]}
    by_loss = sorted(choice["candidates"], key=lambda c: c["loss"])
    assert [e["source"] for e in choice["finalists"]] == [c["source"] for c in by_loss[:2]]
    after = {e["source"]: e["loss_after_trial"] for e in choice["finalists"]}
    assert choice["chosen"] == min(after, key=after.get)
    finalists = [Plan.from_json(e["plan"]) for e in choice["finalists"]]
    plan = Plan.from_json(choice["plan"])
    assert plan == finalists[[e["source"] for e in choice["finalists"]].index(choice["chosen"])]
    state = json.loads((run_dir / "checkpoint-8" / "trainer_state.json").read_text())
    logs = {e["step"]: e for e in state["log_history"] if "visprune/lr_gates" in e}
    assert [step for step, e in logs.items() if e.get("visprune/plan_trial")] == [5, 6]
    assert [step for step, e in logs.items() if e.get("visprune/plan_fixed")] == [7, 8]
    assert all(logs[step]["visprune/lr_gates"] == 0.0 for step in (5, 6, 7, 8))
    for step, trained in ((5, finalists[0]), (6, finalists[1]), (7, plan)):
        assert logs[step]["visprune/open_heads"] == sum(len(layer.heads) for layer in trained.layers)
    report = harden(run_dir / "final", tmp_path / "out")
    assert report["plan_rule"] == "selected in training" and report["plan_selection"]["chosen"] == choice["chosen"]
    assert Plan.from_json(tmp_path / "out" / "pruning_plan.json") == plan
    resumed = tmp_path / "resumed"  # a crash after step 6 (mid-trial checkpoint): the same finalists, the same choice
    shutil.copytree(run_dir, resumed)
    for name in ("checkpoint-8", "final"):
        shutil.rmtree(resumed / name)
    train(toy_recipe(toy_inputs, resumed, *overrides), resume="auto")
    assert json.loads((resumed / "final" / PLAN_CHOICE_FILE).read_text()) == choice
    for key, tensor in load_file(run_dir / "final" / GATES_FILE).items():
        torch.testing.assert_close(load_file(resumed / "final" / GATES_FILE)[key], tensor, atol=0, rtol=0)


def test_plan_select_is_kept_by_a_resumed_run(toy_inputs, tmp_path):
    import shutil

    from visprune.trainer.run_folder import PLAN_CHOICE_FILE

    overrides = ["train.max_steps=6", "budget.warmup_steps=2", "output.save_steps=4", "budget.visual_flops=0.25",
                 "plan_select.at=0.5", "plan_select.candidates=3", "plan_select.samples=4"]
    straight = train(toy_recipe(toy_inputs, tmp_path / "straight", *overrides), resume="never")
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("checkpoint-6", "final"):  # a crash after step 4
        shutil.rmtree(resumed / name, ignore_errors=True)
    train(toy_recipe(toy_inputs, resumed, *overrides), resume="auto")
    a, b = (json.loads((run / "final" / PLAN_CHOICE_FILE).read_text()) for run in (straight, resumed))
    assert a == b
    for key, tensor in load_file(straight / "final" / GATES_FILE).items():
        torch.testing.assert_close(load_file(resumed / "final" / GATES_FILE)[key], tensor, atol=0, rtol=0)


def test_learned_mlp_channels_train_under_the_budget_and_harden_to_whole_blocks(toy_inputs, tmp_path):
    """`gates.mlp_channel_block`: the channel gates are trained with the rest (their P(open) in the expected
    FLOPs), saved beside them, and hardening keeps whole blocks; the hardened folder loads and runs."""
    from visprune.modeling import Plan, load_pruned
    from visprune.trainer.export import harden

    recipe = toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=6", "budget.warmup_steps=3",
                        "output.save_steps=6", "budget.visual_flops=0.25", "gates.mlp_channel_block=16")
    run_dir = train(recipe, resume="never")
    saved = load_file(run_dir / "final" / GATES_FILE)
    assert saved["gates.channels.log_alpha"].shape == (3, 4)  # toy MLP width 64: 4 blocks of 16
    assert not torch.equal(saved["gates.channels.log_alpha"], torch.full((3, 4), 2.0))  # trained
    report = harden(run_dir / "final", tmp_path / "out", budget=0.6, fill=True)
    assert report["visual_flops"]["ratio"] <= 0.6 + 1e-6
    plan = Plan.from_json(tmp_path / "out" / "pruning_plan.json")
    for layer in plan.layers:
        if layer.mlp_channels is not None:
            blocks = {channel // 16 for channel in layer.mlp_channels}
            assert set(layer.mlp_channels) == {channel for b in blocks for channel in range(16 * b, 16 * b + 16)}
    model = load_pruned(tmp_path / "out")
    assert model is not None


def test_freeze_gates_train_and_harden_to_a_plan_with_frozen_layers(toy_inputs, tmp_path):
    """`gates.visual_freeze`: the freeze gates a[l] are trained with the rest (P(open) in the expected FLOPs and
    a logged frozen-layer count), saved beside them, and hardening ranks them; the folder loads and runs."""
    from visprune.modeling import Plan, load_pruned
    from visprune.trainer.export import harden

    recipe = toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=6", "budget.warmup_steps=3",
                        "output.save_steps=6", "budget.visual_flops=0.25", "gates.visual_freeze=true")
    run_dir = train(recipe, resume="never")
    saved = load_file(run_dir / "final" / GATES_FILE)
    assert saved["gates.update.log_alpha"].shape == (3,)
    assert not torch.equal(saved["gates.update.log_alpha"], torch.full((3,), 2.0))  # trained
    logged = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert any("visprune/frozen_layers" in entry for entry in logged)
    report = harden(run_dir / "final", tmp_path / "out", budget=0.25, fill=True)
    assert report["visual_flops"]["ratio"] <= 0.25 + 1e-6
    plan = Plan.from_json(tmp_path / "out" / "pruning_plan.json")
    assert not any(layer.mlp for layer in plan.layers if layer.frozen)
    assert load_pruned(tmp_path / "out") is not None


def test_ring_gates_train_and_harden_to_per_layer_windows(toy_inputs, tmp_path):
    """`gates.window_rings`: the ring gates are trained with the rest (expected window in the FLOPs, a logged
    radius), saved beside them, and hardening writes per-layer windows that the hardened folder runs."""
    from visprune.modeling import Plan, load_pruned
    from visprune.trainer.export import harden

    recipe = toy_recipe(toy_inputs, tmp_path / "run", "train.max_steps=6", "budget.warmup_steps=3",
                        "output.save_steps=6", "budget.visual_flops=0.25", "window=5", "gates.window_rings=true")
    run_dir = train(recipe, resume="never")
    saved = load_file(run_dir / "final" / GATES_FILE)
    assert saved["gates.rings.log_alpha"].shape == (3, 2)
    assert not torch.equal(saved["gates.rings.log_alpha"], torch.full((3, 2), 2.0))  # trained
    logged = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert any("visprune/window_radius" in entry for entry in logged)
    report = harden(run_dir / "final", tmp_path / "out", budget=0.25, fill=True)
    assert report["visual_flops"]["ratio"] <= 0.25 + 1e-6
    plan = Plan.from_json(tmp_path / "out" / "pruning_plan.json")
    assert plan.window == 5 and all(plan.layer_window(i) in (1, 3, 5) for i in range(3))
    assert load_pruned(tmp_path / "out") is not None
