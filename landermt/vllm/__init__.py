"""LANDeRMT inside vLLM: an artifact's routing rule (`mask`, the paper's routed CAR FFN, eqs. 8–9, or `delta`,
the routed update) as out-of-tree vLLM models.

`register` is the `vllm.general_plugins` entry point (installed with `pip install landermt[vllm]`);
vLLM calls it in every process it starts. It registers one routed model class per supported family
and installs the V1 model runner hook that hands each token's pair id to the model (runner.py).

A base model is served routed by overriding its config (`routed_overrides`): the architecture
becomes the routed class and `landermt_artifact` names the artifact whose scale tables and FFN
weights the model loads. Each request names its pair in `SamplingParams.extra_args` (OpenAI API:
`vllm_xargs`) under `PAIR_ID_KEY`, and must carry `cache_salt` = `cache_salt(pair_id)`: prefix
caching would otherwise reuse KV computed under another pair's neurons.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACT_KEY = "landermt_artifact"  # hf_config attribute: the artifact directory
PAIR_ID_KEY = "landermt_pair_id"  # SamplingParams.extra_args key: the request's pair id (0: base model)
ROUTED_ARCHITECTURES = {  # the base model's architecture -> its routed class in landermt.vllm.model
    "Gemma3ForCausalLM": "LanderMTGemma3ForCausalLM",
    "LlamaForCausalLM": "LanderMTLlamaForCausalLM",
}


def register() -> None:
    """Register the routed models and install the V1 runner hook (safe to call repeatedly)."""
    from vllm import ModelRegistry

    from landermt.vllm.runner import install_v1_hook

    for name in ROUTED_ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"landermt.vllm.model:{name}")
    install_v1_hook()


def routed_overrides(architecture: str, artifact: str) -> dict[str, object]:
    """`hf_overrides` that serve a base model of `architecture` routed by the artifact at `artifact`."""
    if architecture not in ROUTED_ARCHITECTURES:
        raise ValueError(f"the vLLM backend routes {', '.join(ROUTED_ARCHITECTURES)}; this model is {architecture}")
    return {"architectures": [ROUTED_ARCHITECTURES[architecture]], ARTIFACT_KEY: str(Path(artifact).resolve())}


def cache_salt(pair_id: int | None) -> str:
    """The prefix-cache salt of a pair: KV blocks are only shared between requests of one pair."""
    return f"landermt-pair-{pair_id or 0}"

