"""Training-step and evaluation benchmark: today's code path against the one it replaced, in one run.

    python bench/training_step.py [--artifact runs/quick-tuned-landermt/artifact] [--steps 12] [--eval 64]

The default model in the preset's dtype with the quick-tuned preset (LANDeRMT, layers 12–15 routed by the artifact's
partition, batch 8, its training data and seed). Each variant runs in a process of its own, so its
peak RSS (VmHWM, reset once the model and data are loaded) is its own:

- `old`: the loss of the full logits (the LM head at every position, float32 copy; kept here only, as
  the reference) on batches of a plain seeded permutation;
- `new`: landermt.loss.target_loss (head on target positions only, in chunks) on length-bucketed
  batches (training.finetune.rows_of_batch, as training.run uses them).

Both run the same number of optimizer steps (NeuronAdamW, as training does) after one warm-up step;
s/step is the mean (bucketed batches differ in length by design), the median beside it.
`max_loss_diff` is the largest |old − new| loss over the same batches at the same weights.
Evaluation: FLORES devtest sentences over 4 directions with the artifact routed, translated
by the old fixed batches (landermt.generate.greedy, 16 rows, each batch until its longest row ends)
and by the continuous-batching decoder with every direction in one stream (training.evaluate.translate_all,
as evaluation runs); sentences/s and how many outputs
are identical (rows that end by their stop token; a fixed batch capped its rows by its longest source).

Writes bench/results/training_step.json (keys `speedup`, `max_loss_diff`, `peak_rss_ratio`,
`eval_speedup`) and the "Training step" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import update_section  # bench/report.py, beside this script

from landermt.artifact import load_artifact
from landermt.generate import greedy
from landermt.loss import target_loss
from landermt.models import load_model, resolve_dtype
from landermt.prompts import DEFAULT_TEMPLATE, IGNORE, render_prompt
from landermt.routing import route
from training import data as train_data
from training.config import load_config
from training.evaluate import Sentence, translate_all
from training.finetune import Batch, padding_share, peak_rss_mib, reset_peak_rss, rows_of_batch
from training.methods import prepare
from training.optim import NeuronAdamW

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quick-tuned.yaml"
EVAL_DIRECTIONS = ["en-de", "de-en", "en-zh", "ar-en"]


def full_logits_loss(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """The replaced loss: logits at every position, copied to float32, shifted cross-entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def setup(artifact_dir: str, examples_per_direction: int, dtype: str | None = None):
    config = load_config(CONFIG)
    model, tokenizer = load_model(None, resolve_dtype(dtype or config.model.dtype))
    partition = load_artifact(artifact_dir).partition
    prepared = prepare(model, config.method, partition)
    pairs = train_data.training_pairs(None, config.data.languages, max_per_direction=examples_per_direction,
                                      seed=config.train.seed)
    examples = train_data.encode(tokenizer, pairs, config.data.max_tokens, config.train.seed)
    return config, prepared, tokenizer, partition, examples


def batch_of(examples, rows, partition, pad_id) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batch = Batch.of([examples[r] for r in rows], pad_id, lambda p: partition.pair_id(p.source_lang, p.target_lang))
    return batch.tensors, batch.pair_ids


def child_train(variant: str, args) -> dict:
    config, prepared, tokenizer, partition, examples = setup(args.artifact, args.examples_per_direction)
    lengths = [len(e.input_ids) for _, e in examples]
    loss_of = full_logits_loss if variant == "old" else target_loss
    bucket = 1 if variant == "old" else config.train.bucket_batches
    optimizer = NeuronAdamW([(p, axis) for _, p, axis in prepared.trainable], lr=config.train.lr,
                            weight_decay=config.train.weight_decay)
    prepared.model.train()
    reset_peak_rss()
    times, losses, padding = [], [], []
    for step in range(args.steps + 1):  # step 0 warms up
        tensors, pair_ids = batch_of(examples, rows_of_batch(lengths, config.train.batch_size, config.train.seed,
                                                             step, bucket), partition, tokenizer.pad_token_id)
        started = time.perf_counter()
        with route(pair_ids):
            loss = loss_of(prepared.model, **tensors)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
            losses.append(loss.item())
            padding.append(padding_share(tensors))
        print(f"{variant} step {step}: {time.perf_counter() - started:.2f} s", file=sys.stderr, flush=True)
    # the mean, not the median: bucketed batches differ in length by design, and throughput is total time / steps
    return {"variant": variant, "steps": args.steps, "s_per_step": round(statistics.mean(times), 3),
            "median_s_per_step": round(statistics.median(times), 3),
            "step_seconds": [round(t, 3) for t in times], "peak_rss_mib": peak_rss_mib(),
            "padding_share": round(statistics.mean(padding), 4), "mean_loss": round(statistics.mean(losses), 4)}


