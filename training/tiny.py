"""A tiny random Gemma-3-style model with a byte-level BPE tokenizer trained on the given text:
the smoke preset's model, built offline in seconds."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from training.config import TinyModelConfig

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def train_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes); <bos> prepended like Gemma's tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_gemma(config: TinyModelConfig, vocab_size: int) -> Gemma3ForCausalLM:
    torch.manual_seed(config.seed)
    heads = max(1, config.hidden_size // 32)
    model_config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=heads, num_key_value_heads=1, head_dim=32,
        sliding_window=64, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return Gemma3ForCausalLM(model_config).eval()
