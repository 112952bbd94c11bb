"""What a site and the server do with the model: build it, split sites, calibrate, train, evaluate.

Training goes through MONAI's :class:`monai.engines.SupervisedTrainer`, with an optimizer over
:func:`shpeft_monai.trainable_parameters` only (the k selected values and the head), exactly as the
bundle does. Settings come from the Flower run config (kebab-case keys), overridden per site by
its node config; every key has a default, because ``run_simulation()`` passes an empty run config.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shpeft_monai import (
    SHPEFTConfig,
    SparseDelta,
    SparseMask,
    inject,
    load_delta_values,
    trainable_parameters,
)
from shpeft_monai.model import head_parameters
from shpeft_monai.recipe import DEFAULTS

__all__ = [
    "FedSettings",
    "build_model",
    "evaluate_model",
    "global_state",
    "load_global",
    "make_loader",
    "site_partition",
    "train_local",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedSettings:
    """Every knob of a federated SH-PEFT run (Flower config key = field name with ``-``)."""

    model: str = "vit_small_patch14_dinov2"
    pretrained: bool = True
    checkpoint: str = ""
    img_size: int = 112
    num_classes: int = 2
    budget: float = DEFAULTS.budget
    hybrid: str = DEFAULTS.hybrid  # the method's defaults live once in shpeft_monai.recipe.DEFAULTS
    rho: float = DEFAULTS.rho
    lam: float = DEFAULTS.lam
    calibration_batches: int = 4
    candidate_factor: int = 4
    batch_size: int = 16
    lr: float = DEFAULTS.lr_selected  # the selected values
    head_lr: float = DEFAULTS.lr_head  # the dense head (0: same as lr)
    weight_decay: float = DEFAULTS.wd_selected
    local_epochs: int = 1
    num_server_rounds: int = 3
    num_sites: int = 3
    skew: float = 0.6
    train_per_site: int = 0
    val_limit: int = 0
    test_limit: int = 0
    seed: int = 0
    min_nodes: int = 2
    max_examples: int = 100_000
    round_timeout: float = 3600.0  # seconds the server waits for replies before going on without them
    num_threads: int = 0
    out: str = "runs/fed-deploy"

    @classmethod
    def from_config(cls, *configs: Mapping[str, Any]) -> FedSettings:
        """Merge Flower configs (later ones win); unknown keys are ignored, missing keys keep defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for cfg in configs:
            for key, value in dict(cfg or {}).items():
                name = str(key).replace("-", "_")
                if name in fields:
                    default = fields[name].default
                    if isinstance(default, bool):
                        value = (
                            value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                        )
                    elif isinstance(default, int) and not isinstance(default, bool):
                        value = int(value)
                    elif isinstance(default, float):
                        value = float(value)
                    else:
                        value = str(value)
                    values[name] = value
        return cls(**values)

    def shpeft(self) -> SHPEFTConfig:
        budget: float | int = int(self.budget) if self.budget >= 1 else float(self.budget)
        return SHPEFTConfig(
            budget=budget,
            hybrid=self.hybrid,
            rho=self.rho,
            lam=self.lam,
            calibration_batches=self.calibration_batches,
            head_warmup_steps=0,  # sites calibrate through the server's shared initial head
            seed=self.seed,
        )


def set_threads(s: FedSettings) -> None:
    n = s.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


_BASE_CACHE: dict[tuple, nn.Module] = {}


def build_model(s: FedSettings) -> nn.Module:
    """A fresh copy of the base model (same weights and same seeded initial head on every node)."""
    key = (s.model, s.pretrained, s.checkpoint, s.img_size, s.num_classes, s.seed)
    if key not in _BASE_CACHE:
        from shpeft_monai.networks import create_network

        torch.manual_seed(s.seed)
        kwargs: dict[str, Any] = {"img_size": s.img_size} if "vit" in s.model else {}
        if s.checkpoint:
            kwargs["checkpoint"] = s.checkpoint
        net = create_network(s.model, num_classes=s.num_classes, pretrained=s.pretrained, **kwargs)
        _init_head(net, s)
        _BASE_CACHE.clear()
        _BASE_CACHE[key] = net.eval()
    return copy.deepcopy(_BASE_CACHE[key])