@torch.no_grad()
def child_loss(args, dtype: str, batches: int) -> dict:
    """Old and new loss on the same (bucketed) batches at the same weights, in `dtype`."""
    config, prepared, tokenizer, partition, examples = setup(args.artifact, args.examples_per_direction, dtype)
    lengths = [len(e.input_ids) for _, e in examples]
    diffs = []
    for index in range(batches):
        tensors, pair_ids = batch_of(examples, rows_of_batch(lengths, config.train.batch_size, config.train.seed,
                                                             index, config.train.bucket_batches),
                                     partition, tokenizer.pad_token_id)
        with route(pair_ids):
            diffs.append(abs(full_logits_loss(prepared.model, **tensors).item()
                             - target_loss(prepared.model, **tensors).item()))
    return {"dtype": dtype, "batches": len(diffs), "max_loss_diff": max(diffs), "loss_diffs": diffs}


def fixed_batches(model, tokenizer, source: str, target: str, sentences: list[str], pair_id: int) -> list[str]:
    """The replaced evaluation: batches of 16 through `greedy`, each capped by its longest source."""
    outputs = []
    for start in range(0, len(sentences), 16):
        chunk = sentences[start : start + 16]
        prompts = [render_prompt(DEFAULT_TEMPLATE, source, target, s) for s in chunk]
        longest = max(len(tokenizer(s, add_special_tokens=False).input_ids) for s in chunk)
        outputs += [g.text for g in greedy(model, tokenizer, prompts, [pair_id] * len(chunk),
                                           min(128, 2 * longest + 16))]
    return outputs


