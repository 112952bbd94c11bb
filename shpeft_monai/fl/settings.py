"""Settings of a federated SH-PEFT run: the Flower run config (server and sites) and a site's node
config, merged. Only what a federation must agree on or a site must say lives here; the method,
its recipe and the device are the bundle's (``configs/train.yaml`` + overlays +
``overlays/federated.yaml``), read through :meth:`Settings.parser`. Keys are kebab-case in Flower
configs (``local-epochs``) and snake_case here; ``federated/pyproject.toml`` lists them all with the
same defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from shpeft_monai import SHPEFTConfig

__all__ = ["CONFIGS", "Settings"]

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "br35h_shpeft" / "configs"


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
    server_lr: float = 1.0  # global values move by server_lr x the round's combined change (1 = FedAvg)
    keep_optimizer_state: bool = True  # sites continue their AdamW moments across rounds (a few KB on disk)
    # a site's training batch in rounds. n sites at batch b average like one centralised step at
    # batch n*b, so 0 (default) takes the bundle's batch_size / min-nodes (rounded, at least 1): the
    # rounds make as many steps as centralised training on the pooled data. > 0: this batch.
    local_batch_size: int = 0
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
        out.update(seed=self.seed, max_epochs=self.local_epochs, fl_rounds=self.num_server_rounds)
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
