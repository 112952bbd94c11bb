"""Accuracy benchmark: SH-PEFT against full fine-tuning and PEFT peers, with the ablations.

METHOD.md section 4 ("Comparing honestly") as a program (docs/benchmarks.md):

* one grouped split (Br35H's committed split, or ``--dataset`` the user's data split by
  ``shpeft_monai.data.open_dataset`` so that identical files never cross splits); the same training
  subset, resolution, augmentation (random left-right flip), epochs, recipe and seeds for every method;
* every method is prepared by the library call the bundle uses (``methods.prepare_method``) and trained
  by a plain PyTorch loop over ``recipe.param_groups`` with the recipe's schedule
  (``shpeft_monai.recipe.DEFAULTS``); SH-PEFT trains at the recipe's learning rates, the peers at rates
  chosen on validation;
* the checkpoint is chosen on the validation split only; the test split is evaluated once per run and
  its per-sample predictions are kept;
* statistics (:mod:`benchmarks.stats`): per seed, mean ± sd, a cluster-bootstrap 95 % interval over
  the test split's groups and paired differences SH-PEFT minus each peer.

Modules: :mod:`.config` (configurations, methods, ablation points, the recipe), :mod:`.plan` (which
runs), :mod:`.data` (split, groups, tensor cache), :mod:`.train` (one run), :mod:`.summary` (rows and
statistics), :mod:`.report` (markdown), :mod:`.plots`, :mod:`.driver` (resume, write) and :mod:`.cli`.
Run ``python -m benchmarks.suite`` (``--config cpu``); results go to
``benchmarks/results/suite_<name>.{json,md}`` and PNG plots beside them.
"""

from __future__ import annotations

from .cli import build_config, main
from .config import (
    ABLATIONS,
    CNN,
    CONFIGS,
    DEFAULT_METHODS,
    HISTORICAL,
    METHODS_CPU,
    VIT,
    SuiteConfig,
    config_dict,
    recipe_defaults,
    run_settings,
)
from .data import DataSource, open_source
from .driver import run_suite
from .plan import RunSpec, chosen_lr, plan_runs, val_key
from .report import render_markdown
from .summary import paired_rows, summarize

__all__ = [
    "ABLATIONS",
    "CNN",
    "CONFIGS",
    "DEFAULT_METHODS",
    "HISTORICAL",
    "METHODS_CPU",
    "VIT",
    "DataSource",
    "RunSpec",
    "SuiteConfig",
    "build_config",
    "chosen_lr",
    "config_dict",
    "main",
    "open_source",
    "paired_rows",
    "plan_runs",
    "recipe_defaults",
    "render_markdown",
    "run_settings",
    "run_suite",
    "summarize",
    "val_key",
]
