"""A select-once SH-PEFT handler for trainers built in code.

Bundles select before the optimizer is built (``shpeft_monai.methods.prepare_method`` in the config),
which is the preferred design. This handler is for code that already has a trainer and an optimizer:
on the first ``Events.STARTED`` it selects the mask, injects it and adds the k delta values to the
*same* optimizer object as a new parameter group (MONAI handlers keep references to it). Later
``run()`` calls (one per federated round with ``MonaiAlgo``) find the model injected and do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import SHPEFTConfig
from ..model import inject, is_injected, mask_summary
from ..pipeline import select_mask

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["SHPEFTSelection"]


class SHPEFTSelection:
    """Select and inject an SH-PEFT mask once, at the first start of the engine.

    Args:
        network: the model the engine trains (its head should already be in the optimizer).
        config: SH-PEFT configuration.
        loader: calibration data (needed when the hybrid mode uses task-specific importance).
        optimizer: optional optimizer that receives the delta values as a new parameter group.

    Example:
        >>> handler = SHPEFTSelection(net, SHPEFTConfig(), calib_loader, optimizer)  # doctest: +SKIP
        >>> handler.attach(trainer)  # doctest: +SKIP
    """

    def __init__(
        self,
        network: nn.Module,
        config: SHPEFTConfig | dict,
        loader: Iterable | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.network = network
        self.config = config if isinstance(config, SHPEFTConfig) else SHPEFTConfig.from_dict(dict(config))
        self.loader = loader
        self.optimizer = optimizer
        self.selections = 0

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self._select, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self._select)

    def _select(self, engine: Engine) -> None:
        if is_injected(self.network):
            return
        device = next(self.network.parameters()).device
        mask = select_mask(self.network, self.config, self.loader, device=device)
        inject(self.network, mask, self.config)
        self.selections += 1
        if self.optimizer is not None:
            deltas = [p for n, p in self.network.named_parameters() if n.endswith("shpeft_delta")]
            self.optimizer.add_param_group({"params": deltas})
        summary = mask_summary(mask)
        engine.state.shpeft_mask = mask
        engine.logger.info("SH-PEFT: selected %d weights; per block %s", mask.k, summary["by_block"])
