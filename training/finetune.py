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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from landermt.prompts import IGNORE, Example, collate
from landermt.routing import route
from training.config import TrainConfig
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


def mean_target_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (labels != IGNORE)."""
    with route(batch.pair_ids):
        logits = model(input_ids=batch.tensors["input_ids"], attention_mask=batch.tensors["attention_mask"],
                       use_cache=False).logits
    logits = logits[:, :-1].float()
    labels = batch.tensors["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE)


@functools.lru_cache(maxsize=2)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def rows_of_batch(n_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Example indices of global batch `index`: epochs are seeded permutations laid end to end."""
    return [_epoch_order(n_examples, seed, position // n_examples)[position % n_examples]
            for position in range(index * batch_size, (index + 1) * batch_size)]


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over warmup_ratio·steps, then linear decay to zero."""
    warmup = max(1, math.ceil(config.warmup_ratio * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * max(0.0, (config.steps - step) / max(1, config.steps - warmup))


class Trainer:
    def __init__(self, prepared: Prepared, examples: list[tuple[object, Example]], dev: list[tuple[object, Example]],
                 pair_id: Callable[[object], int], pad_id: int, config: TrainConfig, output: Path):
        self.model, self.prepared, self.config, self.output = prepared.model, prepared, config, Path(output)
        self.examples, self.dev, self.pair_id, self.pad_id = examples, dev, pair_id, pad_id
        self.params = {name: p for name, p, _ in prepared.trainable}
        self.optimizer = NeuronAdamW([(p, axis) for _, p, axis in prepared.trainable], lr=config.lr,
                                     weight_decay=config.weight_decay)
        self.step, self.best_loss, self.best_step = 0, math.inf, -1
        self.best = {n: p.detach().clone() for n, p in self.params.items()}
        self.rank, self.world_size = world()
        self.forward_model = (DistributedDataParallel(self.model) if self.world_size > 1 and self.params
                              else self.model)

    def batch(self, items: list[tuple[object, Example]]) -> Batch:
        pair_ids = torch.tensor([self.pair_id(p) for p, _ in items]) if self.prepared.routed else None
        return Batch(collate([e for _, e in items], self.pad_id), pair_ids)

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
        optim = {}
        for name, p, _ in self.prepared.trainable:
            for key, value in self.optimizer.state.get(p, {}).items():
                optim[f"{name}/{key}"] = value.contiguous()
        optim["__rng__"] = torch.get_rng_state()
        save_file(optim, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(
            {"step": self.step, "best_loss": self.best_loss, "best_step": self.best_step}))
        final = self.output / CHECKPOINT
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def load_checkpoint(self) -> bool:
        folder = self.output / CHECKPOINT
        if not (folder / "state.json").exists():
            return False
        state = json.loads((folder / "state.json").read_text())
        trainable = load_file(folder / "trainable.safetensors")
        if set(trainable) != set(self.params):
            raise ValueError(f"{folder}: checkpoint parameters do not match this run's method and layers")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(trainable[n])
        self.best = load_file(folder / "best.safetensors")
        optim = load_file(folder / "optimizer.safetensors")
        torch.set_rng_state(optim.pop("__rng__"))
        for name, p, _ in self.prepared.trainable:
            entries = {k.split("/", 1)[1]: v for k, v in optim.items() if k.split("/", 1)[0] == name}
            if entries:
                self.optimizer.state[p] = entries
        self.step, self.best_loss, self.best_step = state["step"], state["best_loss"], state["best_step"]
        return True

    # --- the loop ----------------------------------------------------------------------------
    def train(self, log: Callable[[dict], None]) -> dict[str, torch.Tensor]:
        """Run to `config.steps`; returns the best trainable weights (by dev loss)."""
        c = self.config
        self.model.train()
        bar = tqdm(total=c.steps, initial=self.step, desc="finetune", unit="step", disable=self.rank != 0)
        start = time.monotonic()
        reset_peak_rss()
        while self.step < c.steps:
            lr = lr_at(self.step, c)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(c.grad_accum):
                rows = rows_of_batch(len(self.examples), c.batch_size, c.seed, self.step * c.grad_accum + micro)
                rows = rows[self.rank :: self.world_size]
                sync = micro == c.grad_accum - 1 or self.forward_model is self.model
                with contextlib.nullcontext() if sync else self.forward_model.no_sync():
                    loss = mean_target_loss(self.forward_model, self.batch([self.examples[r] for r in rows]))
                    (loss / c.grad_accum).backward()
                loss_sum += loss.item() / c.grad_accum
            params = list(self.params.values())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm).item()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            entry = {"step": self.step, "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                     "seconds": round(time.monotonic() - start, 1), "peak_rss_mib": peak_rss_mib()}
            if self.dev and (self.step % c.eval_every == 0 or self.step == c.steps):
                entry["dev_loss"] = round(self.dev_loss(), 5)
                if entry["dev_loss"] < self.best_loss:
                    self.best_loss, self.best_step = entry["dev_loss"], self.step
                    self.best = {n: p.detach().clone() for n, p in self.params.items()}
            if self.rank == 0:
                log(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", **({"dev": entry["dev_loss"]} if "dev_loss" in entry else {}))
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self.save_checkpoint()
        bar.close()
        if not self.dev:
            self.best = {n: p.detach().clone() for n, p in self.params.items()}
        return self.best
