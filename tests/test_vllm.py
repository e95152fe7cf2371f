"""The vLLM backend (landermt/vllm, server/vllm_backend.py) against the torch backend, on a real vLLM engine.

A tiny random Gemma 3 (head_dim 32: the CPU attention backend has no kernel for 16), and a tiny Llama, get an
artifact built by landermt.build on two of their layers, with perturbed FFN weights, so routing and the
artifact's trained weights both change what they generate. Every comparison is token-exact: vLLM's result must equal
landermt.generate.greedy's (text, prompt tokens, generated tokens) with the same artifact on the Hugging
Face model, for several language pairs in one batch.

Skipped only when vLLM is not installed and LANDERMT_REQUIRE_VLLM is unset; CI sets it (scripts/test.sh).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("vllm") is None and not os.environ.get("LANDERMT_REQUIRE_VLLM"):
    pytest.skip("vLLM is not installed (pip install -e '.[vllm]')", allow_module_level=True)

import httpx
import torch
import uvicorn
from transformers import LlamaConfig, LlamaForCausalLM

from landermt.artifact import ffn_weights, load_artifact, save_artifact
from landermt.build import build
from landermt.data import training_corpora
from landermt.decode import Request, RunningBatch
from landermt.families import family_of
from landermt.generate import decoded, greedy, stop_token_ids
from landermt.models import load_model
from landermt.prompts import render_prompt
from landermt.routing import route
from landermt.vllm import PAIR_ID_KEY, cache_salt
from landermt.vllm.runner import request_pair_id
from server.app import create_app
from server.engine import Engine
from server.jobs import JobStore
from server.metrics import Metrics
from server.settings import Settings
from tests.conftest import PARALLEL, train_tokenizer, write_corpora
from training.config import TinyModelConfig
from training.tiny import tiny_gemma

MAX_NEW = 16
REQUESTS = itertools.count()  # request ids
# CPU engine options: a small KV cache, the CPU backend's 32-token blocks, short sequences.
ENGINE = dict(block_size=32, kv_cache_memory_bytes=64 << 20, max_model_len=256)
# (source, target, text): six pairs in one batch, both directions of en-de among them (one routing row).
ROWS = [("en", "de", PARALLEL["de"][0][0]), ("de", "en", PARALLEL["de"][1][1]), ("fr", "zh", PARALLEL["fr"][2][1]),
        ("zh", "en", PARALLEL["zh"][3][1]), ("en", "fr", PARALLEL["fr"][4][0]), ("de", "fr", PARALLEL["de"][5][1])]


def build_tiny(root: Path, model, routing: str = "mask") -> Path:
    """root/base_model (the model + tokenizer) and root/artifact (layers 1 and 2, trained-looking weights: rule
    mask, moved FFN weights; rule delta, a random update of the FFNs and the attention projections)."""
    tokenizer = train_tokenizer()
    model.save_pretrained(root / "base_model")
    tokenizer.save_pretrained(root / "base_model")
    write_corpora(root / "data")
    manifest, partition = build(model, tokenizer, training_corpora(root / "data"), k=2, epsilon=0.5,
                                detect_samples=4, score_samples=6, batch_size=4, layers=[1, 2], model_name="tiny")
    family = family_of(model)
    torch.manual_seed(1)
    if routing == "delta":  # what training would write: an update of every selected layer's FFN and attention weights
        update = {f"layers.{layer}.{name}.weight": 0.05 * torch.randn_like(param)
                  for layer in manifest.layers for name, param in [
                      (n.removesuffix(".weight"), p) for n, p in family.ffns(model)[layer].named_parameters()]}
        update |= {f"layers.{layer}.{path}.weight": 0.05 * torch.randn_like(
            family.decoder_layers(model)[layer].get_submodule(path).weight)
            for layer in manifest.layers for path in family.attention}
        save_artifact(root / "artifact", dataclasses.replace(manifest, routing="delta"), partition, update=update)
        return root
    with torch.no_grad():  # what training would do: move the selected layers' FFN weights
        for layer in manifest.layers:
            for param in family.ffns(model)[layer].parameters():
                param.add_(0.05 * torch.randn_like(param))
    save_artifact(root / "artifact", manifest, partition, ffn_weights(model, family, manifest.layers))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("gemma"), tiny_gemma(TinyModelConfig(), len(train_tokenizer())))


def torch_backend(built: Path):
    """The torch backend's model: the base model with the artifact applied (checks the base hash)."""
    artifact = load_artifact(built / "artifact")
    model, tokenizer = load_model(str(built / "base_model"), artifact.dtype)
    artifact.apply(model)
    return model, tokenizer, artifact