def child_eval(args) -> dict:
    artifact = load_artifact(args.artifact)
    model, tokenizer = load_model(None, artifact.dtype)
    artifact.apply(model)
    per_direction = {d: [s for s, _ in train_data.flores(None, "devtest", *d.split("-"))[: args.eval // 4]]
                     for d in EVAL_DIRECTIONS}
    started = time.perf_counter()
    pair_id = {d: artifact.partition.pair_id(*d.split("-")) for d in EVAL_DIRECTIONS}
    old = [out for d, texts in per_direction.items()
           for out in fixed_batches(model, tokenizer, *d.split("-"), texts, pair_id[d])]
    old_seconds = time.perf_counter() - started
    print(f"eval old: {old_seconds:.0f} s", file=sys.stderr, flush=True)
    sentences = [Sentence(*d.split("-"), text, pair_id[d]) for d, texts in per_direction.items() for text in texts]
    started = time.perf_counter()
    new = translate_all(model, tokenizer, DEFAULT_TEMPLATE, sentences, 16, 128)
    new_seconds = time.perf_counter() - started
    return {"sentences": len(new), "old_sentences_per_s": round(len(old) / old_seconds, 3),
            "new_sentences_per_s": round(len(new) / new_seconds, 3),
            "identical_outputs": sum(a == b for a, b in zip(old, new, strict=True))}


def matmul_gflops(dtype: torch.dtype) -> float:
    """One FFN up-projection's matmul (1,600 tokens × 640 → 2,048) in `dtype`: what the hardware gives per dtype
    (landermt.models.resolve_dtype picks float32 where bf16 is emulated)."""
    a, w = torch.randn(1600, 640, dtype=dtype), torch.randn(2048, 640, dtype=dtype)
    F.linear(a, w)
    started = time.perf_counter()
    for _ in range(5):
        F.linear(a, w)
    return round(5 * 2 * 1600 * 640 * 2048 / (time.perf_counter() - started) / 1e9, 1)


def run_child(part: str, args) -> dict:
    command = [sys.executable, __file__, "--child", part, "--artifact", args.artifact, "--steps", str(args.steps),
               "--eval", str(args.eval), "--examples-per-direction", str(args.examples_per_direction)]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=str(ROOT / "runs" / "quick-tuned-landermt" / "artifact"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval", type=int, default=64, help="FLORES devtest sentences over 4 directions")
    parser.add_argument("--examples-per-direction", type=int, default=1000)
    parser.add_argument("--child", choices=["old", "new", "loss", "loss-bf16", "eval"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "eval":
            result = child_eval(args)
        elif args.child.startswith("loss"):  # bf16 too: the tolerance is set for it (slow where emulated)
            bf16 = args.child == "loss-bf16"
            result = child_loss(args, "bfloat16" if bf16 else None, 3 if bf16 else args.steps)
        else:
            result = child_train(args.child, args)
        print(json.dumps(result), flush=True)
        return
    if not (Path(args.artifact) / "manifest.json").exists():
        parser.error(f"{args.artifact}: no artifact (its partition routes the batches); "
                     "run `bash scripts/main.sh` or training.run with configs/quick-tuned.yaml first")
    old, new = run_child("old", args), run_child("new", args)
    loss, loss_bf16, evaluation = run_child("loss", args), run_child("loss-bf16", args), run_child("eval", args)
    result = {
        "command": "python bench/training_step.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                    "dtype": str(resolve_dtype(load_config(CONFIG).model.dtype)).removeprefix("torch."),
                    "matmul_gflops": {"float32": matmul_gflops(torch.float32),
                                      "bfloat16": matmul_gflops(torch.bfloat16)}},
        "speedup": round(old["s_per_step"] / new["s_per_step"], 2),
        "max_loss_diff": max(loss["max_loss_diff"], loss_bf16["max_loss_diff"]),
        "peak_rss_ratio": round(new["peak_rss_mib"] / old["peak_rss_mib"], 3),
        "eval_speedup": round(evaluation["new_sentences_per_s"] / evaluation["old_sentences_per_s"], 2),
        "old": old, "new": new, "loss": loss, "loss_bf16": loss_bf16, "eval": evaluation}
    (ROOT / "bench" / "results" / "training_step.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)
    print(json.dumps({k: result[k] for k in ("speedup", "max_loss_diff", "peak_rss_ratio", "eval_speedup")}))


def write_markdown(r: dict) -> None:
    old, new, ev = r["old"], r["new"], r["eval"]
    gflops = r["machine"]["matmul_gflops"]
    section = "\n".join([
        "## Training step", "",
        f"`{r['command']}` ({r['machine']['cpu_count']} CPU cores, {r['machine']['machine']}, torch "
        f"{r['machine']['torch']}; Gemma 3 270M in {r['machine']['dtype']} (the preset's `dtype: auto`; one matmul "
        f"here: {gflops['float32']} GFLOPS in float32, {gflops['bfloat16']} in bfloat16), the quick-tuned preset: "
        f"LANDeRMT on layers 12–15, batch 8, {old['steps']} optimizer steps "
        "per variant after a warm-up step, each variant in its own process).", "",
        "| | s/step (mean) | median | peak RSS MiB | padding share | mean loss |", "|---|---:|---:|---:|---:|---:|",
        f"| old: full logits, plain batches | {old['s_per_step']} | {old['median_s_per_step']} | {old['peak_rss_mib']} "
        f"| {old['padding_share']} | {old['mean_loss']} |",
        f"| new: head on target positions, length buckets | {new['s_per_step']} | {new['median_s_per_step']} "
        f"| {new['peak_rss_mib']} | {new['padding_share']} | {new['mean_loss']} |", "",
        f"- **speed-up {r['speedup']}×** (target ≥ 2.5×); peak RSS new/old **{r['peak_rss_ratio']}** (target ≤ 0.6)",
        f"- same batches, same weights: max |Δloss| = **{r['max_loss_diff']:.2e}** (target ≤ 1e-3 in bf16): "
        f"{r['loss']['max_loss_diff']:.2e} over {r['loss']['batches']} batches in {r['machine']['dtype']}, "
        f"{r['loss_bf16']['max_loss_diff']:.2e} over {r['loss_bf16']['batches']} in bfloat16",
        f"- evaluation ({ev['sentences']} FLORES devtest sentences, {', '.join(EVAL_DIRECTIONS)}, routed): fixed "
        f"batches {ev['old_sentences_per_s']} sentences/s, continuous-batching decoder {ev['new_sentences_per_s']} "
        f"— **{r['eval_speedup']}×** (target ≥ 2×); {ev['identical_outputs']} of {ev['sentences']} outputs "
        "identical", ""])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Training step", section, "Benchmarks")


if __name__ == "__main__":
    main()