def _init_head(net: nn.Module, s: FedSettings) -> None:
    """Re-initialise the new head from its own seeded generator (truncated normal, std 0.02; zero
    bias): the same initial head on every node, whatever consumed the global RNG before (for
    example a first-time weight conversion)."""
    gen = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        for name, p in sorted(head_parameters(net, s.shpeft()).items()):
            if name.endswith("bias") or p.dim() < 2:
                p.zero_()
            else:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).clamp_(-0.04, 0.04))


# ------------------------------------------------------------------------------------------ data
def site_partition(
    records: Sequence[Mapping[str, Any]], num_sites: int, *, skew: float = 0.6, seed: int = 0
) -> list[list[dict[str, Any]]]:
    """Label-skewed, grouped split of ``records`` over ``num_sites`` sites.

    Site ``i`` receives a share of class ``c`` proportional to ``linspace(1 - skew, 1 + skew)`` over the
    sites, reversed for every other class and rotated for more than two classes (for two classes and three sites with skew 0.6: 13/33/53 % of class 0 and
    53/33/13 % of class 1). Whole near-duplicate groups (the ``group`` key; a record without one is its
    own group) are assigned, largest deficit first, so no group crosses sites.
    """
    if num_sites < 1 or not 0 <= skew < 1:
        raise ValueError(f"num_sites={num_sites} must be >= 1 and skew={skew} in [0, 1)")
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.get("group", f"_single{i}"), []).append(dict(r))
    by_class: dict[int, list[Any]] = {}
    for g, members in groups.items():
        by_class.setdefault(int(members[0]["label"]), []).append(g)
    base = np.linspace(1 - skew, 1 + skew, num_sites) if num_sites > 1 else np.ones(1)
    sites: list[list[dict[str, Any]]] = [[] for _ in range(num_sites)]
    classes = sorted(by_class)
    for ci, c in enumerate(classes):
        share = np.roll(base if ci % 2 == 0 else base[::-1], ci // 2)
        share = share / share.sum()
        gs = sorted(by_class[c], key=str)
        order = rng.permutation(len(gs))
        total = sum(len(groups[g]) for g in gs)
        target = share * total
        have = np.zeros(num_sites)
        # largest groups first for a tight fit; the shuffle breaks ties among equal sizes (stable sort)
        for j in sorted(order, key=lambda j: -len(groups[gs[j]])):
            site = int(np.argmax(target - have))
            sites[site] += groups[gs[j]]
            have[site] += len(groups[gs[j]])
    return [sorted(s, key=lambda r: r["image"]) for s in sites]


def make_loader(
    records: Sequence[Mapping[str, Any]],
    s: FedSettings,
    *,
    train: bool,
    shuffle: bool | None = None,
    seed: int | None = None,
):
    """MONAI ``DataLoader`` over the records with the project's transforms (no worker processes).

    The order and the random augmentation follow ``seed`` (default ``s.seed``): a site that trains
    the same round twice (a retry, a restarted node) produces the same update.
    """
    from monai.data import DataLoader, Dataset

    from shpeft_monai.data import image_transforms
    from shpeft_monai.networks import preprocessing

    try:
        stats = preprocessing(s.model)
    except Exception:
        stats = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    seed = s.seed if seed is None else int(seed)
    tf = image_transforms(s.img_size, train, stats["mean"], stats["std"])
    tf.set_random_state(seed=seed % 2**32)
    ds = Dataset([dict(r) for r in records], tf)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=s.batch_size,
        shuffle=train if shuffle is None else shuffle,
        num_workers=0,
        generator=gen,
    )


