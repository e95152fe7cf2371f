"""Selective finetuning: one recipe for every finetuned method, resumable bit for bit.

`setup()` prepares data order and optimizer; `finetune()` is the loop. Batches mix directions;
routed methods pass each row's pair id (routing.route). Each optimizer step uses
`grad_accum` micro-batches; the learning rate warms up linearly, then decays linearly to zero.
Every `eval_every` steps the target-token loss on FLORES dev is measured and the best weights are
kept. Every `checkpoint_every` steps the trainable weights, optimizer state, best weights and RNG
state are written atomically; `--resume` continues from there, and because the batch order is a
function of (seed, step) the result equals an uninterrupted run's.

Under torchrun (torch.distributed initialised, world size > 1) the model is wrapped in DDP, each
rank takes its own slice of every global batch, gradients are averaged across ranks, and rank 0
alone writes checkpoints and logs. On CPU the gloo backend is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from landermt.loss import target_loss
from landermt.prompts import IGNORE, Example, collate
from landermt.routing import DeltaFFN, route
from training.config import ALIGN_BATCHES, TrainConfig
from training.methods import Prepared
from training.optim import NeuronAdamW

CHECKPOINT = "checkpoint"


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux), so training's peak excludes earlier stages.
    Memory those stages freed is first handed back to the system (glibc keeps it otherwise, and it
    would count as resident: a run that scored neurons in-process read 1.6 GiB higher)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> int | None:
    """Peak resident memory of this process since the last reset (VmHWM), MiB; None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return None


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]
    pair_ids: torch.Tensor | None

    @classmethod
    def of(cls, items: list[tuple[object, Example]], pad_id: int,
           pair_id: Callable[[object], int] | None = None) -> Batch:
        """(pair, example) items collated; with `pair_id` (routed methods) each row's pair id."""
        return cls(collate([e for _, e in items], pad_id),
                   torch.tensor([pair_id(p) for p, _ in items]) if pair_id else None)


class TargetLoss(torch.nn.Module):
    """The target-token loss as a module's forward: DDP must wrap the module whose forward runs the whole
    computation, to synchronise the gradients it produces."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return target_loss(self.model, input_ids, attention_mask, labels)


def mean_target_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (labels != IGNORE), each row routed by its pair id;
    `model` is the model, or DDP over its TargetLoss."""
    with route(batch.pair_ids):
        if isinstance(model, DistributedDataParallel):
            return model(**batch.tensors)
        return target_loss(model, **batch.tensors)


