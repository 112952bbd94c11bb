"""The run record: what a training run was, so that evaluation and inference never have to be told again.

Training resolves its settings once, before any network is built: the data (classes come from the data,
an explicit value that disagrees is refused), the network, image size, preprocessing, spatial dims and
method. It writes them to ``<output_dir>/run.json`` and the exact datalist it used to
``<output_dir>/datalist.json`` (covered by a SHA-256 in ``run.json``). ``evaluating`` and ``inference``
read both back from ``output_dir`` alone; any value given explicitly that conflicts with the run is
refused, naming both values. Scoring other data happens only when asked for (``eval_data``), and the
record then says which data was scored.

Example:
    >>> run = resolve_run("train", "runs/x", {"dataset": "br35h", "network_name": "vit_small_patch14_dinov2",
    ...                   "img_size": 112, "spatial_dims": 2, "method": "shpeft"})  # doctest: +SKIP
    >>> run.class_names, run.num_classes  # doctest: +SKIP
    (('no_tumour', 'tumour'), 2)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data as _data
from .errors import RunConfigError
from .io import DATALIST_FILE, RUN_FILE, write_json

__all__ = ["RUN_FORMAT", "RunRecord", "datalist_sha256", "environment", "resolve_run"]

logger = logging.getLogger(__name__)

RUN_FORMAT = "shpeft-run/1"
WORKFLOWS = ("train", "evaluate", "infer")
# settings a trained artefact depends on: never silently different at evaluation or inference
_MODEL_KEYS = ("network_name", "img_size", "spatial_dims", "num_classes", "class_names", "method", "lora")


def datalist_sha256(datalist: Mapping[str, Any]) -> str:
    """SHA-256 of a split datalist's content: every split's (image path, label) pairs, in order."""
    canonical = {
        split: [[str(r["image"]), r.get("label")] for r in records] for split, records in datalist.items()
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def environment() -> dict[str, Any]:
    """Where this process computes: library versions, CPU model, the vector instruction set torch's
    kernels use, intra-op threads, and the GPU when one is present.

    Floating-point results depend on these (kernels differ by instruction set and thread count), so
    the same seed on two machines can train to different weights; a trained artefact records them.
    """
    import monai
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:  # not Linux
        pass
    env = {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "timm": timm.__version__,
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


@dataclass(frozen=True)
class RunRecord:
    """Everything a trained artefact needs to be rebuilt, evaluated or used, and the data behind it."""

    network_name: str
    img_size: int
    spatial_dims: int
    num_classes: int
    class_names: tuple[str, ...]
    method: str
    lora: dict[str, Any]
    preprocessing: dict[str, list[float]]
    data: dict[str, Any]  # identity of the training data: source, kind, sha256, grouping, sizes
    datalist_sha256: str
    datalist: dict[str, list[dict[str, Any]]] = field(repr=False, compare=False)
    scored: dict[str, Any] | None = None  # evaluate only: which data this run scores

    @property
    def data_name(self) -> str:
        """Short name of the training data for titles: ``br35h`` or the folder/file name."""
        source = str(self.data.get("source", "data"))
        return "Br35H" if source.lower() == "br35h" else Path(source).name

    def describe(self) -> dict[str, Any]:
        """The JSON description saved in ``run.json`` and in every trained artefact's meta."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("datalist", "scored")}
        out["class_names"] = list(self.class_names)
        return {"format": RUN_FORMAT, **out}

    @classmethod
    def from_description(cls, desc: Mapping[str, Any], datalist: dict[str, list]) -> RunRecord:
        kwargs = {f.name: desc[f.name] for f in dataclasses.fields(cls) if f.name in desc}
        kwargs["class_names"] = tuple(kwargs["class_names"])
        return cls(**{**kwargs, "datalist": datalist})


def _preprocessing(network_name: str) -> dict[str, list[float]]:
    from .networks import preprocessing

    try:
        stats = preprocessing(network_name)
    except (KeyError, ValueError):
        stats = {"mean": _data.IMAGENET_MEAN, "std": _data.IMAGENET_STD}
    return {k: [float(x) for x in v] for k, v in stats.items()}


def _source(request: Mapping[str, Any]) -> str | None:
    given = request.get("dataset_dir") or request.get("dataset")
    if given is None:
        return None
    return "br35h" if str(given).lower() == "br35h" else str(Path(str(given)).expanduser().absolute())


