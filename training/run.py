"""The training pipeline: detect → score → partition → finetune → evaluate.

    python -m training.run --config configs/quick.yaml [--output DIR] [--resume] [--set train.lr=3e-4]

Each stage records a fingerprint of its inputs in OUTPUT/stages.json and is skipped when they are
unchanged and its outputs exist. A finetuning run that was killed continues from its last
checkpoint with --resume and ends with the same weights as an uninterrupted run.

Output: the artifact (manifest.json, partitions.safetensors, ffn.safetensors) for neuron methods,
trained.safetensors (best trainable weights) for every finetuned method, config.yaml,
train_log.jsonl, eval.json and eval.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from landermt.artifact import FFN, MANIFEST, UPDATE, ffn_weights, load_artifact, save_artifact, update_weights
from landermt.build import build
from landermt.cli import user_errors
from landermt.data import data_root, training_corpora
from landermt.families import family_of
from landermt.models import load_model, resolve_dtype, weights_sha256
from landermt.prompts import DEFAULT_TEMPLATE, Example, translation_example
from landermt.routing import attention_updates
from training import data as train_data
from training.config import (
    ALIGN_BATCHES,
    ALIGNED_PARTS,
    FINETUNED,
    METHOD_SPECS,
    METHODS,
    NEURON_METHODS,
    ConfigError,
    RunConfig,
    load_config,
)
from training.evaluate import evaluate_directions, markdown_table, perplexity
from training.finetune import CHECKPOINT, Trainer, world
from training.methods import prepare
from training.tiny import tiny_gemma, train_tokenizer

STAGES = "stages.json"


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings added after runs were made: left out of a fingerprint while at their default, so those runs keep their
# caches.
ADDED_LATER = {"train_directions", "attention_rank", "train_factors", "update_factor", "factor_rounds", "rewarm_rounds"}


def settings(section: BaseModel) -> dict:
    """A config section as a fingerprint sees it (ADDED_LATER fields only when not at their default)."""
    fields = type(section).model_fields
    return section.model_dump(exclude={name for name in ADDED_LATER
                                       if name in fields and getattr(section, name) == fields[name].default})


class Run:
    """One run's output directory and its stage bookkeeping."""

    def __init__(self, config: RunConfig, output: Path):
        self.config, self.output = config, output
        self.rank = world()[0]

    def _stages(self) -> dict[str, str]:
        path = self.output / STAGES
        return json.loads(path.read_text()) if path.exists() else {}

    def cached(self, stage: str, key: str, *files: str) -> bool:
        return self._stages().get(stage) == key and all((self.output / f).exists() for f in files)

    def key(self, stage: str) -> str | None:
        """The fingerprint a stage last finished with (None: never)."""
        return self._stages().get(stage)

    def done(self, stage: str, key: str) -> None:
        if self.rank == 0:
            (self.output / STAGES).write_text(json.dumps(self._stages() | {stage: key}, indent=2))

    def rank_zero_first(self, stage):
        """Rank 0 runs a cached stage first; the other ranks then find its results in the cache."""
        if self.rank != 0:
            dist.barrier()
        result = stage()
        if self.rank == 0 and dist.is_initialized():
            dist.barrier()
        return result

    def log(self, entry: dict) -> None:
        with (self.output / "train_log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")


def load_base(run: Run):
    """The base model: a tiny random one (built once, saved under OUTPUT/base_model) or a real one."""
    c = run.config
    if c.model.tiny is None:
        return load_model(c.model.path, resolve_dtype(c.model.dtype))
    folder = run.output / "base_model"
    key = fingerprint(c.model.tiny.model_dump(), c.data.languages)
    if not run.cached("base_model", key, "base_model/config.json"):
        lines = [text for pair in train_data.training_pairs(c.data.root, c.data.languages, max_per_direction=500)
                 for text in (pair.source, pair.target)]
        tokenizer = train_tokenizer(lines + list(DEFAULT_TEMPLATE.split()), c.model.tiny.vocab_size)
        model = tiny_gemma(c.model.tiny, len(tokenizer))
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        run.done("base_model", key)
    return load_model(str(folder), resolve_dtype(c.model.dtype))


