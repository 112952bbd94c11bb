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

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from shpeft_monai import SHPEFTConfig, SparseMask, load_delta_values
from shpeft_monai.model import head_parameters

__all__ = [
    "CONFIGS",
    "Settings",
    "SiteBundle",
    "base_network",
    "evaluate_records",
    "global_state",
    "load_global",
]

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "br35h_shpeft" / "configs"
ROUND_SEED = 1009  # round r of a site trains with seed + ROUND_SEED * r: a retried round repeats itself


@dataclass(frozen=True)
class Settings:
    """Run config (server and sites) and node config (one site) of a federated run.

    Only what a federation must agree on or a site must say; the method and its recipe are the
    bundle's. ``overlays`` names bundle overlays applied before the federated one (``cpu_demo``);
    ``bundle`` holds extra bundle overrides as ``key=value`` items (``img_size=112 batch_size=16``).
    """

    num_server_rounds: int = 3
    local_epochs: int = 1
    overlays: str = ""
    bundle: str = ""
    pretrained: bool = True
    num_classes: int = 2
    seed: int = 0
    candidate_factor: int = 4
    min_nodes: int = 2
    max_examples: int = 100_000
    round_timeout: float = 3600.0  # seconds the server waits for replies before going on without them
    aggregation: str = "mean"  # mean | median | trimmed_mean (shpeft_monai.fl.robust)
    trim_fraction: float = 0.2
    dp_epsilon: float = 0.0  # > 0: each site adds noise for this epsilon over all rounds
    dp_noise_multiplier: float = 0.0  # or the noise multiplier itself
    dp_clip: float = 0.0  # L2 bound of a site's change per round (needed with DP)
    dp_delta: float = 1e-5
    account_bytes: bool = False  # byte accounting and profiling (MeteredSparseFedAvg)
    server_datalist: str = ""
    out: str = "runs/fed-deploy"
    # node config (one site)
    dataset: str = ""  # a datalist JSON, a folder per class or a CSV (the bundle's `dataset`)
    dataset_dir: str = ""
    checkpoint: str = ""  # local pretrained weights file
    work_dir: str = ""  # the site's bundle output_dir (default runs/fed-site/<node>)
    device: str = ""  # default: the bundle's (CUDA when present)
    num_threads: int = 0

    @classmethod
    def from_config(cls, *configs: Mapping[str, Any] | None) -> Settings:
        """Merge Flower configs (later ones win); unknown keys are ignored, missing keys keep defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for cfg in configs:
            for key, value in dict(cfg or {}).items():
                name = "dataset" if key == "data-list" else str(key).replace("-", "_")
                if name not in fields:
                    continue
                default = fields[name].default
                if isinstance(default, bool):
                    value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                elif isinstance(default, (int, float)):
                    value = type(default)(value)
                else:
                    value = str(value)
                values[name] = value
        return cls(**values)

    def config_files(self) -> list[str]:
        names = [o.strip() for o in self.overlays.replace(",", " ").split() if o.strip()]
        files = [CONFIGS / "train.yaml", *(CONFIGS / "overlays" / f"{n}.yaml" for n in names)]
        files.append(CONFIGS / "overlays" / "federated.yaml")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"overlays={self.overlays!r}: no such bundle overlay {missing}")
        return [str(f) for f in files]

    def overrides(self) -> dict[str, Any]:
        """Bundle overrides: the ``bundle`` items, the seed, local epochs and the weights source."""
        out: dict[str, Any] = {}
        for item in self.bundle.split():
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"bundle={self.bundle!r}: item {item!r} is not key=value")
            out[key] = yaml.safe_load(value)
        out.update(seed=self.seed, max_epochs=self.local_epochs)
        if not self.pretrained or self.checkpoint:  # same seeded weights at every node
            kw = "pretrained=False" if not self.pretrained else f"checkpoint={self.checkpoint!r}"
            out["network_def"] = f"$monai.utils.set_determinism(seed=@seed) or sb.build_network(@run, {kw})"
        if self.device:
            out["device"] = f"$torch.device({self.device!r})"
        return out

    def parser(self) -> Any:
        """The bundle config of this run, parsed but not instantiated."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(self.config_files())
        parser.update(self.overrides())
        return parser

    def shpeft(self) -> SHPEFTConfig:
        return SHPEFTConfig.from_dict(self.parser().get_parsed_content("shpeft"))

    def privacy(self) -> Any:
        """The sites' :class:`shpeft_monai.fl.privacy.PrivacyConfig`, or None without DP.

        ``dp-noise-multiplier`` wins over ``dp-epsilon`` (which is turned into the smallest noise
        multiplier reaching it over ``num-server-rounds`` rounds at ``dp-delta``)."""
        if self.dp_noise_multiplier <= 0 and self.dp_epsilon <= 0:
            return None
        from shpeft_monai.fl import privacy

        if self.dp_clip <= 0:
            raise ValueError(
                f"dp-epsilon={self.dp_epsilon} / dp-noise-multiplier={self.dp_noise_multiplier} need "
                f"dp-clip > 0 (the L2 bound of a site's change per round), got {self.dp_clip}"
            )
        sigma = self.dp_noise_multiplier or privacy.noise_multiplier_for(
            self.dp_epsilon, self.num_server_rounds, self.dp_delta
        )
        return privacy.PrivacyConfig(clip=self.dp_clip, noise_multiplier=sigma, delta=self.dp_delta)

    def set_threads(self) -> None:
        n = self.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if n > 0:
            torch.set_num_threads(n)


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
        """Task-specific scores of every eligible weight on this site's data, as the bundle selects:
        head warm-up from the server's initial head, then the calibration pass."""
        from shpeft_monai.calibration import calibrate
        from shpeft_monai.model import backbone_fingerprint, eligible_parameters
        from shpeft_monai.pipeline import warm_up_head_for_selection

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
        scores = calibrate(model, loader, params, cfg, device=device, progress=False)
        n_eligible = sum(t.numel() for t in params.values())
        return {
            "scores": scores,
            "num_examples": len(loader.dataset),
            "fingerprint": fp,
            "n_eligible": n_eligible,
        }

    def train(
        self, mask: SparseMask, values: np.ndarray, head: Mapping[str, np.ndarray], server_round: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray], int, float]:
        """One round: the bundle's trainer from the global values; returns (values, head, n, loss)."""
        from ignite.engine import Events
        from monai.data.utils import set_rnd
        from monai.utils import set_determinism

        wf = self.workflow(mask)
        p = wf.parser
        model = p.get_parsed_content("peft_network")
        cfg = SHPEFTConfig.from_dict(p.get_parsed_content("shpeft"))
        trainer = wf.trainer
        load_global(model, mask, values, head, cfg)
        seed = self.s.seed + ROUND_SEED * int(server_round)  # this round's shuffle and augmentation
        set_determinism(seed=seed)
        loader = trainer.data_loader
        if getattr(loader, "generator", None) is not None:
            loader.generator.manual_seed(seed)
        set_rnd(loader.dataset, seed)
        losses: list[float] = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item())
        )
        trainer.run()
        loss = float(np.mean(losses)) if losses else float("nan")
        if not math.isfinite(loss):
            raise FloatingPointError(f"local training diverged (mean loss {loss}); lower the bundle's `lr`")
        new_values, new_head = global_state(model, mask)
        return new_values, new_head, len(loader.dataset), loss

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
