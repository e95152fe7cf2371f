"""Serving benchmark: a load generator against the real HTTP server, plus the forward-pass checks.

    python bench/serving.py [--artifact DIR] [--sentences 64]

1. Load: concurrent clients (1, 8, 32) POST /translate, one FLORES devtest sentence each, cycling
   through the artifact's 10 directions (mixed pairs), against (a) the server with routing and
   (b) the same server on the unpatched base model ("routing off"); and (c) naive baselines, one
   sentence at a time through transformers `generate`, routed (each row its pair, compared with (a))
   and unpatched (compared with (b)). Reported: sentences/s, generated tokens/s, p50/p95 latency.
2. Forward checks at batch 16, fixed 32 new tokens (EOS suppressed, so every variant does the same
   work): unpatched vs routed single-pair vs routed mixed-pair generation, measured in turn, best of 5 rounds.
3. Memory: peak RSS of this process, and one base + the artifact vs one model copy per pair.
4. Time to first token at concurrency 1 (the server's histogram), with each pair's prompt prefix reused
   (`--prefix-reuse`, the default) and without: with the artifact (its prompt shares only the template's opening
   words) and in base-model mode (no artifact: every prompt of a pair starts with the same few-shot examples).

Targets (issue 4): routing ≤ 5 % throughput cost; mixed-pair batch within 3 % of single-pair;
≥ 5× the naive baseline at concurrency 32; serving tokens/s ≥ 80 % of the bare batched forward;
(issue 15) time to first token with prefix reuse ≤ 60 % of without.
Writes bench/results/serving.json and the "Serving" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn
from report import update_section  # bench/report.py, beside this script

from landermt.artifact import load_artifact
from landermt.families import family_of
from landermt.generate import greedy, stop_token_ids
from landermt.models import load_model
from landermt.prompts import render_prompt
from landermt.routing import route, unpatch
from server.app import create_app
from server.engine import Engine
from server.jobs import JobStore
from server.metrics import Metrics
from server.settings import Settings
from server.torch_backend import TorchBackend
from training.data import flores
from training.finetune import peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 32)
BATCH, FIXED_NEW_TOKENS, FORWARD_ROUNDS = 16, 32, 5


def workload(directions: list[str], n: int) -> list[tuple[str, str, str]]:
    """n (source, target, text) items cycling through the directions, FLORES devtest sentences."""
    per = {d: flores(None, "devtest", *d.split("-")) for d in directions}
    cycle = itertools.cycle(directions)
    return [(*d.split("-"), per[d][i // len(directions)][0]) for i, d in zip(range(n), cycle, strict=False)]


def metric_sum(base: str, prefix: str) -> float:
    """The sum of every sample of the server's metrics whose line starts with `prefix`."""
    text = httpx.get(f"{base}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def generated_tokens(base: str) -> float:
    return metric_sum(base, "landermt_generated_tokens_total{")


def histogram_totals(base: str, name: str) -> tuple[float, float]:
    """(sum, count) so far of one of the server's histograms."""
    return metric_sum(base, f"{name}_sum"), metric_sum(base, f"{name}_count")


HISTOGRAMS = ("landermt_time_to_first_token_seconds", "landermt_batch_size", "landermt_batch_seconds")


class ServerThread:
    """The real app under uvicorn on a loopback port, in this process (so RSS covers it)."""

    def __init__(self, engine: Engine, jobs_db: Path):
        self.config = uvicorn.Config(create_app(engine, JobStore(jobs_db)), host="127.0.0.1",
                                     port=engine.settings.port, log_level="warning")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.config.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def load(base: str, items: list[tuple[str, str, str]], concurrency: int) -> dict:
    latencies: list[float] = []
    queue = list(reversed(items))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            source, target, text = queue.pop()
            started = time.monotonic()
            response = await http.post(f"{base}/translate", json={"q": text, "source": source, "target": target})
            response.raise_for_status()
            latencies.append(time.monotonic() - started)

    tokens_before, totals_before = generated_tokens(base), [histogram_totals(base, name) for name in HISTOGRAMS]
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.monotonic() - started
    tokens = generated_tokens(base) - tokens_before
    # mean of each histogram over this load: first-token time, running rows per engine step, seconds per step
    first, rows, step = ((after[0] - before[0]) / max(after[1] - before[1], 1) for after, before in zip(
        [histogram_totals(base, name) for name in HISTOGRAMS], totals_before, strict=True))
    latencies.sort()
    return {"concurrency": concurrency, "sentences": len(items), "seconds": round(wall, 2),
            "sentences_per_s": round(len(items) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "first_token_mean_s": round(first, 4), "rows_per_step": round(rows, 2), "step_s": round(step, 4),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)}


def torch_engine(model, tokenizer, artifact, settings: Settings) -> Engine:
    """The server's engine over the torch backend, on an already loaded (and patched or unpatched) model;
    `artifact` None: base-model mode (few-shot prompts, no routing)."""
    metrics = Metrics()
    backend = TorchBackend(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), artifact is not None, settings,
                           metrics)
    return Engine(backend, tokenizer, artifact, settings, metrics)


