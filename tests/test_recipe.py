"""The training recipe: one set of defaults, parameter groups, LR schedule (resumable), clipping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shpeft_monai import SHPEFTConfig, inject, recipe, select_mask
from shpeft_monai.methods import prepare_method, trainable_parameters
from shpeft_monai.recipe import DEFAULTS, TrainingRecipe, lr_factor, make_optimizer, param_groups


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc1(torch.relu(self.qkv(x))))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _tiny_shpeft(k: int = 12) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    cfg = SHPEFTConfig(budget=k, hybrid="task_agnostic")
    inject(model, select_mask(model, cfg, progress=False), cfg)
    return model


def _check_groups(model: nn.Module, groups: list[dict]) -> None:
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter appears in two groups"
    assert set(ids) == {id(p) for p in trainable_parameters(model)}, "groups != trainable parameters"
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_param_groups_shpeft_selected_values_and_head() -> None:
    model = _tiny_shpeft(12)
    groups = param_groups(model, lr_selected=0.03, wd_selected=0.0, lr_head=0.001, wd_head=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"selected", "head"}
    assert sum(p.numel() for p in by_name["selected"]["params"]) == 12
    assert {id(p) for p in by_name["head"]["params"]} == {id(p) for p in model.head.parameters()}
    assert (by_name["selected"]["lr"], by_name["selected"]["weight_decay"]) == (0.03, 0.0)
    assert (by_name["head"]["lr"], by_name["head"]["weight_decay"]) == (0.001, 0.05)
    _check_groups(model, groups)
    opt = make_optimizer(model, lr_selected=0.03, wd_selected=0.0, lr_head=0.001, wd_head=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("selected", 0.03, 0.0),
        ("head", 0.001, 0.05),
    ]
    # None: the head follows the selected values
    same = param_groups(model, lr_selected=0.02, wd_selected=0.1, lr_head=None, wd_head=None)
    assert {(g["lr"], g["weight_decay"]) for g in same} == {(0.02, 0.1)}


def test_param_groups_seen_through_a_wrapper() -> None:
    model = nn.DataParallel(_tiny_shpeft(5))  # names gain a "module." prefix (as under DDP)
    groups = param_groups(model, lr_selected=0.1, wd_selected=0.0, lr_head=0.01, wd_head=0.0)
    assert {g["name"]: len(g["params"]) for g in groups}["head"] == 2
    _check_groups(model, groups)


@pytest.mark.parametrize("method", ["full", "bitfit", "linear_probe", "lora"])
def test_param_groups_other_methods(method: str) -> None:
    if method == "lora":
        pytest.importorskip("peft")
    torch.manual_seed(0)
    model = prepare_method(Tiny(), method, lora={"target_modules": ["qkv"]}, progress=False)
    groups = param_groups(model, lr_selected=1e-5, wd_selected=1e-4, lr_head=1e-3, wd_head=0.0)
    _check_groups(model, groups)
    by_name = {g["name"]: g for g in groups}
    assert "selected" not in by_name
    head = by_name["head"]
    assert (head["lr"], head["weight_decay"]) == (1e-3, 0.0)
    assert {p.numel() for p in head["params"]} == {16, 2}  # head weight and bias (peft's trainable copy)
    if method == "linear_probe":
        assert set(by_name) == {"head"}
    else:
        assert (by_name["other"]["lr"], by_name["other"]["weight_decay"]) == (1e-5, 1e-4)
    if method == "full":
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_need_something_trainable() -> None:
    model = Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(model)


def test_schedule_warmup_then_cosine_decay() -> None:
    total, w = 100, 10
    f = [lr_factor(i, total, warmup=0.1, schedule="cosine", min_lr_ratio=0.0) for i in range(total)]
    assert all(a < b for a, b in itertools.pairwise(f[: w + 1])), "warm-up must increase"
    assert f[0] == pytest.approx(1 / (w + 1)) and f[w] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[w:])), "cosine must decay"
    assert 0 < f[-1] < 0.01
    assert lr_factor(total, total, warmup=5, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    const = [lr_factor(i, total, warmup=0.1, schedule="constant") for i in range(total)]
    assert const[w:] == [1.0] * (total - w)
    assert [lr_factor(i, 7, warmup=0.0, schedule="constant") for i in range(7)] == [1.0] * 7
    with pytest.raises(ValueError):
        lr_factor(0, 10, schedule="linear")
    # the plain-loop scheduler follows the same curve
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = recipe.make_lr_scheduler(opt, total, warmup=0.1, schedule="cosine")
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * x for x in f])


def _run_engine(
    max_epochs: int, epoch_length: int, resume_at: tuple[int, int] | None = None
) -> list[list[float]]:
    from ignite.engine import Engine, Events

    model = _tiny_shpeft(6)
    opt = make_optimizer(model, lr_selected=0.02, wd_selected=0.0, lr_head=0.004, wd_head=0.0)
    handler = TrainingRecipe(
        opt, schedule="cosine", warmup=0.2, min_lr_ratio=0.0, grad_clip=0.0
    )  # plain engine
    if resume_at is not None:  # a resumed optimizer carries the lr of its last step
        for g in opt.param_groups:
            g["lr"] = 123.0
    seen: list[list[float]] = []
    engine = Engine(lambda e, batch: seen.append([g["lr"] for g in opt.param_groups]))
    if resume_at is not None:

        def resume(e: Engine) -> None:  # what TrainingCheckpoint does on STARTED
            e.state.epoch, e.state.iteration = resume_at

        engine.add_event_handler(Events.STARTED, resume)
    handler.attach(engine)
    engine.run(range(epoch_length), max_epochs=max_epochs)
    return seen


def test_schedule_resumes_at_the_uninterrupted_lr() -> None:
    full = _run_engine(3, 5)
    assert len(full) == 15
    total = 15
    for i, lrs in enumerate(full):
        f = lr_factor(i, total, warmup=0.2, schedule="cosine")
        assert lrs == pytest.approx([0.02 * f, 0.004 * f])
    resumed = _run_engine(3, 5, resume_at=(1, 5))  # stopped after epoch 1
    assert resumed == full[5:]  # exactly: the lr is a pure function of the iteration


def test_gradient_clipping_before_the_optimizer_step() -> None:
    from monai.engines import SupervisedTrainer
    from monai.engines.utils import IterationEvents

    model = _tiny_shpeft(12)
    opt = make_optimizer(model, lr_selected=1e-3, lr_head=1e-3)
    torch.manual_seed(0)
    data = [{"image": torch.randn(4, 8) * 100, "label": torch.tensor([0, 1, 0, 1])} for _ in range(3)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=model,
        optimizer=opt,
        loss_function=recipe.loss_function(0.1),
        decollate=False,
    )
    TrainingRecipe(opt, grad_clip=0.01).attach(trainer)
    norms: list[float] = []

    def record(engine) -> None:
        grads = [p.grad for p in trainable_parameters(model) if p.grad is not None]
        norms.append(float(torch.norm(torch.stack([g.norm() for g in grads]))))

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, record)
    trainer.run()
    assert len(norms) == 3 and max(norms) <= 0.01 + 1e-6


def test_clipping_needs_the_backward_event() -> None:
    from ignite.engine import Engine

    opt = make_optimizer(_tiny_shpeft(4))
    with pytest.raises(ValueError, match="BACKWARD_COMPLETED"):
        TrainingRecipe(opt, grad_clip=1.0).attach(Engine(lambda e, b: None))


def test_loss_function_label_smoothing() -> None:
    assert recipe.loss_function(0.1).label_smoothing == 0.1
    assert recipe.loss_function().label_smoothing == DEFAULTS.label_smoothing


def test_logit_adjusted_loss_is_cross_entropy_of_shifted_logits() -> None:
    from shpeft_monai.bundle import class_counts

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 2])
    counts = class_counts([{"label": 0}] * 6 + [{"label": 1}] * 3 + [{"label": 2}], 3)
    assert counts == [6, 3, 1]
    loss = recipe.loss_function(0.0, logit_adjustment=2.0, class_counts=counts)
    shifted = logits + 2.0 * torch.log(torch.tensor([7.0, 4.0, 2.0]) / 13)  # add-one smoothed prior
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(shifted, target))
    # balanced data: no change from plain cross-entropy; tau 0: plain cross-entropy itself
    flat = recipe.loss_function(0.1, logit_adjustment=1.0, class_counts=[5, 5, 5])
    torch.testing.assert_close(flat(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))
    assert type(recipe.loss_function(0.1, 0.0, [1, 0])) is torch.nn.CrossEntropyLoss
    # a site without a class still trains (the smoothed prior is finite)
    assert torch.isfinite(recipe.loss_function(0.0, 1.0, [4, 0])(logits[:, :2], torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=">= 2 classes"):
        recipe.loss_function(0.0, 1.0, [4, -1])
    with pytest.raises(ValueError, match="class_counts"):
        recipe.loss_function(0.0, 1.0)
    with pytest.raises(ValueError, match="the prior 2"):
        recipe.loss_function(0.0, 1.0, [1, 1])(logits, target)


def test_recipe_validation() -> None:
    with pytest.raises(ValueError):
        DEFAULTS.replace(schedule="step")
    with pytest.raises(ValueError):
        DEFAULTS.replace(lr_head=0.0)
    with pytest.raises(ValueError):
        DEFAULTS.replace(label_smoothing=1.0)
    assert DEFAULTS.replace(lr_head=0.5).lr_head == 0.5
    assert set(DEFAULTS.to_dict()) >= {"hybrid", "lr_selected", "lr_head", "schedule", "warmup"}


# ---------------------------------------------------------------------------- one set of defaults
def test_shpeft_config_reads_the_recipe() -> None:
    cfg = SHPEFTConfig()
    assert (cfg.hybrid, cfg.rho, cfg.lam, cfg.budget, cfg.head_warmup_steps) == (
        DEFAULTS.hybrid,
        DEFAULTS.rho,
        DEFAULTS.lam,
        DEFAULTS.budget,
        DEFAULTS.head_warmup_steps,
    )


def test_federated_settings_read_the_recipe() -> None:
    pytest.importorskip("flwr")
    from shpeft_monai.fl.task import Settings

    s = Settings()  # a federated site's method and recipe are the bundle's
    cfg, parser = s.shpeft(), s.parser()
    assert (cfg.hybrid, cfg.rho, cfg.lam, cfg.budget) == (
        DEFAULTS.hybrid,
        DEFAULTS.rho,
        DEFAULTS.lam,
        DEFAULTS.budget,
    )
    lrs = tuple(parser.get_parsed_content(k) for k in ("lr", "head_lr", "weight_decay"))
    assert lrs == (DEFAULTS.lr_selected, DEFAULTS.lr_head, DEFAULTS.wd_selected)


def test_bundle_reads_the_recipe(bundle_configs) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_configs / "train.yaml"))
    got = {k: parser.get_parsed_content(k) for k in ("lr", "weight_decay", "head_lr", "head_weight_decay")}
    assert got == {
        "lr": DEFAULTS.lr_selected,
        "weight_decay": DEFAULTS.wd_selected,
        "head_lr": DEFAULTS.lr_head,
        "head_weight_decay": DEFAULTS.wd_head,
    }
    assert parser.get_parsed_content("lr_schedule") == DEFAULTS.schedule
    assert parser.get_parsed_content("lr_warmup") == DEFAULTS.warmup
    assert parser.get_parsed_content("grad_clip") == DEFAULTS.grad_clip
    assert parser.get_parsed_content("loss").label_smoothing == DEFAULTS.label_smoothing
    shpeft = SHPEFTConfig.from_dict(parser.get_parsed_content("shpeft"))
    assert (shpeft.hybrid, shpeft.lam, shpeft.rho, shpeft.budget) == (
        DEFAULTS.hybrid,
        DEFAULTS.lam,
        DEFAULTS.rho,
        DEFAULTS.budget,
    )
    assert shpeft.head_warmup_steps == DEFAULTS.head_warmup_steps
    # a command-line override still wins
    parser = ConfigParser()
    parser.read_config(str(bundle_configs / "train.yaml"))
    parser.update({"lr": 0.001, "head_lr": 0.5})
    assert (parser.get_parsed_content("lr"), parser.get_parsed_content("head_lr")) == (0.001, 0.5)


def test_bundle_overlays_keep_their_lr_for_the_head(bundle_configs) -> None:
    from monai.bundle import ConfigParser

    for name in ("full_finetune", "linear_probe", "bitfit", "lora", "task_specific"):
        parser = ConfigParser()
        parser.read_config(
            [str(bundle_configs / "train.yaml"), str(bundle_configs / "overlays" / f"{name}.yaml")]
        )
        lr = parser.get_parsed_content("lr")
        assert math.isfinite(lr) and parser.get_parsed_content("head_lr") == lr, name