@pytest.fixture(scope="module")
def reference(built):
    return torch_backend(built)


def prompts_and_ids(artifact, rows) -> tuple[list[str], list[int]]:
    prompts = [render_prompt(artifact.manifest.prompt_template, s, t, text) for s, t, text in rows]
    return prompts, [artifact.partition.pair_id(s, t) for s, t, _ in rows]


@pytest.fixture(scope="module")
def loop():
    """One event loop thread for every AsyncLLM here (and the HTTP server): vLLM's output handler
    stays on the loop it started on."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def run(loop, coroutine, timeout: float = 120):
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)


def settings_for(built: Path, **overrides) -> Settings:
    return Settings(artifact=str(built / "artifact"), model=str(built / "base_model"), dtype="float32",
                    max_batch_size=8, max_new_tokens=MAX_NEW, gpu_memory_utilization=0.2, **overrides)


@torch.no_grad()
def torch_tokens(model, tokenizer, prompts: list[str], ids: list[int]) -> list[list[int]]:
    """The token ids landermt.generate.greedy generates (its model.generate call), each row cut after its
    first stop token: greedy itself returns only text and counts, and random models' text is mostly
    undecodable bytes, so ids are what make the comparison exact."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    stops = stop_token_ids(tokenizer)
    with route(torch.tensor(ids)):
        output = model.generate(**encoded, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops,
                                pad_token_id=tokenizer.pad_token_id)
    rows = output[:, encoded["input_ids"].shape[1]:].tolist()
    return [row[: next((n + 1 for n, t in enumerate(row) if t in stops), len(row))] for row in rows]


async def vllm_tokens(engine: Engine, prompt: str, pair_id: int, salt_of: int | None = None):
    """(generated ids, prompt tokens served from the prefix cache) of one request built by the engine;
    `salt_of` replaces its cache salt by another pair's."""
    tokens, params = engine.backend.request(engine.tokenizer(prompt).input_ids, pair_id, MAX_NEW)
    if salt_of is not None:
        tokens["cache_salt"] = cache_salt(salt_of)
    generated, cached = [], None
    async for output in engine.backend.llm.generate(tokens, params, request_id=f"test-{next(REQUESTS)}"):
        generated += output.outputs[0].token_ids
        cached = output.num_cached_tokens
    return generated, cached


async def batch(engine: Engine, prompts: list[str], ids: list[int]) -> list[list[int]]:
    """All prompts submitted at once: vLLM schedules them into the same steps."""
    results = await asyncio.gather(*(vllm_tokens(engine, p, i) for p, i in zip(prompts, ids, strict=True)))
    return [generated for generated, _ in results]


def check_parity(engine: Engine, reference, prompts: list[str], ids: list[int], got: list[list[int]]) -> None:
    """Token ids equal the torch backend's, and so do the engine's results (text, prompt and new tokens)."""
    model, tokenizer, _ = reference
    assert got == torch_tokens(model, tokenizer, prompts, ids)
    results = [decoded(tokenizer, len(tokenizer(p).input_ids), g) for p, g in zip(prompts, got, strict=True)]
    assert results == greedy(model, tokenizer, prompts, ids, MAX_NEW)


