"""Command line for what bundles and Flower do not cover: weights, the demo, inspecting and merging deltas.

shpeft convert-weights             # packaged weights -> timm checkpoints in the cache folder
shpeft demo [--out runs/demo]      # train SH-PEFT on Br35H (CPU-demo overlay), evaluate on test
shpeft inspect FILE                # what a delta or mask file holds, or why it is refused
shpeft merge DELTA --out FILE      # base weights + delta -> one plain safetensors checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

__all__ = ["main"]

BUNDLE = Path(__file__).resolve().parent / "bundles" / "br35h_shpeft" / "configs"


def _convert(_: argparse.Namespace) -> int:
    from .networks import convert_all

    for name, path in convert_all().items():
        print(f"{name}: {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from monai.bundle import run

    from .io import METRICS_FILE, write_json

    out = Path(args.out).resolve()
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    configs = [str(BUNDLE / "train.yaml"), str(BUNDLE / "overlays" / "cpu_demo.yaml")]
    overrides = {"output_dir": str(out)}
    t0 = time.perf_counter()
    run("training", config_file=configs, logging_file=str(BUNDLE / "logging.conf"), **overrides)
    t_train = time.perf_counter() - t0
    run(
        "evaluating",
        config_file=[*configs, str(BUNDLE / "evaluate.yaml")],
        logging_file=str(BUNDLE / "logging.conf"),
        **overrides,
    )
    metrics = json.loads((out / "eval" / METRICS_FILE).read_text())
    summary = {
        "split": "test",
        "n": metrics["n"],
        "accuracy": metrics["accuracy"],
        "f1_macro": metrics["f1_macro"],
        "roc_auc": metrics["roc_auc"],
        "selected_backbone_weights": metrics.get("selected_backbone_weights"),
        "head_parameters": metrics.get("head_parameters"),
        "delta_bytes": metrics.get("artefact_bytes"),
        "best_epoch": metrics.get("best_epoch"),
        "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "report": str(out / "eval" / "report.md"),
    }
    write_json(out / METRICS_FILE, summary, indent=2)
    print("\nSH-PEFT demo (DINOv2 ViT-S/14, Br35H test split)")
    for key, value in summary.items():
        print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    print(f"  figures and plots in {out}")
    return 0


def _configs(_: argparse.Namespace) -> int:
    print(BUNDLE)  # inside the installed package: works from `pip install .` as from the checkout
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .io import FORMAT, MASK_FORMAT, MaskFile, dumps_json, load_artefact
    from .model import mask_summary

    artefact = load_artefact(args.file)
    if isinstance(artefact, MaskFile):
        mask = artefact.mask
        head = {
            "kind": "mask",
            "format": MASK_FORMAT,
            "selected_backbone_weights": mask.k,
            "tensors": len(mask.indices),
            "mask_fingerprint": mask.fingerprint,
            "base_fingerprint": mask.base_fingerprint,
        }
    else:
        mask = artefact.mask
        head = {"kind": "delta", "format": FORMAT, **artefact.summary()}
    summary = mask_summary(mask)
    report = {
        **head,
        "file_bytes": Path(args.file).stat().st_size,
        "by_block": summary["by_block"],
        "by_type": summary["by_type"],
        "config": artefact.config,
        "meta": artefact.meta,
    }
    print(dumps_json(report, indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from safetensors.torch import save

    from .io import atomic_write_bytes, load_delta
    from .model import apply_delta
    from .networks import create_network

    delta = load_delta(args.delta)
    name = args.network or delta.meta.get("network_name")
    if not name:
        raise SystemExit("the delta does not name its network; pass --network NAME")
    num_classes = int(args.num_classes or delta.meta.get("num_classes") or 2)
    img_size = args.img_size or delta.meta.get("img_size")
    kwargs = {"img_size": int(img_size)} if img_size and "vit" in name else {}
    model = apply_delta(create_network(name, num_classes, **kwargs), delta)
    atomic_write_bytes(args.out, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    print(f"merged {delta.mask.k} selected weights and the head into {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shpeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("convert-weights", help="convert the packaged pretrained weights").set_defaults(
        fn=_convert
    )
    demo = sub.add_parser("demo", help="train + evaluate SH-PEFT on Br35H (CPU demo settings)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument(
        "--resume", action="store_true", help="continue a stopped demo instead of starting afresh"
    )
    demo.set_defaults(fn=_demo)
    sub.add_parser(
        "configs", help="print the folder of the bundle's configs (train.yaml, evaluate.yaml, overlays/)"
    ).set_defaults(fn=_configs)
    ins = sub.add_parser("inspect", help="summarise a delta or mask file (or say why it is refused)")
    ins.add_argument("file")
    ins.set_defaults(fn=_inspect)
    merge = sub.add_parser("merge", help="write base + delta as one plain checkpoint")
    merge.add_argument("delta")
    merge.add_argument("--out", required=True)
    merge.add_argument("--network")
    merge.add_argument("--num-classes", type=int)
    merge.add_argument("--img-size", type=int)
    merge.set_defaults(fn=_merge)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (OSError, ValueError) as exc:  # DeltaFileError, DeltaMismatchError: a message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
