"""Beam search for one row, independent of how the next-token log-probabilities are computed.

A `BeamSearch` of width n keeps n live hypotheses. Each step it gets the log-probabilities of every live
hypothesis' next token and keeps the n best extensions by total log-probability among the top 2n
candidates; a candidate that ends in a stop token (EOS or a newline, landermt.generate) is finished
instead, if it ranks among the top n. Finished hypotheses are ranked by length-normalised score,
Σ log p / length (length counts the stop token), so long translations are not penalised for their
length. The search ends when n hypotheses are finished and none of the live ones scores better now
than the worst of them (the usual heuristic, `early_stopping=False` in transformers), or at the row's
token budget, where the live hypotheses count as finished.

The continuous-batching decoder (landermt.decode) runs it with a row's n hypotheses as n batch rows;
`step` says which row each new hypothesis continues, so the decoder reorders its cache rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hypothesis:
    ids: tuple[int, ...]
    logprob: float

    @property
    def score(self) -> float:
        """Length-normalised log-probability."""
        return self.logprob / max(len(self.ids), 1)


class BeamSearch:
    def __init__(self, width: int, stop_ids: set[int], max_new_tokens: int):
        if width < 1:
            raise ValueError("beam width must be at least 1")
        self.width, self.stops, self.max_new_tokens = width, stop_ids, max_new_tokens
        self.live: list[Hypothesis] = [Hypothesis((), 0.0)]
        self.finished: list[Hypothesis] = []

    def step(self, logprobs: torch.Tensor) -> tuple[list[int], list[int]]:
        """`logprobs` [len(live), vocabulary]: each live hypothesis' next-token log-probabilities. Returns, for
        every new live hypothesis, the index of the one it extends and the token it adds."""
        scores = torch.tensor([h.logprob for h in self.live], dtype=torch.float64)[:, None] + logprobs.double()
        values, flat = scores.view(-1).topk(min(2 * self.width, scores.numel()))
        vocabulary = logprobs.shape[-1]
        live, sources, tokens = [], [], []
        for rank, (value, index) in enumerate(zip(values.tolist(), flat.tolist(), strict=True)):
            source, token = divmod(index, vocabulary)
            hypothesis = Hypothesis((*self.live[source].ids, token), value)
            if token in self.stops:
                if rank < self.width:
                    self.finished.append(hypothesis)
            else:
                live.append(hypothesis)
                sources.append(source)
                tokens.append(token)
            if len(live) == self.width:
                break
        if live and len(live[0].ids) >= self.max_new_tokens:  # the budget: what is live counts as finished
            self.finished += live
            live, sources, tokens = [], [], []
        self.live = live
        if self.done:
            self.live, sources, tokens = [], [], []
        return sources, tokens

    @property
    def done(self) -> bool:
        if not self.live:
            return True
        if len(self.finished) < self.width:
            return False
        worst = sorted((h.score for h in self.finished), reverse=True)[self.width - 1]
        return max(h.score for h in self.live) <= worst

    def best(self) -> list[tuple[int, ...]]:
        """The finished hypotheses' ids, best first, at most `width`."""
        ranked = sorted(self.finished, key=lambda h: h.score, reverse=True)
        return [h.ids for h in ranked[: self.width]]