@functools.lru_cache(maxsize=2)
def _epoch_batches(lengths: tuple[int, ...], batch_size: int, seed: int, epoch: int, bucket: int) -> list[list[int]]:
    """One epoch's batches, length-bucketed: a seeded permutation cut into chunks of `bucket` batches; in each
    chunk the rows are sorted by length and cut into batches, and those batches are shuffled. Rows of similar
    length share a batch (little padding) while the order stays random. Every batch is full: the few rows
    left over (fewer than a batch) differ from epoch to epoch."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order = order[: max(1, len(order) // batch_size) * batch_size]
    batches = []
    for start in range(0, len(order), batch_size * bucket):
        chunk = sorted(order[start : start + batch_size * bucket], key=lengths.__getitem__)
        cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches += [cut[i] for i in torch.randperm(len(cut), generator=generator).tolist()]
    return batches


def rows_of_batch(lengths: list[int], batch_size: int, seed: int, index: int, bucket: int = 1) -> list[int]:
    """Example indices of global batch `index` (a pure function of its arguments, so --resume sees the same
    batches): epochs of `_epoch_batches` laid end to end; `lengths` are the examples' token counts."""
    per_epoch = max(1, len(lengths) // batch_size)
    return _epoch_batches(tuple(lengths), batch_size, seed, index // per_epoch, bucket)[index % per_epoch]


def order_batches(examples: list[tuple[object, Example]], lengths: list[int], config: TrainConfig, first: int,
                  count: int, pad_id: int, pair_id: Callable[[object], int] | None) -> Iterator[Batch]:
    """Batches `first` … `first + count - 1` of the data order, every row (not split over ranks): what the factors
    are aligned on (Trainer.align_factors) and measured on (bench/factor_drift.py)."""
    for index in range(first, first + count):
        rows = rows_of_batch(lengths, config.batch_size, config.seed, index, config.bucket_batches)
        yield Batch.of([examples[r] for r in rows], pad_id, pair_id)


def summed_gradients(model: torch.nn.Module, batches: Iterable[Batch], weights: list[torch.Tensor]
                     ) -> list[torch.Tensor]:
    """Each of `weights`' target-loss gradient summed over `batches` (float32), frozen weights included; in eval
    mode (no dropout: the gradient of the model as it translates), the model's mode restored after."""
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    training = model.training
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    try:
        for batch in batches:
            for total, grad in zip(sums, torch.autograd.grad(mean_target_loss(model, batch), weights), strict=True):
                total += grad
    finally:
        model.train(training)
        for w in weights:
            w.requires_grad_(False)
    return sums


def padding_share(tensors: dict[str, torch.Tensor]) -> float:
    """The share of a batch's positions that are padding."""
    return 1 - tensors["attention_mask"].sum().item() / tensors["attention_mask"].numel()


def lr_at(step: int, config: TrainConfig, round_start: int = 0) -> float:
    """Linear warmup over warmup_ratio·steps, then linear decay to zero; the warmup starts again at `round_start`
    (≤ step), the step a later round of factors began (train.rewarm_rounds)."""
    warmup = max(1, math.ceil(config.warmup_ratio * config.steps))
    decayed = config.lr * min(1.0, max(0.0, (config.steps - step) / max(1, config.steps - warmup)))
    since = step - round_start + 1
    return decayed * since / warmup if since < warmup else decayed  # as written before rounds: bit for bit


class Trainer:
    def __init__(self, prepared: Prepared, examples: list[tuple[object, Example]], dev: list[tuple[object, Example]],
                 pair_id: Callable[[object], int], pad_id: int, config: TrainConfig, output: Path,
                 fingerprint: str = ""):
        """`fingerprint` names the run's settings: a checkpoint written under other settings is refused."""
        self.model, self.prepared, self.config, self.output = prepared.model, prepared, config, Path(output)
        self.fingerprint = fingerprint
        self.examples, self.dev, self.pair_id, self.pad_id = examples, dev, pair_id, pad_id
        self.lengths = [len(e.input_ids) for _, e in examples]
        self.params = {name: p for name, p, _ in prepared.trainable}
        self.optimizer = NeuronAdamW([(p, axis) for _, p, axis in prepared.trainable], lr=config.lr,
                                     weight_decay=config.weight_decay)
        self.step, self.best_loss, self.best_step = 0, math.inf, -1
        self.best = self.snapshot()
        # method.factor_rounds: re-align the fixed factors before these steps (evenly spaced), round 1, 2, ...
        rounds = prepared.factor_rounds
        self.realign_at = [round(k * config.steps / rounds) for k in range(1, rounds)]
        self.rank, self.world_size = world()
        self.forward_model = (DistributedDataParallel(TargetLoss(self.model)) if self.world_size > 1 and self.params
                              else self.model)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable weights and the fixed tensors they are read with (the aligned factors, the
        earlier rounds): what "the best weights" means once factors are re-aligned during training."""
        return {n: t.detach().clone() for n, t in (self.params | self.prepared.fixed).items()}

    def batch(self, items: list[tuple[object, Example]]) -> Batch:
        return Batch.of(items, self.pad_id, self.pair_id if self.prepared.routed else None)

    @torch.no_grad()
    def dev_loss(self) -> float:
        self.model.eval()
        total, tokens = 0.0, 0
        for start in range(0, len(self.dev), self.config.batch_size):
            batch = self.batch(self.dev[start : start + self.config.batch_size])
            n = int((batch.tensors["labels"][:, 1:] != IGNORE).sum())
            total += mean_target_loss(self.model, batch).item() * n
            tokens += n
        self.model.train()
        return total / max(tokens, 1)

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        tmp = self.output / (CHECKPOINT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().contiguous() for n, p in self.params.items()}, tmp / "trainable.safetensors")
        save_file({n: t.contiguous() for n, t in self.best.items()}, tmp / "best.safetensors")
        if self.prepared.fixed:
            save_file({n: t.contiguous() for n, t in self.prepared.fixed.items()}, tmp / "fixed.safetensors")
        optim = {}
        for name, p, _ in self.prepared.trainable:
            for key, value in self.optimizer.state.get(p, {}).items():
                optim[f"{name}/{key}"] = value.contiguous()
        optim["__rng__"] = torch.get_rng_state()
        save_file(optim, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(
            {"step": self.step, "best_loss": self.best_loss, "best_step": self.best_step,
             "fingerprint": self.fingerprint}))
        final = self.output / CHECKPOINT
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def load_checkpoint(self) -> bool:
        folder = self.output / CHECKPOINT
        if not (folder / "state.json").exists():
            return False
        state = json.loads((folder / "state.json").read_text())
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:  # absent: written before it was stored
            raise ValueError(f"{folder}: the checkpoint was written with other settings (method, train or data "
                             "changed since): train into another --output, or delete the checkpoint to start over")
        trainable = load_file(folder / "trainable.safetensors")
        if set(trainable) != set(self.params):
            raise ValueError(f"{folder}: checkpoint parameters do not match this run's method and layers")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(trainable[n])
        fixed = load_file(folder / "fixed.safetensors") if self.prepared.fixed else {}
        if set(fixed) != set(self.prepared.fixed):
            raise ValueError(f"{folder}: checkpoint fixed factors do not match this run's method and layers")
        self.best = fixed | load_file(folder / "best.safetensors")  # best lacked the fixed ones before rounds
        with torch.no_grad():
            for n, t in self.prepared.fixed.items():
                t.copy_(fixed[n])
        optim = load_file(folder / "optimizer.safetensors")
        torch.set_rng_state(optim.pop("__rng__"))
        for name, p, _ in self.prepared.trainable:
            entries = {k.split("/", 1)[1]: v for k, v in optim.items() if k.split("/", 1)[0] == name}
            if entries:
                self.optimizer.state[p] = entries
        self.step, self.best_loss, self.best_step = state["step"], state["best_loss"], state["best_step"]
        return True

    def align_factors(self, batches: int, parts: tuple[str, ...], first_batch: int = 0) -> None:
        """method.update_factor "gradient[-down]": the DeltaFFNs' fixed factors of `parts` from their base weights'
        loss gradient (at the current weights) summed over `batches` batches of the data order from `first_batch`
        (landermt.routing.aligned_factor); before step 1, and at each new round of factors (`realign`)."""
        modules = [m for m in self.model.modules() if isinstance(m, DeltaFFN) and m.fixed_factors(parts)]
        weights = [(m, name, getattr(m, name).weight) for m in modules for name in m.fixed_factors(parts)]
        stream = tqdm(order_batches(self.examples, self.lengths, self.config, first_batch, batches, self.pad_id,
                                    self.pair_id if self.prepared.routed else None),
                      total=batches, desc="align factors", unit="batch", disable=self.rank != 0,
                      leave=first_batch == 0)
        sums = summed_gradients(self.model, stream, [w for _, _, w in weights])
        for module in modules:
            module.align_factors({name: total for (m, name, _), total in zip(weights, sums, strict=True)
                                  if m is module})

    def realign(self, round_index: int) -> None:
        """Start round `round_index` + 1 of the fixed factors (method.factor_rounds; DeltaFFN.retire): the trained
        numbers so far join the frozen earlier rounds, restart from zero with fresh optimizer state, and the factors
        are aligned anew to the loss gradient on the next batches the run will train on (GaLore's choice)."""
        for module in self.model.modules():
            if isinstance(module, DeltaFFN) and module.earlier_rounds():
                for p in module.retire(round_index):
                    self.optimizer.state.pop(p, None)
        self.align_factors(ALIGN_BATCHES, ("up", "gate", "down"), first_batch=self.step * self.config.grad_accum)

    # --- the loop ----------------------------------------------------------------------------
    def train(self, log: Callable[[dict], None]) -> dict[str, torch.Tensor]:
        """Run to `config.steps`; returns the best weights by dev loss (`snapshot`: with the fixed tensors)."""
        c = self.config
        self.model.train()
        bar = tqdm(total=c.steps, initial=self.step, desc="finetune", unit="step", disable=self.rank != 0)
        start = time.monotonic()
        reset_peak_rss()
        while self.step < c.steps:
            realigned = None
            if self.step in self.realign_at:
                began = time.monotonic()
                self.realign(self.realign_at.index(self.step))
                realigned = round(time.monotonic() - began, 1)
            round_start = max([0] + [s for s in self.realign_at if s <= self.step]) if c.rewarm_rounds else 0
            lr = lr_at(self.step, c, round_start)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, padding = 0.0, 0.0
            for micro in range(c.grad_accum):
                rows = rows_of_batch(self.lengths, c.batch_size, c.seed, self.step * c.grad_accum + micro,
                                     c.bucket_batches)
                batch = self.batch([self.examples[r] for r in rows[self.rank :: self.world_size]])
                sync = micro == c.grad_accum - 1 or self.forward_model is self.model
                with contextlib.nullcontext() if sync else self.forward_model.no_sync():
                    loss = mean_target_loss(self.forward_model, batch)
                    (loss / c.grad_accum).backward()
                loss_sum += loss.item() / c.grad_accum
                padding += padding_share(batch.tensors) / c.grad_accum
            params = list(self.params.values())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm).item()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            entry = {"step": self.step, "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                     "padding_share": round(padding, 4),
                     "seconds": round(time.monotonic() - start, 1), "peak_rss_mib": peak_rss_mib()}
            if realigned is not None:
                entry["realigned_s"] = realigned
            if self.dev and (self.step % c.eval_every == 0 or self.step == c.steps):
                entry["dev_loss"] = round(self.dev_loss(), 5)
                if entry["dev_loss"] < self.best_loss:
                    self.best_loss, self.best_step = entry["dev_loss"], self.step
                    self.best = self.snapshot()
            if self.rank == 0:
                log(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", **({"dev": entry["dev_loss"]} if "dev_loss" in entry else {}))
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self.save_checkpoint()
        bar.close()
        if not self.dev:
            self.best = self.snapshot()
        return self.best
