"""One choice of a request, in every mode, for both engines: `ChoiceController`.

It owns what must not differ between engines: the accepted answer, the K candidates of the
current block, the stop / EOS / length checks on the whole answer (so a stop string that spans a
block boundary is found), selection, KL, token counts, the reported values and the streamed
deltas. An engine only samples tokens (`push`) and values candidates (`value_positions` ->
`select`); none/token choices stream: one candidate whose tokens are accepted as they come.

Positions: a value is normalised at the index, in the answer, of the last token taken, EOS
included (the scorer reads a finished prefix at the token taken, DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from cdserve.control.request import ResolvedControl
from cdserve.control.segments import SENTENCE_END
from cdserve.control.steering import best_of_n_kl_bound, select_candidate
from cdserve.detokenizer import Detokenizer
from cdserve.outputs import ChoiceDelta, ControlValues
from cdserve.sampling import SamplingParams
from cdserve.text import find_stop, safe_prefix_len


@dataclass(eq=False)
class Candidate:
    """One candidate of the current block (the only one, for none/token)."""

    text: str  # the answer's text with this candidate's tokens (cut before a stop string)
    detok: Detokenizer  # the answer's detokeniser with this candidate's tokens (before any cut)
    tokens: list[int] = field(default_factory=list)  # taken this block, a final EOS included
    eos: bool = False  # ended by EOS (the last of `tokens`)
    finish_reason: str | None = None  # set when this candidate would end the answer
    done: bool = False  # no more tokens this block: finished, or the block is full
    pruned: bool = False  # pruned best-of-N dropped it: it takes no more tokens and cannot win
    kl: float = 0.0  # sum of the per-token KL terms of its tokens
    mark: int = 0  # pruned best-of-N: its tokens at the last pruning point it passed
    mark_text: int = 0  # ...and the length of its text there

    @property
    def grown(self) -> int:
        """Tokens taken since its block began (pruned best-of-N: since its last pruning point)."""
        return len(self.tokens) - self.mark

    @property
    def ids(self) -> list[int]:
        """Its tokens that belong to the answer (EOS excluded)."""
        return self.tokens[:-1] if self.eos else self.tokens


class ChoiceController:
    def __init__(self, index: int, control: ResolvedControl, sampling: SamplingParams, prompt_len: int,
                 max_model_len: int, eos_token_ids: Iterable[int], decode: Callable[[list[int]], str],
                 seed: int):
        self.index, self.control, self.sampling = index, control, sampling
        self.eos = frozenset(eos_token_ids)
        self.detok = Detokenizer(decode)  # of the accepted answer; candidates continue it
        self.budget = max(1, min(sampling.max_tokens, max_model_len - prompt_len))  # answer tokens
        self.K = control.candidates
        self.streaming = control.mode in ("none", "token")  # one candidate, accepted token by token
        self.pruning = control.mode == "best_of_n" and control.prune_every > 0  # speculative rejection
        self.generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)  # selection
        self.accepted: list[int] = []  # the answer's tokens (EOS excluded)
        self.text = ""
        self.eos_token: int | None = None  # the EOS that ended the answer, if one did
        self.finish_reason: str | None = None
        self.values: list[float] | None = None  # raw per-head values of the answer so far
        self.spread: list[float] | None = None  # their ensemble spreads (ensemble scorers only)
        self.reward_values: dict[str, float] | None = None  # the request's rewards of the answer so far
        self.combined = 0.0
        self.kl = 0.0
        self.selections = 0
        self.tokens_generated = 0  # tokens the base model sampled for this choice, EOS included
        self._stop_len = max((len(s) for s in sampling.stop), default=0)
        self._emitted_chars = self._emitted_ids = 0
        self._sent_finish = False
        self.candidates = self._fresh()

    def _fresh(self) -> list[Candidate]:
        return [self._candidate() for _ in range(self.K)]

    def _candidate(self) -> Candidate:
        return Candidate(text=self.text, detok=self.detok)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def block_len(self) -> int:
        """Tokens the current block may take (block: M; pruned best-of-N: up to the next pruning
        point; or what is left of max_tokens)."""
        left = self.budget - len(self.accepted)
        if self.control.mode == "block":
            return min(self.control.block_size, left)
        if self.pruning and not self.streaming:
            return max((self.candidate_len(k) for k in self.alive if not self.candidates[k].finish_reason), default=0)
        return left

    def candidate_len(self, k: int) -> int:
        """Pruned best-of-N: tokens candidate k may take before its next pruning point (at most
        prune_every past the last one; a segment end may come first)."""
        c = self.candidates[k]
        return min(self.control.prune_every - c.grown, self.budget - len(self.accepted) - len(c.tokens))

    @property
    def waiting(self) -> bool:
        """Every candidate is done: the block awaits selection (or pruning)."""
        return all(c.done or c.pruned for c in self.candidates)

    @property
    def alive(self) -> list[int]:
        return [k for k, c in enumerate(self.candidates) if not c.pruned]

    # -- tokens in ------------------------------------------------------------------------------
    def push(self, k: int, token: int, kl: float = 0.0) -> bool:
        """Candidate k took `token` (with its KL term); returns whether it is done this block."""
        c = self.candidates[k]
        if c.done:
            raise ValueError(f"candidate {k} of choice {self.index} is done; it cannot take token {token}")
        c.tokens.append(token)
        c.kl += kl
        if token in self.eos:
            c.eos, c.finish_reason = True, "stop"
        else:
            c.detok = c.detok.push(token)
            text = c.detok.text
            stops = self.sampling.stop
            cut = find_stop(text, stops, max(0, len(c.text) - self._stop_len)) if stops else -1
            c.text = text if cut < 0 else text[:cut]
            if cut >= 0:
                c.finish_reason = "stop"
            elif len(self.accepted) + len(c.ids) >= self.budget:
                c.finish_reason = "length"
        c.done = c.finish_reason is not None or self._block_ends(c)
        if self.streaming:  # none / token (or the last survivor of pruning): accepted as it comes
            self._accept(c)
            if not self.finished:
                self.candidates[k] = self._candidate()
        return c.done

    def _block_ends(self, c: Candidate) -> bool:
        """Block mode: after block_size tokens, or (segment "sentence") at the first sentence end
        in the text this block added. Segment "entropy" ends are the engine's (`end_block`): they
        depend on the base model's next-token distribution (segments.py)."""
        if self.pruning:  # pruning points: every prune_every tokens, or the candidate's next segment end
            return not self.streaming and (c.grown >= self.control.prune_every
                                           or self._sentence_end(c, c.mark_text))
        if self.control.mode != "block":
            return False
        return len(c.tokens) >= self.control.block_size or self._sentence_end(c, len(self.text))

    def _sentence_end(self, c: Candidate, start: int) -> bool:
        return self.control.segment == "sentence" and SENTENCE_END.search(c.text, start) is not None

    def end_block(self, k: int) -> None:
        """The engine ended candidate k's block at a segment end (vLLM stopped it at a sentence
        end; either engine before a token of high entropy)."""
        if not self.candidates[k].grown:
            raise ValueError(f"candidate {k} of choice {self.index} cannot end a block with no tokens")
        self.candidates[k].done = True

    def push_all(self, k: int, tokens: Iterable[int], kls: Iterable[float] | None = None) -> list[int]:
        """Feed a whole sampled block (vLLM); tokens past the candidate's end are dropped. Returns
        the tokens kept."""
        kls = list(kls) if kls is not None else None
        for i, t in enumerate(tokens):
            if self.push(k, t, kls[i] if kls else 0.0):
                break
        return self.accepted if self.streaming else self.candidates[k].tokens

    def _accept(self, c: Candidate) -> None:
        self.accepted = self.accepted + c.ids
        self.text, self.detok = c.text, c.detok
        self.kl += c.kl
        self.tokens_generated += len(c.tokens)
        if c.finish_reason:
            self.finish_reason = c.finish_reason
            self.eos_token = c.tokens[-1] if c.eos else None

    # -- selection (block / best_of_n) --------------------------------------------------------
    def value_positions(self) -> list[int]:
        """Per candidate, the answer index of its last token (where its value is normalised)."""
        return [max(len(self.accepted) + len(c.tokens) - 1, 0) for c in self.candidates]

    def reward_texts(self) -> list[str]:
        """What the request's rewards score: each candidate's answer text so far ("" if pruned)."""
        return ["" if c.pruned else c.text for c in self.candidates]

    def select(self, raw: torch.Tensor, combined: torch.Tensor,
               rewards: Mapping[str, Sequence[float]] | None = None, spread: torch.Tensor | None = None) -> int:
        """Keep one candidate by its value (K,): the scorer's combined value, plus sum_r weight_r *
        reward_r(text) for the request's rewards (scores per reward name, one per candidate);
        raw (K, H) per-head values, spread (K, H) their ensemble spreads (None: no ensemble).
        Returns the winner, which every candidate of the next block continues from; pruned
        best-of-N prunes instead (-1) until its survivors have finished."""
        if not self.waiting:
            raise ValueError(f"choice {self.index}: selection before all {self.K} candidates are done")
        value = combined.double()
        for name, weight in self.control.rewards:
            value = value + weight * torch.tensor(rewards[name], dtype=torch.float64)
        if self.pruning and not all(self.candidates[k].finish_reason for k in self.alive):
            self._prune(value)
            if self.streaming or not all(self.candidates[k].finish_reason for k in self.alive):
                return -1  # the survivors go on (or the last one streams)
        value = value.masked_fill(torch.tensor([c.pruned for c in self.candidates]), float("-inf"))
        w = select_candidate(value, self.control.selection, self.control.strength, self.generator)
        if self.control.rewards:
            self.reward_values = {name: float(rewards[name][w]) for name, _ in self.control.rewards}
        winner = self.candidates[w]
        self.tokens_generated += sum(len(c.tokens) for c in self.candidates) - len(winner.tokens)
        self._accept(winner)
        # Pruning selects one of K samples too, by another rule: only log K is guaranteed.
        self.kl += math.log(self.K) if self.pruning else best_of_n_kl_bound(self.K)
        self.selections += 1
        self.set_values(raw[w], float(combined[w]), None if spread is None else spread[w])
        if not self.finished:
            self.candidates = self._fresh()
        return w

    def _prune(self, value: torch.Tensor) -> None:
        """Pruned best-of-N at a pruning point: keep the best keep_fraction of the candidates alive
        (finished ones compete too), by value, ties to the lower index; the others stop. With one
        unfinished survivor left, it streams: its tokens are accepted from now on."""
        alive = self.alive
        keep = max(1, math.ceil(len(alive) * self.control.keep_fraction))
        ranked = sorted(alive, key=lambda k: -float(value[k]))
        for k in ranked[keep:]:
            self.candidates[k].pruned = True
        self.selections += 1
        for k in ranked[:keep]:
            c = self.candidates[k]
            c.done = c.finish_reason is not None
            c.mark, c.mark_text = len(c.tokens), len(c.text)
        if keep == 1 and not self.candidates[ranked[0]].finish_reason:
            survivor = self.candidates[ranked[0]]
            self.tokens_generated += sum(len(c.tokens) for c in self.candidates if c is not survivor)
            self._accept(survivor)
            self.kl += math.log(self.K)
            self.candidates[ranked[0]] = self._candidate()
            self.streaming = True

    # -- values and output ----------------------------------------------------------------------
    def taken(self) -> list[int]:
        """The answer's tokens with the EOS that ended it: what the scorer values."""
        return self.accepted + ([self.eos_token] if self.eos_token is not None else [])

    def final_position(self) -> int:
        return max(len(self.taken()) - 1, 0)

    def set_values(self, raw: torch.Tensor | list[float], combined: float,
                   spread: torch.Tensor | list[float] | None = None) -> None:
        self.values = [float(v) for v in raw]
        self.spread = None if spread is None else [float(v) for v in spread]
        self.combined = float(combined)

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"

    def fail(self) -> None:
        """The request failed (its error went out instead): end it, with nothing more to send."""
        self.abort()
        self._sent_finish = True

    def control_values(self, heads: list[str]) -> ControlValues:
        vals = self.values if self.values is not None else [math.nan] * len(heads)
        return ControlValues(mode=self.control.mode, values=dict(zip(heads, vals)), combined=self.combined,
                             kl=self.kl, selections=self.selections, tokens_generated=self.tokens_generated,
                             rewards=self.reward_values,
                             spread=None if self.spread is None else dict(zip(heads, self.spread)))

    def take_delta(self, heads: list[str]) -> ChoiceDelta | None:
        """The accepted text and tokens not yet sent (text that could begin a stop string is held
        back until it cannot), with the control values once finished; None if nothing is new."""
        if self._sent_finish:
            return None
        end = len(self.text) if self.finished else safe_prefix_len(self.text, self.sampling.stop)
        ids = self.accepted[self._emitted_ids:]
        if end <= self._emitted_chars and not ids and not self.finished:
            return None
        delta = ChoiceDelta(index=self.index, text=self.text[self._emitted_chars:end], token_ids=ids,
                            finish_reason=self.finish_reason,
                            control=self.control_values(heads) if self.finished else None)
        self._emitted_chars, self._emitted_ids = max(self._emitted_chars, end), len(self.accepted)
        self._sent_finish = self.finished
        return delta