@pytest.fixture(scope="module")
def eager(built, loop, tmp_path_factory):
    """Eager vLLM with chunked prefill (32 tokens per step, fewer than one prompt) and prefix caching,
    behind the real HTTP API on a loopback port. Yields (engine, base URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = settings_for(built, port=port, max_texts=8, max_chars=400, backend="vllm")
    engine = Engine.load(settings, Metrics(), enforce_eager=True, max_num_batched_tokens=32, **ENGINE)
    store = JobStore(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3")
    server = uvicorn.Server(uvicorn.Config(create_app(engine, store), host="127.0.0.1", port=port,
                                           log_level="warning"))
    serving = asyncio.run_coroutine_threadsafe(server.serve(), loop)
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and not serving.done(), "server did not start"
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}"
    server.should_exit = True
    serving.result(timeout=60)  # lifespan shutdown stops the engine and vLLM


def test_mixed_pairs_in_one_batch_match_torch_eager_with_chunked_prefill(eager, reference, loop):
    engine, _ = eager
    model, tokenizer, artifact = reference
    prompts, ids = prompts_and_ids(artifact, ROWS)
    assert all(len(tokenizer(p).input_ids) > 32 for p in prompts)  # every prefill is split over steps
    got = run(loop, batch(engine, prompts, ids))
    check_parity(engine, reference, prompts, ids, got)
    assert got != torch_tokens(model, tokenizer, prompts, [0] * len(ids))  # routing changes the output


def test_prefix_cache_is_reused_within_a_pair_and_salted_between_pairs(eager, reference, loop):
    engine, _ = eager
    model, tokenizer, artifact = reference
    # one prompt (English to Chinese: no other test's prompt starts like it) under two pairs
    prompt = render_prompt(artifact.manifest.prompt_template, "en", "zh", " ".join(en for en, _ in PARALLEL["zh"]))
    full_blocks = 32 * ((len(tokenizer(prompt).input_ids) - 1) // 32)  # what a cache hit can cover
    assert full_blocks >= 64
    first, second = artifact.partition.pair_id("en", "zh"), artifact.partition.pair_id("de", "fr")
    want = {i: torch_tokens(model, tokenizer, [prompt], [i])[0] for i in (first, second)}
    assert want[first] != want[second]
    assert run(loop, vllm_tokens(engine, prompt, first)) == (want[first], 0)
    assert run(loop, vllm_tokens(engine, prompt, first)) == (want[first], full_blocks)  # same pair: reused
    assert run(loop, vllm_tokens(engine, prompt, second)) == (want[second], 0)  # another pair: no reuse
    # the salt is what keeps them apart: with the first pair's salt, the first pair's KV would be reused
    assert run(loop, vllm_tokens(engine, prompt, second, salt_of=first))[1] == full_blocks


def test_beam_search_matches_torch_over_http(eager, reference):
    """num_beams and alternatives over HTTP: vLLM's n-best texts are the torch decoder's (float32)."""
    engine, url = eager
    model, tokenizer, artifact = reference
    prompts, ids = prompts_and_ids(artifact, ROWS[:3])
    batch = RunningBatch(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), routed=True)
    done = batch.admit([Request(i, tokenizer(p).input_ids, pair, MAX_NEW, beams=3)
                        for i, (p, pair) in enumerate(zip(prompts, ids, strict=True))])
    while len(batch):
        done += batch.decode()
    for request in sorted(done, key=lambda r: r.key):
        source, target, text = ROWS[request.key]
        want = list(dict.fromkeys(decoded(tokenizer, request.prompt_tokens, h).text for h in request.hypotheses))
        got = httpx.post(f"{url}/translate", json={"q": text, "source": source, "target": target, "num_beams": 3,
                                                   "alternatives": 2}, timeout=120).json()
        assert [got["translatedText"], *got["alternatives"]] == want


def test_cache_salt_and_pair_id_on_every_request(eager, reference, loop):
    """Over HTTP (translations and a job), every request handed to vLLM carries its pair's id and salt,
    and the results are the torch backend's."""
    engine, url = eager
    model, tokenizer, artifact = reference
    sent = []
    generate = engine.backend.llm.generate
    first_tokens = first_token_count(url)  # the engine is the module's: earlier tests' rows are counted already

    def recording(prompt, params, **kwargs):  # pass-through: the real engine still generates
        sent.append((prompt, params))
        return generate(prompt, params, **kwargs)

    engine.backend.llm.generate = recording
    try:
        async def translate_all():
            async with httpx.AsyncClient(timeout=60) as client:
                responses = await asyncio.gather(*(client.post(f"{url}/translate", json={
                    "q": text, "source": s, "target": t}) for s, t, text in ROWS))
            return [r.json()["translatedText"] for r in responses]

        texts = run(loop, translate_all())
        lines = "\n".join(json.dumps({"id": str(n), "text": text, "source": s, "target": t}, ensure_ascii=False)
                          for n, (s, t, text) in enumerate(ROWS[:3]))
        job = httpx.post(f"{url}/jobs", content=lines, headers={"content-type": "application/x-ndjson"}, timeout=30)
        assert job.status_code == 201
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/jobs/{job.json()['id']}", timeout=10).json()["status"] != "completed":
            assert time.monotonic() < deadline, "job did not finish"
            time.sleep(0.2)
        results = httpx.get(f"{url}/jobs/{job.json()['id']}/results", timeout=10).text
    finally:
        engine.backend.llm.generate = generate
    prompts, ids = prompts_and_ids(artifact, ROWS)
    assert texts == [g.text for g in greedy(model, tokenizer, prompts, ids, MAX_NEW)]
    assert [json.loads(line)["translation"] for line in results.splitlines()] == texts[:3]
    assert len(sent) == len(ROWS) + 3
    for prompt, params in sent:
        pair_id = params.extra_args[PAIR_ID_KEY]
        assert prompt["cache_salt"] == cache_salt(pair_id) and pair_id in ids
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'landermt_generated_tokens_total{pair="en-de"}' in metrics
    assert first_token_count(url) == first_tokens + len(ROWS) + 3


