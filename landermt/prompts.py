"""Language tags, the translation prompt template, and tokenised, padded batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "de": "German", "fr": "French", "it": "Italian", "ar": "Arabic",
    "zh": "Chinese", "es": "Spanish", "ru": "Russian", "ja": "Japanese", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "tr": "Turkish", "ko": "Korean", "hi": "Hindi",
}

DEFAULT_TEMPLATE = (
    "Translate the following text from {source_language} to {target_language}.\n"
    "{source_language}: {source}\n{target_language}:"
)

IGNORE = -100  # label of a position that carries no loss


def language_name(code: str) -> str:
    try:
        return LANGUAGE_NAMES[code]
    except KeyError:
        raise KeyError(f"unknown language code {code!r}; known: {', '.join(LANGUAGE_NAMES)}") from None


def render_prompt(template: str, source_lang: str, target_lang: str, source: str) -> str:
    return template.format(
        source_language=language_name(source_lang), target_language=language_name(target_lang), source=source
    )


def few_shot_prefix(template: str, source_lang: str, target_lang: str, shots: list[tuple[str, str]]) -> str:
    """Worked examples, each the template followed by its reference, separated by blank lines."""
    return "".join(f"{render_prompt(template, source_lang, target_lang, s)} {t}\n\n" for s, t in shots)


@dataclass(frozen=True)
class Prompt:
    """A text's prompt as the model reads it, and the text's own token count (limits, the new-token budget)."""

    ids: list[int]
    source_tokens: int


def new_token_budget(source_tokens: int, cap: int) -> int:
    """At most 2 × the source's tokens + 16 new tokens (a translation that runs on stops there), and `cap`."""
    return min(cap, 2 * source_tokens + 16)


class PromptEncoder:
    """Prompts for the server and the evaluation alike: each text is tokenised once, inside its whole prompt
    (few-shot prefix + template), exactly as training tokenises prompts. The text's own token count is the
    prompt's minus the pair's fixed part, measured once per pair (±1 where a token spans the text's edge)."""

    def __init__(self, tokenizer, template: str,
                 shots: Callable[[str, str], list[tuple[str, str]]] = lambda source, target: []):
        self.tokenizer, self.template, self.shots = tokenizer, template, shots
        self._fixed: dict[tuple[str, str], int] = {}

    def text(self, source: str, target: str, text: str) -> str:
        prefix = few_shot_prefix(self.template, source, target, self.shots(source, target))
        return prefix + render_prompt(self.template, source, target, text)

    def encode(self, source: str, target: str, text: str) -> Prompt:
        ids = self.tokenizer(self.text(source, target, text)).input_ids
        if (source, target) not in self._fixed:
            self._fixed[source, target] = len(self.tokenizer(self.text(source, target, "")).input_ids)
        return Prompt(ids, max(1, len(ids) - self._fixed[source, target]))


@dataclass(frozen=True)
class Example:
    """Token ids and labels (IGNORE where no loss is taken) of one sequence."""

    input_ids: list[int]
    labels: list[int]


def translation_example(
    tokenizer, template: str, source_lang: str, target_lang: str, source: str, target: str, max_length: int
) -> Example:
    """Prompt + " target<eos>"; the loss covers the target tokens (and EOS) only."""
    prompt = tokenizer(render_prompt(template, source_lang, target_lang, source)).input_ids
    answer = tokenizer(" " + target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return Example(ids, labels)


def text_example(tokenizer, text: str, max_length: int) -> Example:
    """Plain language-model text: every token after the first carries loss."""
    ids = tokenizer(text).input_ids[:max_length]
    return Example(ids, list(ids))


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches sorted by length (less padding); the order of rows is deterministic."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
