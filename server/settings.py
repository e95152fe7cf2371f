"""Server settings: defaults, overridden by LANDERMT_* environment variables, overridden by flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    artifact: str | None = None  # artifact directory; None serves the base model with few-shot prompts
    model: str | None = None  # base model directory; None: the default Gemma 3 270M
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "torch"  # "torch" (server/torch_backend.py) or "vllm" (server/vllm_backend.py, needs landermt[vllm])
    tensor_parallel_size: int = 1  # vllm backend: GPUs the model is split over
    gpu_memory_utilization: float = 0.9  # vllm backend: memory share for weights + KV cache (CPU: of RAM)
    dtype: str = "auto"  # base-model mode (an artifact brings its own): auto, bfloat16 or float32
    max_batch_size: int = 16  # rows (texts) per forward
    max_wait_ms: float = 5.0  # how long a batch waits to fill once its first row is queued
    max_texts: int = 64  # texts per request
    max_chars: int = 5000  # characters per text
    max_tokens: int = 512  # tokens per text
    max_new_tokens: int = 256  # cap on generated tokens (also ≤ 2 × source tokens + 16)
    beams: int = 1  # default decoding: 1 greedy, n > 1 beam search of width n (a request may ask for its own)
    max_beams: int = 8  # the widest beam a request may ask for (`num_beams`, or `alternatives` + 1)
    prefix_reuse: bool = True  # torch backend: keep each pair's prompt-prefix KV and prefill only what follows it
    prefill_tokens: int = 512  # torch backend: prompt tokens prefilled per step, with the decode step (0: no limit)
    jobs_db: str = str(Path.home() / ".local" / "share" / "landermt" / "jobs.sqlite3")
    max_job_lines: int = 100_000
    api_keys: str | None = None  # JSON file of hashed API keys (python -m server.keys); None: no auth
    cors_origins: str | None = None  # comma-separated origins browsers may call the API from ("*": any); None: off
    max_file_bytes: int = 2_000_000  # /translate_file upload limit
    file_wait_seconds: float = 300.0  # /translate_file answers when its job is done, or after this long

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Settings:
        parser = argparse.ArgumentParser(prog="python -m server", description="LANDeRMT translation server. "
                                         "Every flag can also be set as LANDERMT_<NAME> (e.g. LANDERMT_PORT).")
        for f in fields(cls):
            env = os.environ.get(f"LANDERMT_{f.name.upper()}")
            default = f.default if env is None else _parse(f.type, env)
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=default,
                                type=lambda v, t=f.type: _parse(t, v), help=f"(default: {default})")
        args = parser.parse_args(argv)
        if args.backend not in ("torch", "vllm"):
            parser.error(f"backend {args.backend!r} is not available; choose: torch, vllm")
        return cls(**vars(args))


def _parse(kind: str, value: str):
    if kind == "bool":
        if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise argparse.ArgumentTypeError(f"{value!r} is not a yes/no value (true, false, 1, 0, on, off)")
        return value.lower() in ("1", "true", "yes", "on")
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value or None if "None" in kind else value
