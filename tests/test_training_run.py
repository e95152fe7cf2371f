"""`python -m training.run` end to end on the smoke preset: stages, caching, resume after kill -9,
config errors, and every method."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from landermt.artifact import load_artifact
from landermt.models import load_model
from training.config import ConfigError, load_config
from training.methods import prepare
from training.run import main as run_main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def smoke_config(tmp_path: Path, **changes) -> Path:
    config = yaml.safe_load(SMOKE.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(config: Path, output: Path, *extra: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.run", "--config", str(config), "--output", str(output),
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_smoke_pipeline_writes_everything_and_caches_stages(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(SMOKE, out)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    for name in ("config.yaml", "train_log.jsonl", "eval.json", "eval.md", "trained.safetensors",
                 "artifact/manifest.json", "artifact/partitions.safetensors", "artifact/update.safetensors"):
        assert (out / name).exists(), name
    results = json.loads((out / "eval.json").read_text())
    assert set(results["testsets"]["flores"]) == {f"{a}-{b}" for x in ("de", "fr", "it", "ar", "zh")
                                                   for a, b in (("en", x), (x, "en"))}
    assert all(0 <= r["off_target"] <= 1 and "nrefs:1" in r["bleu_signature"]
               for r in results["testsets"]["flores"].values())
    assert set(results["perplexity"]) == {"en", "de", "fr", "it", "ar", "zh"}
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))

    artifact = load_artifact(out / "artifact")  # the delta rule (the default): only the update is stored
    assert artifact.manifest.routing == "delta" and artifact.ffn is None
    changed = {key.split(".")[1] for key, value in artifact.update.items() if value.any()}
    assert changed == {str(i) for i in artifact.manifest.layers}  # trained, and only the selected layers

    written = (out / "artifact" / "update.safetensors").stat().st_mtime_ns
    again = run_cli(SMOKE, out)
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and all(f"{s}: cached" in log
                                         for s in ("partition", "finetune", "artifact", "evaluate")), log
    assert (out / "artifact" / "update.safetensors").stat().st_mtime_ns == written  # not written again

    # a larger eval.limit translates only the new sentences, and ends as if it had translated them all
    more = smoke_config(tmp_path, eval__limit=6)
    extended = run_cli(more, out)
    log, _ = extended.communicate(timeout=300)
    assert extended.returncode == 0 and "evaluate: reusing 40 stored translations" in log, log
    grown = json.loads((out / "eval.json").read_text())["testsets"]["flores"]
    assert all(grown[d]["outputs"][:4] == r["outputs"] and len(grown[d]["outputs"]) == 6
               for d, r in results["testsets"]["flores"].items())
    (out / "eval.json").unlink()
    straight = run_cli(more, out)
    log, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0 and "reusing" not in log, log
    assert json.loads((out / "eval.json").read_text())["testsets"]["flores"] == grown

    # any other evaluation setting changed: nothing is reused
    other = run_cli(smoke_config(tmp_path, eval__limit=6, eval__max_new_tokens=12), out)
    log, _ = other.communicate(timeout=300)
    assert other.returncode == 0 and "reusing" not in log, log


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    config = smoke_config(tmp_path, train__steps=150, train__checkpoint_every=5, train__eval_every=50)
    reference = run_cli(config, tmp_path / "straight")
    assert reference.wait(timeout=600) == 0

    out = tmp_path / "killed"
    proc = run_cli(config, out, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint" / "state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 0 < step < 150

    refused = run_cli(config, out)
    log, _ = refused.communicate(timeout=300)
    assert refused.returncode != 0 and "pass --resume" in log
    other = smoke_config(tmp_path, train__steps=150, train__checkpoint_every=5, train__eval_every=50, train__lr=3e-3)
    mixed = run_cli(other, out, "--resume")  # another learning rate would continue a run it did not start
    log, _ = mixed.communicate(timeout=300)
    assert mixed.returncode != 0 and "written with other settings" in log, log

    resumed = run_cli(config, out, "--resume")
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resuming at step" in log, log
    want, got = load_file(tmp_path / "straight" / "trained.safetensors"), load_file(out / "trained.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 151))  # nothing lost, nothing duplicated


@pytest.mark.parametrize("method", ["zero_shot", "few_shot", "full", "lora", "layers", "ls", "lg"])
def test_every_method_runs_through_the_same_pipeline(tmp_path, method):
    # with the quick-tuned preset's update settings, which the baselines of its tables run with too
    config = smoke_config(tmp_path, method__name=method, method__update_rank=4, method__update_factor="gradient",
                          train__steps=4, eval__limit=2)
    run_main(["--config", str(config), "--output", str(tmp_path / method)])
    results = json.loads((tmp_path / method / "eval.json").read_text())
    assert results["method"] == method and len(results["testsets"]["flores"]) == 10
    trained = (tmp_path / method / "trained.safetensors").exists()
    assert trained == (method not in ("zero_shot", "few_shot"))
    assert (tmp_path / method / "artifact" / "update.safetensors").exists() == (method in ("ls", "lg"))


def test_an_attention_update_trains_and_lands_in_the_artifact(tmp_path):
    """method.attention_rank: the attention projections' update trains beside the FFNs' and lands in the artifact's
    update.safetensors."""
    from landermt.artifact import attention_keys
    from landermt.families import family_named

    config = smoke_config(tmp_path, method__attention_rank=2, train__steps=4, eval__limit=2)
    out = tmp_path / "attention"
    run_main(["--config", str(config), "--output", str(out)])
    artifact = load_artifact(out / "artifact")
    keys = attention_keys(artifact.update, family_named(artifact.manifest.base_model.model_type))
    assert len(keys) == 4 * len(artifact.manifest.layers)  # q, k, v, o of every routed layer
    assert all(artifact.update[key].abs().sum() > 0 for key in keys)
    trained = {k for k in load_file(out / "trained.safetensors") if k.endswith(".update")}
    assert len(trained) == len(keys)


def test_trained_group_factors_move_and_the_artifact_stores_the_dense_update(tmp_path):
    """method.train_factors: each neuron group's factor trains beside the neurons' numbers (and is saved with them
    for resuming); the artifact holds only the dense Δ, as for fixed factors."""
    config = smoke_config(tmp_path, method__update_rank=2, method__train_factors=True, eval__limit=2)
    out = tmp_path / "factors"
    run_main(["--config", str(config), "--output", str(out)])
    artifact = load_artifact(out / "artifact")
    trained = load_file(out / "trained.safetensors")
    factors = {k: v for k, v in trained.items() if k.endswith(".factor")}
    assert len(factors) == 3 * len(artifact.manifest.layers)  # up, gate, down per layer
    untrained = prepare(load_model(str(out / "base_model"), torch.float32)[0], load_config(config).method,
                        artifact.partition)  # the same seeded initial factors
    initial = {name: p for name, p, _ in untrained.trainable if name in factors}
    assert initial.keys() == factors.keys()
    for name, factor in factors.items():  # every direction trained, 12 steps: every group (axis 0) moved
        assert factor.shape[0] > 1 and (factor - initial[name]).flatten(1).abs().amax(1).gt(0).all(), name
    assert not any(k.endswith("factor") for k in artifact.update)
    assert all(v.abs().sum() > 0 for k, v in artifact.update.items() if k.endswith("weight"))


def test_gradient_factors_are_aligned_before_step_1(tmp_path, capsys):
    """method.update_factor gradient-down: the pipeline aligns down's factors before training (the step itself is
    tests/test_delta.py's and the resume tests/test_selective.py's), the artifact stores the dense update, and a
    later run that finds the training cached rebuilds that same update (the aligned factors are stored with the
    trained numbers: noise factors in their place would give another update)."""
    config = smoke_config(tmp_path, method__update_rank=2, method__update_factor="gradient-down", train__steps=4,
                          eval__limit=2)
    out = tmp_path / "aligned"
    run_main(["--config", str(config), "--output", str(out)])
    assert "factors aligned in" in capsys.readouterr().out
    first = load_artifact(out / "artifact").update
    assert all(v.abs().sum() > 0 for k, v in first.items() if k.endswith("weight"))
    run_main(["--config", str(config), "--output", str(out)])
    assert "finetune: cached" in capsys.readouterr().out
    again = load_artifact(out / "artifact").update
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_factor_rounds_realign_during_training_and_the_artifact_holds_every_round(tmp_path):
    """method.factor_rounds 2: the factors are aligned before step 1 and again before step 3 of 4; the trained file
    keeps the retired round (a cached rerun rebuilds the same artifact from it). Each part at its own rank."""
    ranks = {"up": 1, "gate": 2, "down": 3}
    config = smoke_config(tmp_path, method__update_rank=ranks, method__update_factor="gradient",
                          method__factor_rounds=2, train__steps=4, eval__limit=2)
    out = tmp_path / "rounds"
    run_main(["--config", str(config), "--output", str(out)])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "realigned_s" in entry] == [3]
    earlier = {k: v for k, v in load_file(out / "trained.safetensors").items() if k.endswith(".earlier")}
    assert len(earlier) == 3 * len(load_artifact(out / "artifact").manifest.layers)
    assert all(v.abs().sum() > 0 for v in earlier.values())
    for key, numbers in earlier.items():  # [neurons, rank] (up, gate) or [rank, neurons] (down): one round's rank
        part = next(part for part in ranks if f".{part}_" in key)
        assert numbers.shape[part != "down"] == ranks[part], (key, numbers.shape)
    first = load_artifact(out / "artifact").update
    (out / "artifact" / "update.safetensors").unlink()  # rebuilt from trained.safetensors alone
    run_main(["--config", str(config), "--output", str(out)])
    again = load_artifact(out / "artifact").update
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_train_directions_finetune_one_direction_and_evaluate_all(tmp_path):
    """The transfer-matrix setting: only en-de rows train, so under routing only general, en- and
    de-specific neurons move, and every direction is still evaluated."""
    config = smoke_config(tmp_path, data__train_directions=["en-de"], train__steps=4, eval__limit=2,
                          method__routing="mask")  # trained weights in place: compared with the base below
    out = tmp_path / "en-de"
    run_main(["--config", str(config), "--output", str(out)])
    assert len(json.loads((out / "eval.json").read_text())["testsets"]["flores"]) == 10
    artifact = load_artifact(out / "artifact")
    languages = artifact.manifest.languages
    base = load_file(next((out / "base_model").glob("*.safetensors")))
    moved = {lang: False for lang in ["general", *languages]}
    for key, value in load_file(out / "trained.safetensors").items():
        _, layer, attr, _ = key.split(".")
        axis = 1 if attr == "down_proj" else 0
        delta = (value - base[f"model.layers.{layer}.mlp.{attr}.weight"]).abs().amax(dim=1 - axis)
        owner = artifact.partition.layers[int(layer)].specific
        moved["general"] |= bool(delta[owner == -1].any())
        for index, lang in enumerate(languages):
            moved[lang] |= bool(delta[owner == index].any())
    owning = {languages[i] for part in artifact.partition.layers.values() for i in part.specific.tolist() if i >= 0}
    others = owning - {"en", "de"}  # languages with specific neurons that en-de rows never reach
    assert len(others) >= 2  # so the check below is not vacuous
    assert moved["general"] and not any(moved[lang] for lang in others)


@pytest.mark.parametrize("body,message", [
    ({"data": {"train_directions": ["de-fr"]}}, "data.train_directions: de-fr not among en-de, de-en"),
    ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
    ({"train": {"learning_rate": 1}}, "train.learning_rate: Extra inputs are not permitted"),
    ({"method": {"name": "magic"}}, "method.name: Input should be"),
    ({"data": {"languages": ["en", "de"]}}, "drop 'en'"),
    ({"method": {"name": "lora", "attention_rank": 4}}, "method.attention_rank: only for method landermt under"),
    ({"method": {"update_rank": {"up": 2, "down": 4}}}, "method.update_rank: name a rank for each of up, gate and"),
    ({"method": {"train_factors": True}}, "method.train_factors: needs method.update_rank"),
    ({"method": {"update_factor": "gradient"}}, "method.update_factor: gradient needs method.update_rank"),
    ({"method": {"update_rank": 2, "factor_rounds": 2}}, "method.factor_rounds: more than one round needs"),
    ({"method": {"update_rank": 2, "update_factor": "gradient", "factor_rounds": 5}, "train": {"steps": 4}},
     "method.factor_rounds: 5 rounds need at least as many train.steps, got 4"),
    ({"train": {"rewarm_rounds": True}}, "train.rewarm_rounds: needs method.factor_rounds > 1"),
])
def test_config_errors_name_the_key(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(path)


def test_set_overrides_config_values_and_names_bad_ones():
    config = load_config(SMOKE, ["train.lr=3e-4", "method.layers=[0, 2]", "data.train_directions=[en-de]"])
    assert (config.train.lr, config.method.layers, config.data.train_directions) == (3e-4, [0, 2], ["en-de"])
    with pytest.raises(ConfigError, match=r"train\.nope: Extra inputs are not permitted"):
        load_config(SMOKE, ["train.nope=1"])
    for bad in ("train.lr", "train.lr.x=1", "=3"):
        with pytest.raises(ConfigError, match=r"expected SECTION\.KEY=VALUE"):
            load_config(SMOKE, [bad])


def test_presets_are_valid():
    for name in ("smoke", "quick", "paper"):
        config = load_config(ROOT / "configs" / f"{name}.yaml")
        assert config.name == name and config.method.name == "landermt"
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert (paper.method.k, paper.method.epsilon, paper.train.lr, paper.train.batch_size, paper.train.grad_accum,
            paper.train.steps) == (4, 0.9, 5e-5, 8, 10, 12_500 * 5)


def test_two_gloo_processes_train_the_smoke_preset(tmp_path):
    """torchrun with 2 CPU processes (gloo): the same pipeline, DDP-averaged gradients."""
    out = tmp_path / "ddp"
    config = smoke_config(tmp_path, train__steps=6, method__routing="mask")  # weights in place, compared below
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "training.run", "--config", str(config),
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # rank 0 alone logs
    single = tmp_path / "single"
    run_main(["--config", str(config), "--output", str(single)])
    ddp_weights, single_weights = load_file(out / "trained.safetensors"), load_file(single / "trained.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    base = load_file(next((single / "base_model").glob("*.safetensors")))

    def update(weights):
        return torch.cat([(v - base[f"model.layers.{k.split('.', 2)[1]}.mlp.{k.split('.', 2)[2]}"]).flatten()
                          for k, v in sorted(weights.items())])

    # each rank saw half of every batch and gradients were averaged: the same direction of travel
    cosine = torch.nn.functional.cosine_similarity(update(ddp_weights), update(single_weights), dim=0)
    assert cosine > 0.5 and update(ddp_weights).abs().max() > 0
