"""Benchmark: detect + score + partition for the 5 pairs of ../shared/data on the default model.

    python bench/build_default.py [--output DIR]

Target (issue: step 1): within 15 minutes on the 2-core CPU. Runs `python -m landermt.build` in a
fresh process (so peak memory is the build's alone, model load included), then writes
bench/results/build_default.json and the matching section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import update_section  # bench/report.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="artifact directory (default: a temporary one)")
    args = parser.parse_args()
    output = Path(args.output or tempfile.mkdtemp(prefix="landermt-bench-"))

    from landermt.models import default_model_dir

    default_model_dir()  # conversion is a one-off; keep it out of the measurement
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "landermt.build", "--output", str(output)], check=True, cwd=ROOT)
    wall = time.monotonic() - start
    created = json.loads((output / "manifest.json").read_text())["created"]
    manifest = json.loads((output / "manifest.json").read_text())
    result = {
        "benchmark": "detect + score + partition, default model, 10 directions, 6 languages",
        "wall_seconds": round(wall, 1),
        "stage_seconds": created.get("stage_seconds"),
        "peak_rss_mib": created["peak_rss_mib"],
        "target_seconds": TARGET_SECONDS,
        "meets_target": wall <= TARGET_SECONDS,
        "layers": manifest["layers"],
        "settings": manifest["scoring"],
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "dtype": created["dtype"],
                    "torch": created["torch"], "transformers": created["transformers"]},
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "build_default.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)
    print(json.dumps(result, indent=2))


def write_markdown(r: dict) -> None:
    section = "\n".join([
        "## Detect + score + partition (default model)",
        "",
        "`python bench/build_default.py` (results: `bench/results/build_default.json`). Model conversion is",
        "excluded (a one-off, about 40 s); model loading and hashing are included.",
        "",
        "| what | value |",
        "|---|---|",
        f"| machine | {r['machine']['cpu_count']}-core {r['machine']['machine']} CPU, {r['machine']['dtype']}, "
        f"torch {r['machine']['torch']}, transformers {r['machine']['transformers']} |",
        f"| work | 10 directions × {r['settings']['detect_samples_per_direction']} detection examples; "
        f"6 languages × {r['settings']['samples_per_language']} scoring sentences (max {r['settings']['max_length']} "
        "tokens) |",
        f"| detection | {r['stage_seconds']['detect']} s |" if r["stage_seconds"] else "| detection | n/a |",
        f"| scoring | {r['stage_seconds']['score']} s |" if r["stage_seconds"] else "| scoring | n/a |",
        f"| total wall time | {r['wall_seconds']} s (target ≤ {r['target_seconds']} s: "
        f"{'met' if r['meets_target'] else 'NOT met'}) |",
        f"| peak memory (RSS) | {r['peak_rss_mib']} MiB |",
        f"| selected layers | {r['layers']} |",
        "",
    ])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Detect + score + partition", section, "Benchmarks")


if __name__ == "__main__":
    main()
