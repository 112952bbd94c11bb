"""What a site and the server do with the model: the bundle trains, this module swaps values.

A site (:class:`SiteBundle`) builds the bundle's ``ConfigWorkflow`` (``train.yaml`` + any named
overlays + ``overlays/federated.yaml``) as ``monai.fl.client.MonaiAlgo`` does, so transforms,
network, method, recipe (``shpeft_monai.recipe.DEFAULTS``) and device (the site's GPU when it has
one) are the bundle's. Per round it writes the agreed mask to the bundle's mask file, loads the
server's k values and head into ``peft_network``, runs ``train#trainer`` for the local epochs and
reads the values back. The server builds the same base network from the same config
(:func:`base_network`). Settings come from the Flower run config (kebab-case keys) and, per site,
the node config; every key has a default because ``run_simulation()`` passes an empty run config.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from shpeft_monai import SHPEFTConfig, SparseMask, load_delta_values
from shpeft_monai.fl.settings import CONFIGS, Settings
from shpeft_monai.model import head_parameters

__all__ = [
    "CONFIGS",
    "Settings",
    "SiteBundle",
    "base_network",
    "evaluate_records",
    "global_state",
    "load_global",
    "private_update",
]

logger = logging.getLogger(__name__)

ROUND_SEED = 1009  # round r of a site trains with seed + ROUND_SEED * r: a retried round repeats itself


def base_network(s: Settings) -> nn.Module:
    """The base network as every site's bundle builds it (server side: no data, ``num-classes``)."""
    from monai.utils import set_determinism

    from shpeft_monai import bundle as sb
    from shpeft_monai.run_record import RunRecord

    p = s.parser()
    set_determinism(seed=s.seed)
    run = RunRecord(
        network_name=str(p.get_parsed_content("network_name")),
        img_size=int(p.get_parsed_content("img_size")),
        spatial_dims=2,
        num_classes=s.num_classes,
        class_names=tuple(str(i) for i in range(s.num_classes)),
        method="shpeft",
        lora={},
        preprocessing={},
        data={},
        datalist_sha256="",
        datalist={},
    )
    kw: dict[str, Any] = {"pretrained": False} if not s.pretrained else {}
    if s.checkpoint:
        kw["checkpoint"] = s.checkpoint
    return sb.build_network(run, **kw).eval()