def first_token_count(url: str) -> float:
    """How many rows the server has timed to their first token (its Prometheus histogram's count)."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^landermt_time_to_first_token_seconds_count (\S+)$", metrics, re.MULTILINE).group(1))


def test_compiled_matches_torch(built, reference, loop, tmp_path, monkeypatch):
    """vLLM's default CPU mode: the routed model torch.compiled (inductor) with pair_ids a dynamic input."""
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))  # a fresh compile cache: the model is compiled here
    prompts, ids = prompts_and_ids(reference[2], ROWS)
    engine = Engine.load(settings_for(built, backend="vllm"), Metrics(), **ENGINE)
    try:
        got = run(loop, batch(engine, prompts, ids), timeout=300)
    finally:
        engine.backend.llm.shutdown()
    check_parity(engine, reference, prompts, ids, got)
    assert list((tmp_path / "torch_compile_cache").rglob("*.so")), "the model was not compiled"


@pytest.mark.parametrize("routing", ["mask", "delta"])
def test_llama_mixed_pairs_match_torch(tmp_path, loop, routing):
    """The Llama-architecture routed model, eager, under both rules."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(train_tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    built = build_tiny(tmp_path, LlamaForCausalLM(config).eval(), routing)
    reference = torch_backend(built)
    prompts, ids = prompts_and_ids(reference[2], ROWS)
    engine = Engine.load(settings_for(built, backend="vllm"), Metrics(), enforce_eager=True, **ENGINE)
    try:
        got = run(loop, batch(engine, prompts, ids))
    finally:
        engine.backend.llm.shutdown()
    check_parity(engine, reference, prompts, ids, got)


@pytest.fixture(scope="module")
def built_delta(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("gemma-delta"), tiny_gemma(TinyModelConfig(), len(train_tokenizer())),
                      routing="delta")


@pytest.mark.parametrize("eager", [True, False], ids=["eager-chunked-prefill", "compiled"])
def test_delta_rule_mixed_pairs_match_torch(built_delta, loop, tmp_path, monkeypatch, eager):
    """Rule delta (the general update merged into the weights, the specific neurons' update per token) gives the
    torch backend's tokens for six pairs in one batch, eager with chunked prefill and compiled."""
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    reference = torch_backend(built_delta)
    model, tokenizer, artifact = reference
    assert artifact.manifest.routing == "delta"
    prompts, ids = prompts_and_ids(artifact, ROWS)
    options = dict(enforce_eager=True, max_num_batched_tokens=32) if eager else {}
    engine = Engine.load(settings_for(built_delta, backend="vllm"), Metrics(), **options, **ENGINE)
    try:
        got = run(loop, batch(engine, prompts, ids), timeout=300)
    finally:
        engine.backend.llm.shutdown()
    check_parity(engine, reference, prompts, ids, got)
    assert got != torch_tokens(model, tokenizer, prompts, [0] * len(ids))  # the update changes the output


def test_pair_id_range_per_rule():
    """Rule mask serves id 0 (the base model); a delta artifact's vLLM model serves its pairs only."""
    params = [SimpleNamespace(extra_args={PAIR_ID_KEY: i}) for i in (0, 3)] + [SimpleNamespace(extra_args=None)]
    assert [request_pair_id(p, 4) for p in params] == [0, 3, 0]
    assert request_pair_id(params[1], 4, first_row=1) == 3
    for p in (params[0], params[2]):
        with pytest.raises(ValueError, match="does not serve 0"):
            request_pair_id(p, 4, first_row=1)
    with pytest.raises(ValueError, match="0…3"):
        request_pair_id(SimpleNamespace(extra_args={PAIR_ID_KEY: 4}), 4)