def _subsets(ds: Any, request: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    sizes = {
        "train": request.get("train_subset"),
        "validation": request.get("val_subset"),
        "test": request.get("test_subset"),
    }
    seed = int(request.get("seed") or 0)
    out = {}
    for name, records in ds.splits.items():
        n = int(sizes.get(name) or 0)
        try:
            chosen = _data.subsample(records, n, seed=seed) if n else [dict(r) for r in records]
        except ValueError as e:  # fewer than one per class
            option = {"train": "train_subset", "validation": "val_subset", "test": "test_subset"}[name]
            raise RunConfigError(f"{option}={n}: {e}") from None
        out[name] = [{**r, "path": str(r["image"])} for r in chosen]
    return out


def _train_record(request: Mapping[str, Any]) -> RunRecord:
    source = _source(request)
    if source is None:
        raise RunConfigError("no training data: set `dataset` (br35h, a folder, a CSV or a datalist JSON).")
    names = request.get("class_names")
    ds = _data.open_dataset(
        source,
        seed=int(request.get("split_seed") or 0),
        grouping=str(request.get("grouping") or "content"),
        class_names=list(names) if names else None,
        num_classes=request.get("num_classes"),
    )
    datalist = _subsets(ds, request)
    _data.check_splits(datalist, ds.class_names)
    _every_class_trains(datalist["train"], ds.class_names, source)
    network_name = str(request["network_name"])
    return RunRecord(
        network_name=network_name,
        img_size=int(request["img_size"]),
        spatial_dims=int(request.get("spatial_dims") or 2),
        num_classes=int(ds.num_classes),
        class_names=tuple(ds.class_names),
        method=str(request.get("method") or "shpeft"),
        lora=dict(request.get("lora") or {}),
        preprocessing=_preprocessing(network_name),
        data=ds.identity(),
        datalist_sha256=datalist_sha256(datalist),
        datalist=datalist,
    )


def _every_class_trains(records: list[dict[str, Any]], class_names: tuple[str, ...], source: str) -> None:
    """A class without a training image is a label typo or a wrong class list, never a silent head."""
    counts = {i: 0 for i in range(len(class_names))}
    for r in records:
        counts[int(r["label"])] = counts.get(int(r["label"]), 0) + 1
    empty = [f"{class_names[i]!r} (label {i})" for i, n in counts.items() if n == 0]
    if empty:
        used = ", ".join(f"label {i}: {n}" for i, n in sorted(counts.items()) if n)
        raise RunConfigError(
            f"{source}: class {', '.join(empty)} has no training image (training labels used: {used}). "
            "Fix the labels in the data, or name only the classes it has."
        )


def _conflicts(recorded: Mapping[str, Any], request: Mapping[str, Any]) -> list[str]:
    """Explicit request values that differ from the recorded run, as 'key: run has A, you gave B'."""
    out = []
    for key in _MODEL_KEYS:
        given = request.get(key)
        if given is None:
            continue
        have = recorded.get(key)
        if key == "class_names":
            given, have = list(given), list(have or [])
        elif key == "lora":
            given, have = dict(given), dict(have or {})
            if recorded.get("method") != "lora":
                continue  # LoRA options do not matter for another method
        if given != have:
            out.append(f"  {key}: the run has {have!r}, this command gives {given!r}")
    source = _source(request)
    trained = recorded.get("data", {}).get("source")
    if source is not None and source != trained:
        out.append(
            f"  dataset: the run was trained on {trained!r}, this command gives {source!r} "
            "(to score other data on purpose, pass --eval_data <folder | CSV | datalist JSON> instead)"
        )
    return out


def _read_run(output_dir: Path) -> tuple[dict[str, Any], dict[str, list]]:
    run_file, list_file = output_dir / RUN_FILE, output_dir / DATALIST_FILE
    if not run_file.is_file():
        raise RunConfigError(
            f"{run_file} not found: {output_dir} holds no trained run. Train first with the same "
            "--output_dir (python -m monai.bundle run training ... --output_dir <dir>)."
        )
    try:
        desc = json.loads(run_file.read_text())
        datalist = json.loads(list_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunConfigError(f"{output_dir}: cannot read {RUN_FILE} / {DATALIST_FILE} ({exc}).") from exc
    if desc.get("format") != RUN_FORMAT:
        raise RunConfigError(f"{run_file}: format {desc.get('format')!r} is not {RUN_FORMAT!r}.")
    if datalist_sha256(datalist) != desc.get("datalist_sha256"):
        raise RunConfigError(
            f"{list_file} does not match the SHA-256 recorded in {run_file}: the datalist was edited after "
            "training. Restore it or train again."
        )
    return desc, datalist


def _other_data(source: str, class_names: tuple[str, ...], split: str) -> tuple[list[dict], dict]:
    """Labelled records of data the user asked to score, labels mapped onto the trained classes."""
    ds = _data.open_dataset(source, grouping="none")
    unknown = [c for c in ds.class_names if c not in class_names]
    if unknown:
        raise RunConfigError(
            f"eval_data {source!r} has classes {list(ds.class_names)}; {unknown} are not among the trained "
            f"classes {list(class_names)}. Rename its class folders/labels to the trained names."
        )
    to_trained = {i: class_names.index(c) for i, c in enumerate(ds.class_names)}
    split_given = ds.grouping == "committed"
    pools = [ds.splits[split]] if split_given else list(ds.splits.values())
    records = [
        {**r, "label": to_trained[int(r["label"])], "path": str(r["image"])} for pool in pools for r in pool
    ]
    return records, {**ds.identity(), "split": split if split_given else "all"}


def resolve_run(workflow: str, output_dir: str | Path, request: Mapping[str, Any]) -> RunRecord:
    """The run's settings, resolved and checked before any network is built.

    Args:
        workflow: ``train`` (resolve from the data and the request, then write ``run.json`` and
            ``datalist.json``), ``evaluate`` or ``infer`` (read them back; request values that are not
            None must agree with the run).
        output_dir: the run's folder.
        request: the bundle's keys: ``dataset``/``dataset_dir``, ``class_names``, ``num_classes``,
            ``network_name``, ``img_size``, ``spatial_dims``, ``method``, ``lora``, ``grouping``,
            ``split_seed``, ``seed``, ``train_subset``/``val_subset``/``test_subset``, ``resume``,
            and for evaluation ``eval_data`` and ``eval_split``.

    Raises:
        RunConfigError: a conflicting value (both named), no trained run, an edited datalist.
        DataError: the data itself is unusable (from :func:`shpeft_monai.data.open_dataset`).
    """
    if workflow not in WORKFLOWS:
        raise ValueError(f"workflow={workflow!r} is not one of {WORKFLOWS}")
    out = Path(output_dir)
    if workflow == "train":
        run = _train_record(request)
        if (out / RUN_FILE).is_file():
            previous, _ = _read_run(out)
            desc = run.describe()
            changed = [
                f"  {k}: the saved run has {previous.get(k)!r}, this command gives {desc[k]!r}"
                for k in (*_MODEL_KEYS, "datalist_sha256")
                if previous.get(k) != desc[k]
            ]
            if changed:
                raise RunConfigError(
                    f"output_dir {out} already holds another run:\n"
                    + "\n".join(changed)
                    + "\nTrain into a new --output_dir (or delete this one)."
                )
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / DATALIST_FILE, run.datalist)
        write_json(out / RUN_FILE, run.describe())
        logger.info(
            "run: %s, %d classes %s, data %s (%s)",
            run.network_name,
            run.num_classes,
            list(run.class_names),
            run.data.get("source"),
            {k: len(v) for k, v in run.datalist.items()},
        )
        return run
    desc, datalist = _read_run(out)
    problems = _conflicts(desc, request)
    if problems:
        raise RunConfigError(
            f"these settings conflict with the run in {out}:\n"
            + "\n".join(problems)
            + "\nDrop them: evaluating and inference read every setting from --output_dir."
        )
    run = RunRecord.from_description(desc, datalist)
    eval_data = request.get("eval_data") if workflow == "evaluate" else None
    split = str(request.get("eval_split") or "test")
    if eval_data:
        records, identity = _other_data(str(eval_data), run.class_names, split)
        return dataclasses.replace(run, datalist={split: records}, scored=identity)
    if workflow == "evaluate" and split not in datalist:
        raise RunConfigError(f"eval_split={split!r}: the run's datalist has splits {sorted(datalist)}.")
    scored = {**run.data, "split": split} if workflow == "evaluate" else None
    return dataclasses.replace(run, scored=scored)
