"""Soak benchmark: the real server process under sustained concurrent load, counting every failure.

    python bench/soak.py [--artifact DIR] [--concurrency 64] [--duration 300] [--modes artifact,base]

For each mode, `python -m server` is started as its own process on a loopback port — with the artifact
(routed pairs) and with none (the base model, few-shot prompts: long prompts, the case that once lost
a quarter of its requests to a shared-tokenizer race) — and `concurrency` clients POST /translate for
`duration` seconds, each request one FLORES devtest sentence, cycling through 10 directions (mixed
pairs). Counted: HTTP statuses, connection errors, time-outs, non-JSON error bodies, error lines in the
server's log; latency p50/p99 of the answered requests. Clients stop sending at the deadline and wait
for what is in flight. Target: `errors` = 0 in every mode.
Writes bench/results/soak.json and the "Soak" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from report import update_section  # bench/report.py, beside this script
from serving import _free_port as free_port  # bench/serving.py, beside this script
from serving import workload  # FLORES devtest sentences cycling through directions
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
DIRECTIONS = ["en-de", "de-en", "en-fr", "fr-en", "en-it", "it-en", "en-ar", "ar-en", "en-zh", "zh-en"]
MAX_REQUESTS = 100_000  # a bound on the loop besides the deadline


def start_server(artifact: str | None, port: int, log: Path, jobs_db: Path) -> subprocess.Popen:
    env = {**os.environ, "LANDERMT_ARTIFACT": artifact or ""}
    command = [sys.executable, "-m", "server", "--port", str(port), "--jobs-db", str(jobs_db)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"server not ready after 600 s; see {log}")
        time.sleep(0.5)


async def soak(base: str, items: list[tuple[str, str, str]], concurrency: int, duration: float) -> dict:
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    sent = iter(range(MAX_REQUESTS))
    deadline = time.monotonic() + duration
    bar = tqdm(total=int(duration), desc=base.rsplit(":", 1)[1], unit="s", bar_format="{l_bar}{bar}| {n}/{total} s "
               "[{elapsed}<{remaining}] {postfix}")

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline and (n := next(sent, None)) is not None:
            source, target, text = items[n % len(items)]
            started = time.monotonic()
            try:
                response = await http.post(f"{base}/translate", json={"q": text, "source": source, "target": target})
            except httpx.TimeoutException:
                statuses["timeout"] += 1
                continue
            except httpx.TransportError as error:  # reset, refused, closed mid-answer
                statuses[f"connection error ({type(error).__name__})"] += 1
                continue
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                latencies.append(time.monotonic() - started)
            elif not response.headers.get("content-type", "").startswith("application/json"):
                statuses["non-JSON error body"] += 1
            bar.n = min(int(duration), int(duration - (deadline - time.monotonic())))
            bar.set_postfix_str(" ".join(f"{k}:{v}" for k, v in sorted(statuses.items())))

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    bar.close()
    latencies.sort()
    answered = sum(statuses.values())
    return {"requests": answered, "statuses": dict(statuses), "seconds": round(time.monotonic() - started, 1),
            "errors": answered - statuses["200"],
            "sentences_per_s": round(statuses["200"] / (time.monotonic() - started), 3),
            "p50_s": round(statistics.median(latencies), 2) if latencies else None,
            "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2) if latencies else None}


def run_mode(mode: str, artifact: str | None, concurrency: int, duration: float, sentences: int) -> dict:
    items = workload(DIRECTIONS, sentences)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        port = free_port()
        process = start_server(artifact if mode == "artifact" else None, port, log, Path(tmp) / "jobs.sqlite3")
        try:
            result = asyncio.run(soak(f"http://127.0.0.1:{port}", items, concurrency, duration))
        finally:
            process.terminate()
            process.wait(timeout=120)
        lines = log.read_text().splitlines()
    error_lines = [line for line in lines if " ERROR " in line or "Traceback" in line]
    result["server_error_lines"] = len(error_lines)
    result["errors"] += len(error_lines)
    result["first_error_lines"] = error_lines[:5]
    return {"mode": mode, "artifact": artifact if mode == "artifact" else None, "concurrency": concurrency, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="runs/quick-tuned-landermt/artifact")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=300, help="seconds of load per mode")
    parser.add_argument("--sentences", type=int, default=500, help="distinct requests, cycled")
    parser.add_argument("--modes", default="artifact,base")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if "artifact" in modes and not (ROOT / args.artifact / "manifest.json").exists():
        parser.error(f"{args.artifact}: no artifact there (train one, or --modes base)")
    runs = []
    for mode in modes:
        runs.append(run_mode(mode, args.artifact, args.concurrency, args.duration, args.sentences))
        print(json.dumps(runs[-1]), flush=True)
    result = {"command": "python bench/soak.py " + " ".join(sys.argv[1:]), "duration_s": args.duration,
              "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
              "errors": sum(r["errors"] for r in runs), "runs": runs}
    (ROOT / "bench" / "results" / "soak.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    write_markdown(result)


def write_markdown(r: dict) -> None:
    rows = ["| mode | requests | statuses | errors | sentences/s | p50 s | p99 s |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for run in r["runs"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(run["statuses"].items()))
        rows.append(f"| {run['mode']} | {run['requests']} | {statuses} | {run['errors']} | {run['sentences_per_s']} "
                    f"| {run['p50_s']} | {run['p99_s']} |")
    section = "\n".join([
        "## Soak", "",
        f"`{r['command']}` ({r['machine']['cpu_count']} CPU cores, {r['machine']['machine']}; the default model, "
        f"`python -m server` as its own process, {r['runs'][0]['concurrency']} concurrent clients, "
        f"{int(r.get('duration_s', 300))} s of load per mode, then the requests in flight finish; FLORES devtest "
        "sentences over 10 directions). "
        "`errors` counts every answer that is not 200, connection errors, time-outs and error lines in the "
        "server's log; target 0.", "",
        *rows, "",
        f"Total errors: **{r['errors']}**.", ""])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Soak", section, "Benchmarks")


if __name__ == "__main__":
    main()
