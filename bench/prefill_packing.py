"""What packing a new row's prefill into the decode step would save the torch engine, on this machine.

    python bench/prefill_packing.py [--repeats 5]

The torch engine (landermt/decode.py) admits a row with a forward of its own over the row's prompt, then runs the
decode step of the B running rows. Packing (vLLM's chunked prefill) runs both in one forward. With transformers'
rectangular [rows, tokens] batches there are two ways to do that, timed here on the default model against the two
separate forwards (each figure the median of `--repeats`):

* padded: one [B + 1, P] forward, the running rows' one new token left-padded to the prompt's P tokens (masked
  columns, as the engine's prefix reuse already pads): B × (P − 1) tokens of extra work;
* flat: the B + P real tokens as one [1, B + P] sequence, B + 1 logits kept. This is the work of the linear layers
  (projections, FFN, LM head) of a truly ragged step, whose attention would need varlen kernels and a paged cache;
  its attention is cheaper here than the real one (a short causal block instead of B caches), so it is an optimistic
  bound on what a ragged forward could save.

Writes bench/results/prefill_packing.json and the "Prefill packing" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from report import update_section  # bench/report.py, beside this script
from transformers import DynamicCache

from landermt.models import load_model

ROOT = Path(__file__).resolve().parent.parent
CACHE_TOKENS = 96  # a running row's prompt and translation so far (FLORES prompts are ~50-80 tokens)
SHAPES = [(8, 24), (16, 24), (16, 48)]  # (running rows B, prompt tokens P to prefill)


def timed(model, ids: torch.Tensor, cache: DynamicCache | None, keep: int, repeats: int) -> float:
    """Median seconds of one forward of `ids` after `cache` (a fresh copy each time), keeping `keep` logits; one
    untimed forward first (the kernels' first call for a shape)."""
    times = []
    for _ in range(repeats + 1):
        past = copy.deepcopy(cache) if cache is not None else DynamicCache(config=model.config)
        width = past.get_seq_length() + ids.shape[1]
        mask = torch.ones(ids.shape[0], width, dtype=torch.long)
        started = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True, logits_to_keep=keep)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def running_cache(model, rows: int, vocabulary: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, vocabulary, (rows, CACHE_TOKENS)), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(None)
    vocabulary = len(tokenizer)
    tokens = lambda rows, n: torch.randint(0, vocabulary, (rows, n))  # noqa: E731 - random ids: the cost is the same
    rows = []
    for running, prompt in SHAPES:
        decode = timed(model, tokens(running, 1), running_cache(model, running, vocabulary), 1, args.repeats)
        prefill = timed(model, tokens(1, prompt), None, 1, args.repeats)
        padded = timed(model, tokens(running + 1, prompt), running_cache(model, running + 1, vocabulary), 1,
                       args.repeats)
        flat = timed(model, tokens(1, running + prompt), None, running + 1, args.repeats)
        separate = decode + prefill
        rows.append({"running_rows": running, "prompt_tokens": prompt, "decode_s": round(decode, 4),
                     "prefill_s": round(prefill, 4), "separate_s": round(separate, 4), "padded_s": round(padded, 4),
                     "flat_s": round(flat, 4), "padded_vs_separate": round(padded / separate, 3),
                     "flat_vs_separate": round(flat / separate, 3)})
        print(rows[-1], flush=True)
    machine = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype)}
    out = ROOT / "bench" / "results" / "prefill_packing.json"
    out.write_text(json.dumps({"machine": machine, "cache_tokens": CACHE_TOKENS, "repeats": args.repeats,
                               "shapes": rows}, indent=2) + "\n")
    table = ["| running rows B | prompt tokens P | decode step s | prefill s | separate s | padded [B+1, P] s "
             "| flat [1, B+P] s | padded / separate | flat / separate |", "|" + "---:|" * 9]
    table += [f"| {r['running_rows']} | {r['prompt_tokens']} | {r['decode_s']:.3f} | {r['prefill_s']:.3f} "
              f"| {r['separate_s']:.3f} | {r['padded_s']:.3f} | {r['flat_s']:.3f} | {r['padded_vs_separate']:.2f} "
              f"| {r['flat_vs_separate']:.2f} |" for r in rows]
    section = "\n".join([
        "## Prefill packing",
        "",
        f"`python bench/prefill_packing.py` (`bench/results/prefill_packing.json`): the default model, "
        f"{machine['cpu_count']}-core {machine['machine']} CPU, {machine['dtype']}, {machine['threads']} threads; "
        f"running rows with {CACHE_TOKENS} cached tokens each, median of {args.repeats}. What one admission costs "
        "the torch engine today (a prefill forward, then the decode step: *separate*) against one packed forward: "
        "*padded* (rectangular, the running rows' token padded to the prompt's length) or *flat* (the real tokens "
        "only: the linear layers' work of a ragged step, an optimistic bound).",
        "",
        *table,
        "",
    ])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Prefill packing", section, "Benchmarks")
    print(section)


if __name__ == "__main__":
    main()