def global_state(model: nn.Module, mask: SparseMask) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(packed k values, head arrays) of an injected model, on the CPU."""
    from shpeft_monai import extract_delta

    delta = extract_delta(model)
    return mask.pack(delta.values).numpy(), {n: t.float().cpu().numpy() for n, t in delta.head.items()}


def load_global(
    model: nn.Module, mask: SparseMask, values: np.ndarray, head: Mapping[str, np.ndarray], cfg: SHPEFTConfig
) -> None:
    """Load packed values and the head into an injected model (on whatever device it lives)."""
    load_delta_values(model, mask.unpack(torch.from_numpy(np.asarray(values, dtype=np.float32))))
    params = head_parameters(model, cfg)
    with torch.no_grad():
        for n, t in head.items():
            params[n].copy_(torch.from_numpy(np.asarray(t)))


def private_update(
    values: np.ndarray,
    head: Mapping[str, np.ndarray],
    start_values: np.ndarray,
    start_head: Mapping[str, np.ndarray],
    dp: Any,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """The site's update, clipped and noised against the round's global values (k values and the
    head together, :func:`shpeft_monai.fl.privacy.privatize`) before it leaves the site."""
    from shpeft_monai.fl import codec
    from shpeft_monai.fl.privacy import privatize

    flat, stats = privatize(
        codec.flatten_update(values, head), codec.flatten_update(start_values, start_head), dp, rng
    )
    shapes = {n: tuple(np.shape(t)) for n, t in start_head.items()}
    new_values, new_head = codec.unflatten_update(flat, int(np.size(start_values)), shapes)
    return new_values, new_head, stats


class _Round(NamedTuple):
    workflow: Any
    model: nn.Module
    cfg: SHPEFTConfig
    optimizer: Any
    losses: list[float]


_ROUNDS: dict[tuple[str, str, Settings], _Round] = {}  # kept training workflows (simulation actors)
_KEEP_ROUNDS = 4


class SiteBundle:
    """One site's bundle, driven per message (``monai.fl.client.MonaiAlgo``'s pattern).

    Args:
        s: the merged settings (run config + node config).
        work_dir: the bundle's ``output_dir`` for this site.
    """

    def __init__(self, s: Settings, work_dir: str | Path) -> None:
        if not (s.dataset or s.dataset_dir):
            raise ValueError(
                "this site has no data: set its node config `dataset` (a datalist JSON, a folder per "
                "class or a CSV) or `dataset-dir`, e.g. flower-supernode --node-config 'dataset=\"site.json\"'"
            )
        self.s, self.work_dir = s, Path(work_dir).absolute()

    def workflow(self, mask: SparseMask | None = None, **extra: Any) -> Any:
        """The bundle's train ``ConfigWorkflow``, initialised; ``mask`` goes to the bundle's mask file."""
        from monai.bundle import ConfigWorkflow

        from shpeft_monai.io import MASK_FILE, save_mask

        self.work_dir.mkdir(parents=True, exist_ok=True)
        ov = {**self.s.overrides(), "output_dir": str(self.work_dir), **extra}
        ov["dataset_dir" if self.s.dataset_dir else "dataset"] = self.s.dataset_dir or self.s.dataset
        if mask is not None:
            ov["shpeft#head_warmup_steps"] = 0  # the head comes from the server every round
            save_mask(self.work_dir / MASK_FILE, mask, self.s.shpeft().to_dict(), mask.meta)
        wf = ConfigWorkflow(
            config_file=self.s.config_files(),
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=False,
            workflow_type="train",
            **ov,
        )
        wf.initialize()
        return wf

    def calibrate(self, head: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Scores of every eligible weight on this site's data, as the bundle selects: head warm-up
        from the server's initial head, the calibration pass, then the score the hybrid rule ranks
        by (:func:`shpeft_monai.agreement.site_scores`). Returns the scores, the example count, the
        base fingerprint, the eligible count and the warmed-up head."""
        from shpeft_monai.agreement import site_scores
        from shpeft_monai.calibration import calibrate
        from shpeft_monai.model import backbone_fingerprint, eligible_parameters
        from shpeft_monai.pipeline import warm_up_head_for_selection
        from shpeft_monai.scoring import task_agnostic_scores

        wf = self.workflow()
        p = wf.parser
        cfg = SHPEFTConfig.from_dict(p.get_parsed_content("shpeft"))
        device = p.get_parsed_content("device")
        model = p.get_parsed_content("network_def").to(device)
        hp = head_parameters(model, cfg)
        with torch.no_grad():
            for n, t in head.items():
                hp[n].copy_(torch.from_numpy(np.asarray(t)))
        fp = backbone_fingerprint(model, cfg)
        loader = p.get_parsed_content("train#calib_loader")
        warm_up_head_for_selection(model, cfg, loader, device=device, progress=False)
        params = eligible_parameters(model, cfg)
        ts = calibrate(model, loader, params, cfg, device=device, progress=False)
        n_eligible = sum(t.numel() for t in params.values())
        return {
            "scores": site_scores(cfg, ts, task_agnostic_scores(params, cfg.agnostic_estimator)),
            "num_examples": len(loader.dataset),
            "fingerprint": fp,
            "n_eligible": n_eligible,
            "head": {n: t.detach().float().cpu().numpy() for n, t in hp.items()},  # warmed up
        }

    def _round_workflow(self, mask: SparseMask) -> _Round:
        """The site's initialised training workflow for ``mask``, kept for the next round in this
        process (MonaiAlgo keeps its workflow between rounds; in deployment every message is a new
        process and builds it again): the same result either way, see :meth:`train`."""
        from ignite.engine import Events

        key = (str(self.work_dir), mask.fingerprint, self.s)
        hit = _ROUNDS.pop(key, None)
        if hit is None:
            batch = self.s.local_batch_size or f"$max(1, round(@batch_size / {self.s.min_nodes}))"
            wf = self.workflow(mask, **{"train#dataloader#batch_size": batch})
            p = wf.parser
            hit = _Round(
                wf,
                p.get_parsed_content("peft_network"),
                SHPEFTConfig.from_dict(p.get_parsed_content("shpeft")),
                p.get_parsed_content("optimizer"),
                [],
            )
            losses = hit.losses
            wf.trainer.add_event_handler(
                Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item())
            )
        _ROUNDS[key] = hit
        while len(_ROUNDS) > _KEEP_ROUNDS:
            _ROUNDS.pop(next(iter(_ROUNDS)))
        return hit

    def train(
        self, mask: SparseMask, values: np.ndarray, head: Mapping[str, np.ndarray], server_round: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray], int, float]:
        """One round: the bundle's trainer from the global values; returns (values, head, n, loss).

        Everything a round depends on is set here, so a kept workflow and a new one train alike:
        the server's values and head, an empty optimizer state, and the round's seed for the
        global generators, the loader's shuffle and the augmentation."""
        from monai.data.utils import set_rnd
        from monai.utils import set_determinism

        r = self._round_workflow(mask)
        load_global(r.model, mask, values, head, r.cfg)
        r.optimizer.state.clear()
        rnd = max(int(server_round), 1)
        if self.s.keep_optimizer_state:
            self._load_optimizer_state(r.optimizer, mask, rnd - 1)
        seed = self.s.seed + ROUND_SEED * int(server_round)  # this round's shuffle and augmentation
        set_determinism(seed=seed)
        trainer = r.workflow.trainer
        loader = trainer.data_loader
        if getattr(loader, "generator", None) is not None:
            loader.generator.manual_seed(seed)
        set_rnd(loader.dataset, seed)
        r.losses.clear()
        # round r continues one schedule over all rounds: resume at epoch (r - 1) * local epochs
        epochs, steps = self.s.local_epochs, len(loader)
        st = trainer.state
        st.epoch, st.iteration = (rnd - 1) * epochs, (rnd - 1) * epochs * steps
        st.max_epochs, st.epoch_length = rnd * epochs, steps
        trainer.run()
        loss = float(np.mean(r.losses)) if r.losses else float("nan")
        if not math.isfinite(loss):
            raise FloatingPointError(f"local training diverged (mean loss {loss}); lower the bundle's `lr`")
        new_values, new_head = global_state(r.model, mask)
        if self.s.keep_optimizer_state:
            self._save_optimizer_state(r.optimizer, mask, rnd)
        return new_values, new_head, len(loader.dataset), loss

    def _optimizer_file(self, mask: SparseMask, server_round: int) -> Path:
        return self.work_dir / "optimizer" / f"{mask.fingerprint[:16]}_round{server_round}.pt"

    def _load_optimizer_state(self, optimizer: Any, mask: SparseMask, server_round: int) -> None:
        """AdamW moments of the k values and the head after this site's round ``server_round`` (a
        few KB), so local steps continue them instead of restarting from zero moments; per round,
        so a retried round loads what its first attempt loaded."""
        path = self._optimizer_file(mask, server_round)
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(
                {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
            )

    def _save_optimizer_state(self, optimizer: Any, mask: SparseMask, server_round: int) -> None:
        from shpeft_monai.io import atomic_write_bytes

        path = self._optimizer_file(mask, server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(optimizer.state_dict()["state"], buf)
        atomic_write_bytes(path, buf.getvalue())
        for old in path.parent.glob(f"{mask.fingerprint[:16]}_round*.pt"):  # keep this round and the last
            if int(old.stem.rsplit("round", 1)[1]) < server_round - 1:
                old.unlink(missing_ok=True)

    def train_alone(self, epochs: int) -> nn.Module:
        """The plain bundle run on this site's data (the simulation's references): the site selects
        its own mask as centralised training does, then trains ``epochs``; returns the model."""
        from shpeft_monai.io import MASK_FILE

        (self.work_dir / MASK_FILE).unlink(missing_ok=True)
        wf = self.workflow(max_epochs=int(epochs), fl_rounds=1)
        wf.trainer.run()
        return wf.parser.get_parsed_content("peft_network")

    def evaluate(
        self, mask: SparseMask, values: np.ndarray, head: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """The bundle's evaluator (``validate#evaluator``) on this site's validation split."""
        wf = self.workflow(mask, **{"train#dataset#cache_rate": 0.0})
        p = wf.parser
        model = p.get_parsed_content("peft_network")
        load_global(model, mask, values, head, SHPEFTConfig.from_dict(p.get_parsed_content("shpeft")))
        evaluator = p.get_parsed_content("validate#evaluator")
        evaluator.run()
        m = evaluator.state.metrics
        out = {
            k[len("val_") :]: float(v) for k, v in m.items() if k.startswith("val_") and k != "val_selection"
        }
        out = {k: v for k, v in out.items() if math.isfinite(v)}
        out["num-examples"] = len(evaluator.data_loader.dataset)
        return out


@torch.no_grad()
def evaluate_records(model: nn.Module, records: list[dict[str, Any]], s: Settings) -> dict[str, float]:
    """Server-side score of a model on labelled records with the bundle's validation transforms and
    metrics (accuracy, balanced accuracy, AUC, loss) and macro F1: the server holds no bundle run."""
    from monai.data import DataLoader, Dataset

    from shpeft_monai.data import image_transforms
    from shpeft_monai.handlers import validation_metrics
    from shpeft_monai.run_record import _preprocessing

    p = s.parser()
    stats = _preprocessing(str(p.get_parsed_content("network_name")))
    tf = image_transforms(int(p.get_parsed_content("img_size")), False, stats["mean"], stats["std"])
    loader = DataLoader(
        Dataset([dict(r) for r in records], tf), batch_size=int(p.get_parsed_content("batch_size"))
    )
    device = next(model.parameters()).device
    model.eval()
    probs, labels = [], []
    for batch in loader:
        probs.append(torch.softmax(model(batch["image"].to(device)).float(), 1).cpu())
        labels.append(torch.as_tensor(batch["label"]).reshape(-1).long())
    y, pr = torch.cat(labels).numpy(), torch.cat(probs).numpy()
    from sklearn.metrics import f1_score

    out = {k[len("val_") :]: v for k, v in validation_metrics(y, pr, pr.shape[1]).items()}
    out["f1"] = float(f1_score(y, pr.argmax(1), average="macro"))
    return {**{k: v for k, v in out.items() if math.isfinite(v)}, "num-examples": len(y)}