def batch_xy(batch: Any, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"].to(device), batch["label"].to(device).long().view(-1)


# ------------------------------------------------------------------------------------------ model state
def global_state(
    model: nn.Module, mask: SparseMask, config: SHPEFTConfig
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(packed k values, head arrays) of an injected model."""
    from shpeft_monai import extract_delta

    delta = extract_delta(model)
    return mask.pack(delta.values).numpy(), {n: t.float().numpy() for n, t in delta.head.items()}


def load_global(
    model: nn.Module,
    mask: SparseMask,
    values: np.ndarray,
    head: Mapping[str, np.ndarray],
    config: SHPEFTConfig,
) -> None:
    """Load packed values and the head into an injected model."""
    load_delta_values(model, mask.unpack(torch.from_numpy(np.asarray(values, dtype=np.float32))))
    params = head_parameters(model, config)
    with torch.no_grad():
        for n, t in head.items():
            params[n].copy_(torch.from_numpy(np.asarray(t)))


def to_delta(
    mask: SparseMask,
    values: np.ndarray,
    head: Mapping[str, np.ndarray],
    config: SHPEFTConfig,
    meta: dict | None = None,
) -> SparseDelta:
    return SparseDelta(
        mask,
        mask.unpack(torch.from_numpy(np.asarray(values, dtype=np.float32))),
        {n: torch.from_numpy(np.asarray(t, dtype=np.float32).copy()) for n, t in head.items()},
        config.to_dict(),
        dict(meta or {}),
    )


# ------------------------------------------------------------------------------------------ train / eval
def train_local(
    model: nn.Module,
    loader: Any,
    s: FedSettings,
    epochs: int,
    lr: float | None = None,
    head_lr: float | None = None,
) -> tuple[int, float]:
    """Train an injected model with MONAI's SupervisedTrainer; returns (examples, mean loss).

    The optimizer holds only :func:`shpeft_monai.trainable_parameters` (the k selected values and the
    head); with ``head_lr`` the dense head gets its own learning rate (the selected values keep ``lr``).
    """
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.utils import CommonKeys

    lr = lr or s.lr
    head = {id(p) for p in head_parameters(model, model._shpeft_config).values()}
    params = trainable_parameters(model)
    groups = [
        {"params": [p for p in params if id(p) not in head], "lr": lr},
        {"params": [p for p in params if id(p) in head], "lr": head_lr or s.head_lr or lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=s.weight_decay)
    losses: list[float] = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=int(epochs),
        train_data_loader=loader,
        network=model,
        optimizer=opt,
        loss_function=nn.CrossEntropyLoss(),
        prepare_batch=lambda batch, device, non_blocking, **kw: batch_xy(batch, device),
        decollate=False,
        amp=False,
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[CommonKeys.LOSS].detach()))
    )
    model.train()
    trainer.run()
    model.eval()
    loss = float(np.mean(losses)) if losses else float("nan")
    if not math.isfinite(loss):
        raise FloatingPointError(f"local training diverged (mean loss {loss}); lower lr={lr}")
    return len(loader.dataset), loss


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Any) -> dict[str, float]:
    """Accuracy, macro F1, AUC (binary) and mean cross-entropy on a loader."""
    from sklearn.metrics import f1_score, roc_auc_score

    model.eval()
    ys, ps, loss, n = [], [], 0.0, 0
    for batch in loader:
        x, y = batch_xy(batch)
        logits = model(x)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        n += int(y.numel())
        ys.append(y)
        ps.append(torch.softmax(logits.float(), 1))
    y, p = torch.cat(ys).numpy(), torch.cat(ps).numpy()
    out = {
        "accuracy": float((p.argmax(1) == y).mean()),
        "f1": float(f1_score(y, p.argmax(1), average="macro")),
        "loss": loss / max(n, 1),
        "num-examples": n,
    }
    if p.shape[1] == 2 and len(set(y.tolist())) == 2:
        out["auc"] = float(roc_auc_score(y, p[:, 1]))
    return out


def inject_fresh(s: FedSettings, mask: SparseMask) -> tuple[nn.Module, SHPEFTConfig]:
    cfg = s.shpeft()
    model = build_model(s)
    inject(model, mask, cfg)
    return model, cfg