def stage_base_perplexity(run: Run, model, tokenizer, base_sha: str) -> dict[str, float]:
    """Perplexity of the untouched base model on held-out text per language (the forgetting baseline)."""
    c = run.config
    key = fingerprint(base_sha, c.data.languages, c.eval.perplexity_lines, c.data.root)
    if run.cached("base_perplexity", key, "base_perplexity.json"):
        return json.loads((run.output / "base_perplexity.json").read_text())
    result = {lang: perplexity(model, tokenizer, _heldout(c, lang)) for lang in ["en", *c.data.languages]}
    (run.output / "base_perplexity.json").write_text(json.dumps(result, indent=2))
    run.done("base_perplexity", key)
    return result


def stage_partition(run: Run, model, tokenizer, base_sha: str):
    """Detect, score, partition (neuron methods only) into OUTPUT/artifact, cached."""
    c, m = run.config, run.config.method
    key = fingerprint(base_sha, m.k, m.layers, m.epsilon, m.car, m.objective, m.detect_samples, m.score_samples,
                      c.data.languages, c.data.root, c.train.seed)
    folder = run.output / "artifact"
    if run.cached("partition", key, f"artifact/{MANIFEST}"):
        print("partition: cached", flush=True)
        return load_artifact(folder)
    wanted = {"en", *c.data.languages}
    corpora = [corpus for corpus in training_corpora(c.data.root) if {corpus.first, corpus.second} <= wanted]
    manifest, partition = build(model, tokenizer, corpora, k=m.k, epsilon=m.epsilon, car=m.car,
                                detect_samples=m.detect_samples, score_samples=m.score_samples,
                                objective=m.objective, seed=c.train.seed, layers=m.layers,
                                model_name=c.model.path or ("tiny" if c.model.tiny else "gemma-3-270m (default)"))
    shutil.rmtree(folder, ignore_errors=True)
    save_artifact(folder, manifest, partition)
    run.done("partition", key)
    return load_artifact(folder)


def finetune_data(c: RunConfig, tokenizer) -> tuple[list[tuple[train_data.Pair, Example]],
                                                      list[tuple[train_data.Pair, Example]]]:
    """The finetuning examples of the trained directions, in the data order's encoding, and the FLORES dev
    examples the dev loss is measured on."""
    pairs = train_data.training_pairs(c.data.root, c.data.languages, min_chars=c.data.min_chars,
                                      max_chars=c.data.max_chars, max_ratio=c.data.max_length_ratio,
                                      max_per_direction=c.data.max_examples_per_direction, seed=c.train.seed)
    trained = c.data.trained_directions()
    pairs = [p for p in pairs if f"{p.source_lang}-{p.target_lang}" in trained]
    examples = train_data.encode(tokenizer, pairs, c.data.max_tokens, c.train.seed)
    dev = [(train_data.Pair(s, t, a, b), translation_example(tokenizer, DEFAULT_TEMPLATE, s, t, a, b,
                                                              c.data.max_tokens))
           for d in trained for s, t in [d.split("-")]
           for a, b in train_data.flores(c.data.root, "dev", s, t)[: c.data.dev_examples_per_direction]]
    return examples, dev


