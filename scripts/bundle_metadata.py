"""Write a run's measured test metrics into the bundle's metadata.json (``eval_metrics``), so that the
bundle never claims numbers nobody measured.

    python scripts/bundle_metadata.py runs/demo            # after `make demo`
    python scripts/bundle_metadata.py runs/demo --check    # exit 1 if metadata.json disagrees with the run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shpeft_monai.cli import BUNDLE
from shpeft_monai.io import METRICS_FILE, RUN_FILE

KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")


def measured(run_dir: Path) -> dict[str, float]:
    """The test metrics of a run's evaluation, rounded to 4 digits."""
    metrics = json.loads((run_dir / "eval" / METRICS_FILE).read_text())
    return {k: round(float(metrics[k]), 4) for k in KEYS if metrics.get(k) is not None}


def update(run_dir: Path, meta_file: Path) -> dict:
    meta = json.loads(meta_file.read_text())
    run = json.loads((run_dir / RUN_FILE).read_text())
    meta["eval_metrics"] = measured(run_dir)
    meta["eval_metrics_source"] = (
        f"test split ({run['data']['sizes'].get('test')} images) of a run at the cpu_demo configuration (what `make demo` runs), {run['method']} on "
        f"{run['network_name']} at {run['img_size']} px"
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--metadata", type=Path, default=BUNDLE / "metadata.json")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    new = update(args.run_dir, args.metadata)
    if args.check:
        same = json.loads(args.metadata.read_text()).get("eval_metrics") == new["eval_metrics"]
        print("metadata.json matches the run" if same else "metadata.json differs from the run")
        return 0 if same else 1
    args.metadata.write_text(json.dumps(new, indent=4) + "\n")
    print(f"wrote eval_metrics {new['eval_metrics']} to {args.metadata}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
