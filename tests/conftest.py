"""Tiny random models of every supported family, with a tokenizer trained here (no downloads); a test server."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from training import tiny as training_tiny

PARALLEL = {
    "de": [("The cat sleeps on the warm mat.", "Die Katze schläft auf der warmen Matte."),
           ("We are going to the market today.", "Wir gehen heute auf den Markt."),
           ("The weather is very nice this morning.", "Das Wetter ist heute Morgen sehr schön."),
           ("My brother reads a long book.", "Mein Bruder liest ein langes Buch."),
           ("Where is the train station?", "Wo ist der Bahnhof?"),
           ("She drinks coffee with milk.", "Sie trinkt Kaffee mit Milch.")],
    "fr": [("The cat sleeps on the warm mat.", "Le chat dort sur le tapis chaud."),
           ("We are going to the market today.", "Nous allons au marché aujourd'hui."),
           ("The weather is very nice this morning.", "Il fait très beau ce matin."),
           ("My brother reads a long book.", "Mon frère lit un long livre."),
           ("Where is the train station?", "Où est la gare ?"),
           ("She drinks coffee with milk.", "Elle boit du café au lait.")],
    "zh": [("The cat sleeps on the warm mat.", "猫睡在温暖的垫子上。"),
           ("We are going to the market today.", "我们今天去市场。"),
           ("The weather is very nice this morning.", "今天早上天气很好。"),
           ("My brother reads a long book.", "我哥哥读一本很长的书。"),
           ("Where is the train station?", "火车站在哪里？"),
           ("She drinks coffee with milk.", "她喝加牛奶的咖啡。")],
}


def corpus_lines() -> list[str]:
    lines = [text for pairs in PARALLEL.values() for pair in pairs for text in pair]
    lines += ["Translate the following text from English to German.", "English: German: French: Chinese:"]
    return lines


def train_tokenizer() -> PreTrainedTokenizerFast:
    return training_tiny.train_tokenizer(corpus_lines(), vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer()


def tiny_model(family: str, vocab_size: int, sliding_window: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if family == "gemma":
        config = Gemma3TextConfig(**common, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=16, sliding_window=sliding_window, max_position_embeddings=256)
        model = Gemma3ForCausalLM(config)
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=64, num_attention_heads=2,
                                             num_key_value_heads=1, max_position_embeddings=256))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, intermediate_size=64, num_attention_heads=2,
                                             num_key_value_heads=1, max_position_embeddings=256))
    elif family == "bloom":
        config = BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=4, n_head=2, bos_token_id=1,
                             eos_token_id=2, pad_token_id=0)
        model = BloomForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=2, n_positions=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    with torch.no_grad():  # random biases too, so bias handling is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


FAMILY_NAMES = ["gemma", "llama", "qwen2", "bloom", "gpt2"]


@pytest.fixture(params=FAMILY_NAMES)
def family_model(request, tokenizer):
    return tiny_model(request.param, len(tokenizer))


def write_corpora(root) -> None:
    """A data directory in the shared layout: train/en-XX.tsv.gz."""
    (root / "train").mkdir(parents=True)
    for lang, pairs in PARALLEL.items():
        with gzip.open(root / "train" / f"en-{lang}.tsv.gz", "wt", encoding="utf-8") as f:
            f.write(f"en\t{lang}\tsource\n")
            for en, xx in pairs:
                f.write(f"{en}\t{xx}\ttest\n")


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke preset trained once per test session: OUT/base_model (tiny model) and OUT/artifact.
    Tests only read it."""
    from training.run import main as run_main

    out = tmp_path_factory.mktemp("smoke")
    run_main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--output", str(out)])
    return out


@pytest.fixture(scope="module")
def server(smoke_run, tmp_path_factory) -> Iterator[str]:
    """The smoke-preset artifact served by the real app under uvicorn on a loopback port: its base URL."""
    from server.app import create_app
    from server.engine import Engine
    from server.jobs import JobStore
    from server.metrics import Metrics
    from server.settings import Settings

    settings = Settings(artifact=str(smoke_run / "artifact"), model=str(smoke_run / "base_model"), port=free_port(),
                        max_batch_size=8, max_wait_ms=20, max_texts=4, max_chars=200, max_new_tokens=12)
    engine = Engine.load(settings, Metrics())
    store = JobStore(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3")
    with serving(create_app(engine, store), settings.port) as base:
        yield base


@contextmanager
def serving(app, port: int) -> Iterator[str]:
    """Run `app` under uvicorn on a loopback port in a thread: yields its base URL, stops it afterwards."""
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=30)