def stage_finetune(run: Run, model, tokenizer, artifact, resume: bool, upstream: str):
    """Selective (or baseline) finetuning; returns the prepared model with the best weights loaded."""
    c = run.config
    prepared = prepare(model, c.method, artifact.partition if artifact else None)
    if c.method.name not in FINETUNED:
        return prepared.model, None
    key = fingerprint(upstream, settings(c.method), settings(c.train), settings(c.data))
    trained_path = run.output / "trained.safetensors"
    if run.cached("finetune", key, "trained.safetensors"):
        print("finetune: cached", flush=True)
        best = load_file(trained_path)
        if ALIGNED_PARTS[c.method.update_factor] and not set(prepared.fixed) <= set(best):
            raise SystemExit(f"{trained_path} lacks the aligned factors its numbers were trained with (written "
                             "before they were stored): train again into another --output")
    else:
        examples, dev = finetune_data(c, tokenizer)
        partition = artifact.partition if artifact else None
        trainer = Trainer(prepared, examples, dev,
                          lambda p: partition.pair_id(p.source_lang, p.target_lang) if partition else 0,
                          tokenizer.pad_token_id, c.train, run.output, fingerprint=key)
        if (run.output / CHECKPOINT).exists():
            if not resume:
                raise SystemExit(f"{run.output} holds an unfinished finetuning run: pass --resume to continue it "
                                 "or choose another --output")
            try:
                trainer.load_checkpoint()
            except ValueError as error:  # a checkpoint of other settings or parameters: a clear refusal
                raise SystemExit(str(error)) from None
            print(f"finetune: resuming at step {trainer.step}", flush=True)
            if run.rank == 0:
                _truncate_log(run.output / "train_log.jsonl", trainer.step)
        else:
            if run.rank == 0 and (run.output / "train_log.jsonl").exists():
                (run.output / "train_log.jsonl").unlink()
            if ALIGNED_PARTS[c.method.update_factor] and prepared.fixed:  # baselines have no factors to align
                start = time.monotonic()
                trainer.align_factors(ALIGN_BATCHES, ALIGNED_PARTS[c.method.update_factor])
                print(f"finetune: factors aligned in {time.monotonic() - start:.1f} s (part of the training time)",
                      flush=True)
        print(f"finetune: {len(examples)} examples, {sum(p.numel() for _, p, _ in prepared.trainable):,} "
              f"trainable parameters", flush=True)
        best = trainer.train(run.log)
        if run.rank == 0:
            # with the fixed factors (Trainer.snapshot): a gradient-aligned factor is part of what the numbers mean
            save_file({k: v.contiguous() for k, v in best.items()}, trained_path)
            shutil.rmtree(run.output / CHECKPOINT)
        run.done("finetune", key)
    with torch.no_grad():
        params = {name: p for name, p, _ in prepared.trainable} | prepared.fixed
        for name, value in best.items():
            params[name].copy_(value)
    if c.method.name == "lora":  # merged as one would deploy it; PEFT's unmerged generation is ~10x slower here
        return prepared.model.merge_and_unload(), key
    if artifact is not None and prepared.routed and run.rank == 0:  # the artifact serves routed methods only
        delta = c.method.routing == "delta"
        if run.cached("artifact", key, f"artifact/{UPDATE if delta else FFN}"):  # written from these weights
            print("artifact: cached", flush=True)
            return prepared.model, key
        family, layers = family_of(model), sorted(artifact.partition.layers)
        manifest = dataclasses.replace(artifact.manifest, routing=c.method.routing)
        if delta:
            update = update_weights([family.ffns(model)[i] for i in layers], layers, attention_updates(model, family))
            save_artifact(run.output / "artifact", manifest, artifact.partition, update=update)
        else:
            save_artifact(run.output / "artifact", manifest, artifact.partition, ffn=ffn_weights(model, family, layers))
        run.done("artifact", key)
    return prepared.model, key


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines a killed run wrote after its last checkpoint."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def stage_evaluate(run: Run, model, tokenizer, artifact, base_perplexity: dict[str, float], upstream: str) -> dict:
    c = run.config
    def key_at(limit: int | None) -> str:
        return fingerprint(upstream, c.eval.model_copy(update={"limit": limit}).model_dump(), c.method.name,
                           c.method.few_shot)

    key = key_at(c.eval.limit)
    if run.cached("evaluate", key, "eval.json"):
        print("evaluate: cached", flush=True)
        return json.loads((run.output / "eval.json").read_text())
    known = _reusable_translations(run, key_at)
    partition = artifact.partition if artifact and METHOD_SPECS[c.method.name].routed else None
    pair_id = (lambda s, t: partition.pair_id(s, t)) if partition else (lambda s, t: None)
    shots = None
    if c.method.name == "few_shot":
        def shots(s: str, t: str) -> list[tuple[str, str]]:
            return train_data.flores(c.data.root, "dev", s, t)[-c.method.few_shot:]
    model.eval()
    results: dict = {"method": c.method.name, "testsets": {}}
    for name in c.eval.testsets:
        usable = [d for d in c.data.directions() if _has(c, name, d)]
        scores = evaluate_directions(model, tokenizer, DEFAULT_TEMPLATE, usable, name, c.data.root, c.eval.limit,
                                     pair_id, c.eval.batch_size, c.eval.max_new_tokens, shots, known=known.get(name))
        results["testsets"][name] = scores
    # Forgetting. A mask-rule model unrouted is its trained weights with every neuron; a delta-rule model
    # unrouted is the base itself, so its text of language l goes through the pair en-l (en: with the first other).
    delta = partition is not None and c.method.routing == "delta"
    results["perplexity"] = {
        lang: {"base": base_perplexity[lang], "after": perplexity(
            model, tokenizer, _heldout(c, lang),
            pair_id=partition.pair_id("en", c.data.languages[0] if lang == "en" else lang) if delta else None)}
        for lang in base_perplexity}
    (run.output / "eval.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    tables = [f"## {name}\n\n{markdown_table(scores)}" for name, scores in results["testsets"].items()]
    ppl = ["| language | base | after |", "|---|---:|---:|"] + [
        f"| {lang} | {v['base']:.2f} | {v['after']:.2f} |" for lang, v in results["perplexity"].items()]
    (run.output / "eval.md").write_text(f"# {c.name}: {c.method.name}\n\n" + "\n\n".join(tables)
                                        + "\n\n## Perplexity on held-out text\n\n" + "\n".join(ppl) + "\n")
    run.done("evaluate", key)
    return results


def _reusable_translations(run: Run, key_at) -> dict[str, dict[str, list[str]]]:
    """{test set: {direction: outputs}} of the stored eval.json when this evaluation would make them again: it was
    made with every setting of this one but the limit (re-keyed at its sentence count, it gives the key it was
    stored with). So raising eval.limit (100 devtest sentences per direction to 200) translates only the new
    sentences: each output is that sentence's alone (landermt.decode), whatever else shares its batch."""
    path = run.output / "eval.json"
    if not path.exists() or run.key("evaluate") is None:
        return {}
    stored = json.loads(path.read_text())["testsets"]
    counts = [len(scores["outputs"]) for directions in stored.values() for scores in directions.values()]
    if not counts or key_at(max(counts)) != run.key("evaluate"):
        return {}
    print(f"evaluate: reusing {sum(counts)} stored translations", flush=True)
    return {name: {d: scores["outputs"] for d, scores in directions.items()} for name, directions in stored.items()}


def _has(config: RunConfig, testset_name: str, direction: str) -> bool:
    try:
        train_data.evaluation_set(config.data.root, testset_name, *direction.split("-"))
    except (KeyError, FileNotFoundError):
        return False
    return True


def _heldout(config: RunConfig, lang: str) -> list[str]:
    return train_data.monolingual_heldout(config.data.root, lang, config.eval.perplexity_lines)


def pipeline(run: Run, resume: bool, skip_eval: bool) -> None:
    """Every stage in order; each one is skipped when its cached output is still valid."""
    model, tokenizer = run.rank_zero_first(lambda: load_base(run))
    base_sha = weights_sha256(model)
    # the forgetting baseline is only for the evaluate stage (measured before finetuning changes the weights)
    base_ppl = None if skip_eval else run.rank_zero_first(lambda: stage_base_perplexity(run, model, tokenizer,
                                                                                         base_sha))
    artifact = None
    if run.config.method.name in NEURON_METHODS:
        artifact = run.rank_zero_first(lambda: stage_partition(run, model, tokenizer, base_sha))
    model, finetune_key = stage_finetune(run, model, tokenizer, artifact, resume, base_sha)
    if run.rank == 0 and not skip_eval:
        results = stage_evaluate(run, model, tokenizer, artifact, base_ppl, finetune_key or base_sha)
        for name, scores in results["testsets"].items():
            print(f"\n{name}\n{markdown_table(scores)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    parser.add_argument("--output", default=None, help="output directory (default: runs/NAME-METHOD)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted finetuning run")
    parser.add_argument("--method", choices=METHODS, help="override method.name (baselines, ablations)")
    parser.add_argument("--skip-eval", action="store_true", help="stop after finetuning (the artifact is ready)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    if args.method:
        config = config.model_copy(update={"method": config.method.model_copy(update={"name": args.method})})
    output = Path(args.output or f"runs/{config.name}-{config.method.name}")
    output.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    run = Run(config, output)
    if run.rank == 0:
        (output / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False, allow_unicode=True))
    torch.manual_seed(config.train.seed)
    start = time.monotonic()
    with user_errors(parser):
        data_root(config.data.root)  # before minutes of model loading
        pipeline(run, resume=args.resume, skip_eval=args.skip_eval)
    if run.rank == 0:
        print(f"\n{output}: done in {time.monotonic() - start:.0f} s", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