def serve_and_load(engine: Engine, items: list[tuple[str, str, str]], sentences: int,
                   then: Callable[[str], object] | None = None, levels: tuple[int, ...] = CONCURRENCY) -> list[dict]:
    """Load levels against the engine behind the real HTTP server; `then(base_url)` runs before it stops."""
    out = []
    with tempfile.TemporaryDirectory() as tmp, ServerThread(engine, Path(tmp) / "jobs.sqlite3") as base:
        for source, target in sorted({(s, t) for s, t, _ in items}):  # warm-up (and each pair's prompt prefix)
            httpx.post(f"{base}/translate", json={"q": "Hello.", "source": source, "target": target}, timeout=600)
        for concurrency in levels:
            n = max(8, sentences // 4) if concurrency == 1 else sentences
            out.append(asyncio.run(load(base, items[:n], concurrency)))
            print(out[-1], flush=True)
        if then is not None:
            then(base)
    return out


def on_own_thread(fn: Callable, *args):
    """fn(*args) on a thread of its own that ends with it. This process's main thread runs no torch: each thread
    that runs torch keeps an OpenMP team, and with a second team alive beside the engine's worker libgomp stops
    spin-waiting and every engine step gets slower (server/torch_backend.py); a thread that has ended has none."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(fn, *args).result()


def naive(model, tokenizer, template: str, items: list[tuple[str, str, str]], pair_ids: list[int] | None) -> dict:
    """One sentence at a time through plain transformers `generate`, no server, no batching; `pair_ids`: each
    item's pair, routed as the server routes it (the model patched), None: the model as it is (unpatched)."""
    stops = stop_token_ids(tokenizer)
    tokens, started = 0, time.monotonic()
    for i, (source, target, text) in enumerate(items):
        encoded = tokenizer([render_prompt(template, source, target, text)], return_tensors="pt")
        n_source = len(tokenizer(text, add_special_tokens=False).input_ids)
        with torch.no_grad(), route(None if pair_ids is None else torch.tensor(pair_ids[i : i + 1])):
            output = model.generate(**encoded, max_new_tokens=min(256, 2 * n_source + 16), do_sample=False,
                                    eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        tokens += output.shape[1] - encoded["input_ids"].shape[1]
    wall = time.monotonic() - started
    return {"concurrency": 1, "sentences": len(items), "seconds": round(wall, 2),
            "sentences_per_s": round(len(items) / wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def fixed_generation_seconds(model, tokenizer, prompts: list[str], pair_ids: list[int] | None) -> float:
    """Seconds to generate exactly FIXED_NEW_TOKENS for every row of one batch."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    stops = stop_token_ids(tokenizer)
    started = time.monotonic()
    with torch.no_grad(), route(None if pair_ids is None else torch.tensor(pair_ids)):
        model.generate(**encoded, min_new_tokens=FIXED_NEW_TOKENS, max_new_tokens=FIXED_NEW_TOKENS,
                       do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    return time.monotonic() - started


def forward_checks(model, tokenizer, artifact, prompts: list[str], pair_ids: list[int]) -> dict[str, float]:
    """Best of FORWARD_ROUNDS seconds per variant, the three measured in turn within each round, so that drift in
    this machine's speed (several percent over minutes) hits them alike; the model is left patched."""
    family = family_of(model)
    best = dict.fromkeys(("routed mixed pairs", "routed single pair", "unpatched"), float("inf"))
    for _ in range(FORWARD_ROUNDS):
        for name, ids in (("routed mixed pairs", pair_ids), ("routed single pair", [pair_ids[0]] * len(pair_ids))):
            best[name] = min(best[name], fixed_generation_seconds(model, tokenizer, prompts, ids))
        unpatch(model, family)  # the same weights, plain FFN: what routing costs
        best["unpatched"] = min(best["unpatched"], fixed_generation_seconds(model, tokenizer, prompts, None))
        artifact.apply(model, verify_base=False)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="runs/quick-tuned-landermt/artifact")
    parser.add_argument("--model", default=None, help="base model directory (default: Gemma 3 270M)")
    parser.add_argument("--sentences", type=int, default=64, help="sentences per load level (concurrency 1: 1/4)")
    args = parser.parse_args()

    def load() -> tuple:
        artifact = load_artifact(args.artifact)
        model, tokenizer = load_model(args.model, artifact.dtype)
        greedy(model, tokenizer, ["warm-up"], None, 2)
        rss = peak_rss_mib()
        artifact.apply(model)
        return artifact, model, tokenizer, rss

    artifact, model, tokenizer, rss_base = on_own_thread(load)
    family = family_of(model)
    template, directions = artifact.manifest.prompt_template, artifact.manifest.directions
    items = workload(directions, args.sentences)
    pair_ids = [artifact.partition.pair_id(s, t) for s, t, _ in items[:BATCH]]
    settings = Settings(artifact=args.artifact, model=args.model, port=_free_port(), max_batch_size=BATCH, max_texts=64)

    print("forward checks", flush=True)
    prompts = [render_prompt(template, s, t, text) for s, t, text in items[:BATCH]]
    forward = on_own_thread(forward_checks, model, tokenizer, artifact, prompts, pair_ids)
    # The naive baselines translate the same sentences with the same model as the server they are compared with
    # (the routed model's outputs are longer than the base model's, so a routed server against a base-model
    # baseline would compare output lengths as much as engines).
    naive_items = items[: max(8, args.sentences // 4)]
    print("naive baseline, routed", flush=True)
    baseline_routed = on_own_thread(naive, model, tokenizer, template, naive_items,
                                    [artifact.partition.pair_id(s, t) for s, t, _ in naive_items])
    print("load: routed", flush=True)
    routed = serve_and_load(torch_engine(model, tokenizer, artifact, settings), items, args.sentences)
    rss_served = peak_rss_mib()
    print("load: routed, no prefix reuse (concurrency 1)", flush=True)
    without = dataclasses.replace(settings, prefix_reuse=False)
    no_reuse = serve_and_load(torch_engine(model, tokenizer, artifact, without), items, args.sentences, levels=(1,))

    on_own_thread(unpatch, model, family)  # the same weights, plain FFN: what routing costs
    print("load: routing off", flush=True)
    plain = serve_and_load(torch_engine(model, tokenizer, artifact, settings), items, args.sentences)
    print("load: base-model mode, with and without prefix reuse (concurrency 1)", flush=True)
    base_mode = {name: serve_and_load(torch_engine(model, tokenizer, None, s), items, args.sentences, levels=(1,))[0]
                 for name, s in (("base model", settings), ("base model, no prefix reuse", without))}
    print("naive baseline, base model", flush=True)
    baseline = on_own_thread(naive, model, tokenizer, template, naive_items, None)

    forward_tokens = {k: round(BATCH * FIXED_NEW_TOKENS / v, 2) for k, v in forward.items()}
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    artifact_mib = sum(f.stat().st_size for f in Path(args.artifact).glob("*.safetensors")) / 2**20
    pairs = len(artifact.manifest.languages) * (len(artifact.manifest.languages) - 1) // 2
    routed_at, plain_at = ({r["concurrency"]: r for r in levels} for levels in (routed, plain))  # by concurrency
    result = {
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "dtype": str(artifact.dtype),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "artifact": args.artifact, "directions": directions, "batch": BATCH,
        "load": {"routed": routed, "routed, no prefix reuse": no_reuse, "routing off": plain,
                 **{name: [r] for name, r in base_mode.items()}, "naive": baseline, "naive, routed": baseline_routed},
        "forward_tokens_per_s": forward_tokens,
        "checks": {
            "routing cost (forward, mixed vs unpatched)": round(1 - forward_tokens["routed mixed pairs"]
                                                                / forward_tokens["unpatched"], 4),
            "routing cost (served, c=32)": round(1 - routed_at[32]["tokens_per_s"] / plain_at[32]["tokens_per_s"], 4),
            "mixed vs single pair (forward)": round(1 - forward_tokens["routed mixed pairs"]
                                                    / forward_tokens["routed single pair"], 4),
            "speed-up over naive (sentences/s, c=32)": round(routed_at[32]["sentences_per_s"]
                                                             / baseline_routed["sentences_per_s"], 2),
            "speed-up over naive, routing off (sentences/s, c=32)": round(
                plain_at[32]["sentences_per_s"] / baseline["sentences_per_s"], 2),
            "served / bare forward tokens/s (c=32)": round(
                routed_at[32]["tokens_per_s"] / forward_tokens["routed mixed pairs"], 3),
            "time to first token, prefix reuse / none (c=1)": round(
                routed_at[1]["first_token_mean_s"] / no_reuse[0]["first_token_mean_s"], 3),
            "time to first token, prefix reuse / none (c=1, base model)": round(
                base_mode["base model"]["first_token_mean_s"]
                / base_mode["base model, no prefix reuse"]["first_token_mean_s"], 3),
        },
        "memory_mib": {"peak_rss_model_loaded": rss_base, "peak_rss_serving": rss_served,
                       "model_weights": round(model_mib), "artifact_files": round(artifact_mib, 1),
                       "one base + all pairs": round(model_mib + artifact_mib),
                       f"one model copy per pair ({pairs} pairs)": round(pairs * model_mib)},
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)
    print(json.dumps(result["checks"], indent=2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_table(column: str, loads: dict[str, list[dict]]) -> list[str]:
    """Markdown rows of `load()` results, one per (name, concurrency level); rows/step and s/step only where the
    backend reports its steps (the torch engine)."""
    rows = [f"| {column} | concurrency | sentences | sentences/s | tokens/s | p50 s | p95 s | first token s | "
            "rows/step | s/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, levels in loads.items():
        for x in levels:
            rows.append(f"| {name} | {x['concurrency']} | {x['sentences']} | {x['sentences_per_s']:.2f} | "
                        f"{x['tokens_per_s']:.1f} | {x['p50_s']:.2f} | {x['p95_s']:.2f} | "
                        f"{x.get('first_token_mean_s', '')} | {x.get('rows_per_step') or ''} | "
                        f"{x.get('step_s') or ''} |")
    return rows


def write_markdown(r: dict) -> None:
    m = r["machine"]
    rows = load_table("server", {name: levels for name, levels in r["load"].items() if not name.startswith("naive")})
    for name, label in (("naive, routed", "routed"), ("naive", "unpatched")):
        n = r["load"][name]
        rows.append(f"| naive (transformers generate, one at a time, {label}) | 1 | {n['sentences']} | "
                    f"{n['sentences_per_s']:.2f} | {n['tokens_per_s']:.1f} | | | | | |")
    c = r["checks"]
    targets = {"routing cost (forward, mixed vs unpatched)": ("≤ 5 %", c["routing cost (forward, mixed vs unpatched)"]
                                                               <= 0.05),
               "routing cost (served, c=32)": ("≤ 5 %", c["routing cost (served, c=32)"] <= 0.05),
               "mixed vs single pair (forward)": ("≤ 3 %", c["mixed vs single pair (forward)"] <= 0.03),
               **{name: ("≥ 5×", c[name] >= 5) for name in c if name.startswith("speed-up over naive")},
               "served / bare forward tokens/s (c=32)": ("≥ 80 %", c["served / bare forward tokens/s (c=32)"] >= 0.8),
               **{name: ("≤ 60 %", c[name] <= 0.6) for name in c if name.startswith("time to first token")}}
    checks = ["| check | value | target | met |", "|---|---:|---|---|"] + [
        f"| {name} | {c[name]:.3g} | {target} | {'yes' if ok else 'NO'} |" for name, (target, ok) in targets.items()]
    mem = ["| memory | MiB |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in r["memory_mib"].items()]
    section = "\n".join([
        "## Serving",
        "",
        f"`python bench/serving.py` (`bench/results/serving.json`): {m['cpu_count']}-core {m['machine']} CPU, "
        f"{m['dtype']}, torch {m['torch']}, {m['threads']} threads; artifact `{r['artifact']}`; max batch "
        f"{r['batch']}; one FLORES devtest sentence per request, cycling through {len(r['directions'])} directions.",
        "",
        *rows,
        "",
        f"Forward checks (batch {r['batch']}, exactly {FIXED_NEW_TOKENS} new tokens per row, best of "
        f"{FORWARD_ROUNDS} rounds, the three variants measured in turn in each round), tokens/s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["forward_tokens_per_s"].items()) + ".",
        "",
        *checks,
        "",
        *mem,
        "",
    ])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Serving", section, "Benchmarks")


if __name__ == "__main__":
    main()
