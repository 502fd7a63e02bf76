"""TunedModule's recipe pieces without a Trainer: parameter groups, schedules, slim checkpoints."""
import math
from types import SimpleNamespace

import pytest
import torch

from monatune.tasks import ImageClassifier

TINY = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "img_size": 32, "patch_size": 2, "window_size": 4}


def built(method="mona", **kwargs):
    torch.manual_seed(0)
    module = ImageClassifier("swin_tiny_patch4_window7_224", model_kwargs=TINY, num_classes=3, method=method, **kwargs)
    module.configure_model()
    return module


def attach(module, batches=10, epochs=4, max_steps=-1, accumulate=1):
    data = SimpleNamespace(train_dataloader=lambda: list(range(batches)))
    module._trainer = SimpleNamespace(datamodule=data, limit_train_batches=1.0, accumulate_grad_batches=accumulate,
                                      max_steps=max_steps, max_epochs=epochs)
    return module


def lrs(module, steps):
    config = attach(module).configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    out = []
    for step in range(steps):
        scheduler.step_update(num_updates=step)
        out.append(optimizer.param_groups[0]["lr"])
    return out, optimizer


def test_parameter_groups_hold_exactly_the_trainable_tensors_and_skip_decay_on_norms_biases_tables():
    module = built()
    _, optimizer = lrs(module, 1)
    names = {id(p): n for n, p in module.model.named_parameters()}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    grouped = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert set(grouped) == trainable
    for name, decay in grouped.items():
        param = dict(module.model.named_parameters())[name]
        no_decay = param.ndim <= 1 or "relative_position_bias_table" in name
        assert decay == (0.0 if no_decay else 0.05), name


def test_cosine_schedule_warms_up_then_follows_the_cosine_over_the_whole_run():
    module = built(lr=1e-3, warmup_epochs=1, min_lr_ratio=0.01, warmup_lr_ratio=1e-3)
    values, _ = lrs(module, 40)  # 4 epochs x 10 steps; warm-up = 10 steps
    assert values[0] == pytest.approx(1e-6)
    assert values[:10] == sorted(values[:10]) and values[9] == pytest.approx(1e-6 + 9 * (1e-3 - 1e-6) / 10)
    for t in range(10, 40):
        assert values[t] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * t / 40)))


def test_step_schedule_multiplies_at_milestone_epochs():
    module = built(lr=1e-3, schedule="step", milestones=[2, 3], gamma=0.1)
    values, _ = lrs(module, 40)
    assert values[19] == pytest.approx(1e-3) and values[20] == pytest.approx(1e-4) and values[30] == pytest.approx(1e-5)


def test_lr_scale_applies_to_its_method_only():
    assert ImageClassifier("x", method="mona", lr=1e-4, lr_scale={"mona": 2.0}).lr == pytest.approx(2e-4)
    assert ImageClassifier("x", method="lora", lr=1e-4, lr_scale={"mona": 2.0}).lr == pytest.approx(1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(method="monaa"), "unknown tuning method"),
    (dict(method="mona", method_options={"rank": 4}), "unknown option"),
    (dict(schedule="linear"), "unknown schedule"),
    (dict(pretrained="nowhere.pth"), "nowhere.pth"),
    (dict(adapter="no-such-dir"), "no-such-dir"),
])
def test_bad_arguments_fail_at_construction(bad, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ImageClassifier("swin_tiny_patch4_window7_224", **bad)


def test_resumable_checkpoint_keeps_only_what_trains_and_checks_it_on_load():
    module = built()
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    frozen = {f"model.{n}" for n, p in module.model.named_parameters() if not p.requires_grad}
    assert trainable <= set(checkpoint["state_dict"]) and not frozen & set(checkpoint["state_dict"])
    assert checkpoint["monatune"]["frozen_omitted"] == len(frozen) > 0
    assert torch.equal(checkpoint["monatune_rng"]["cpu"], torch.get_rng_state())

    module.on_load_checkpoint(checkpoint)  # fits
    lora = built(method="lora")
    with pytest.raises(ValueError, match="trained with mona"):
        lora.on_load_checkpoint(checkpoint)
    del checkpoint["monatune"]
    with pytest.raises(ValueError, match="lacks"):
        lora.on_load_checkpoint(checkpoint)
