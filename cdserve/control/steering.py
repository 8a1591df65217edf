"""Token-mode steering and candidate selection: small pure functions on tensors.

Token mode: logits'(z) = logits(z) + strength * sum_h w_h Qnorm_h(z) over the top-k tokens,
-inf elsewhere. Sampling from softmax(logits') is sampling from p(z) exp(strength * Q(z))
restricted to the top-k, the KL-regularised optimum of the controlled-decoding paper. With the
tail kept (control.tail "keep"), the tokens outside the top-k stay, each valued at the top-k's
mean value under the base distribution (`tail_value`): the expected value of a next token from
here, so they keep their share of the base mass instead of gaining it from every top-k token
the steering pushes down, as a value of 0 (the position's mean) did (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math

import torch

TOP_K_CHUNK = 128  # top_k_indices reads a row's maxima in chunks of this many tokens


def top_k_candidates(logits: torch.Tensor, top_k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Candidate ids (N, k_max) of each row's top tokens; rows asking for fewer than k_max get
    their extra ranks set to -1. logits (N, V), top_k (N,) >= 1; k_max = max(top_k), passed from
    the host where the caller knows it (reading it from the device is a host sync). A top_k over
    the vocabulary's size keeps every token (a model with a small vocabulary and the default k)."""
    k_max = min(int(top_k.max()) if k_max is None else k_max, logits.shape[-1])
    ids = top_k_indices(logits, k_max)  # (N, k_max)
    ranks = torch.arange(k_max, device=logits.device)[None]
    return ids.masked_fill(ranks >= top_k[:, None], -1)


def top_k_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits.topk(k).indices (N, k), best first, reading a long row once: the k largest tokens
    lie in the k chunks of TOP_K_CHUNK tokens with the largest maxima (the k-th largest maximum is
    a bound that k tokens reach), so one max per chunk, then a topk over those k chunks' tokens.
    On the CPU, topk over the whole row copies and partially sorts it: at 64 x 49,152 this is about
    2x faster. Rows that do not split evenly, or short ones, take topk directly."""
    N, V = logits.shape
    C = V // TOP_K_CHUNK
    if V % TOP_K_CHUNK or C < 4 * k:
        return logits.topk(k, dim=-1).indices
    chunks = logits.reshape(N, C, TOP_K_CHUNK)
    best = chunks.amax(-1).topk(k, dim=-1).indices  # (N, k): chunks holding the top k
    picked = chunks.gather(1, best[..., None].expand(N, k, TOP_K_CHUNK)).flatten(1)  # (N, k * chunk)
    top = picked.topk(k, dim=-1).indices  # (N, k) into picked
    return best.gather(1, top // TOP_K_CHUNK) * TOP_K_CHUNK + top % TOP_K_CHUNK


def ensemble_stats(members: torch.Tensor, ensemble: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's value and spread from its ensemble members' values: the mean and the standard
    deviation (n - 1 denominator) over the E members. members (N, H*E, ...) head-major (member
    h*E + e) -> (N, H, ...) each; ensemble 1: the values themselves, spread 0."""
    if ensemble == 1:
        return members, torch.zeros_like(members)
    m = members.unflatten(1, (-1, ensemble))  # (N, H, E, ...)
    return m.mean(2), m.std(2)


def risk_adjusted(members: torch.Tensor, ensemble: int, risk: torch.Tensor) -> torch.Tensor:
    """The per-head value steering and selection use: mean + risk * spread (risk < 0 avoids what
    the scorer is unsure of, risk > 0 seeks it). members (N, H*E, ...), risk (N,) -> (N, H, ...)."""
    mean, spread = ensemble_stats(members, ensemble)
    if ensemble == 1:
        return mean
    return mean + risk.view((-1,) + (1,) * (mean.dim() - 1)).to(mean.dtype) * spread


def combine_heads(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Combined value sum_h w_h (Q_h - mean_h) / std_h.
    values (N, H, ...), mean/std/weights (N, H) -> (N, ...)."""
    extra = values.dim() - 2
    shape = weights.shape + (1,) * extra
    return ((values - mean.view(shape)) / std.view(shape) * weights.view(shape)).sum(1)


def steer_top_k(logits: torch.Tensor, candidates: torch.Tensor, combined: torch.Tensor,
                strength: torch.Tensor, keep_tail: torch.Tensor | None = None) -> torch.Tensor:
    """logits (N, V); candidates (N, k) with -1 for unused ranks; combined (N, k) values of the
    candidates; strength (N,); keep_tail (N,) bool (None: no row). Returns steered logits, -inf
    outside the candidates, or there the base logits + strength * tail_value in the rows that keep
    their tail."""
    ids, steered = steer_top_k_values(logits, candidates, combined, strength)
    out = torch.full_like(logits, float("-inf"))
    if keep_tail is not None:
        tail = logits + strength[:, None] * tail_value(logits, candidates, combined)
        out = torch.where(keep_tail[:, None], tail, out)
    return out.scatter_(1, ids, steered)


def tail_value(logits: torch.Tensor, candidates: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
    """The value (N, 1) a kept tail's tokens are steered by: the top-k's values averaged under the
    base distribution renormalised to the top k, the expected value of a next token from here."""
    valid = candidates >= 0
    picked = logits.gather(1, candidates.clamp(min=0)).float().masked_fill(~valid, float("-inf"))
    w = torch.softmax(picked, dim=-1)
    return (w * combined.float().masked_fill(~valid, 0.0)).sum(-1, keepdim=True).to(logits.dtype)


def hold_implausible(logits: torch.Tensor, candidates: torch.Tensor | None, combined: torch.Tensor,
                     plausibility: torch.Tensor, unheld: torch.Tensor | None = None) -> torch.Tensor:
    """control.plausibility: a candidate whose base probability (temperature 1) is below
    plausibility x the most likely token's keeps at most the candidates' expected value under the
    base distribution (tail_value), so steering may lower it but never raise it above a typical
    next token. Strong steering otherwise spells made-up words and number runs out of tokens the
    base model gives under 1% (benchmarks/RESULTS.md). logits (N, V); candidates (N, k) with -1
    for unused ranks, or None for every token (then combined is (N, V)); combined (N, k) or (N, V);
    plausibility (N,) in [0, 1), 0: no hold; unheld (U,): token ids never held, the model's
    end-of-sequence tokens (ending an answer spells no word: holding them cost `concise` a third of
    its gain). Returns the held values, combined's shape and dtype."""
    if candidates is None:
        picked = logits.float()
        expected = (torch.softmax(picked, -1) * combined.float()).sum(-1, keepdim=True)
    else:
        picked = logits.gather(1, candidates.clamp(min=0)).float()
        expected = tail_value(logits, candidates, combined).float()
    floor = picked.amax(-1, keepdim=True) + torch.log(plausibility.float())[:, None]  # log 0 = -inf: no hold
    plausible = picked >= floor
    if unheld is not None and unheld.numel():
        ids = torch.arange(logits.shape[-1], device=logits.device)[None] if candidates is None else candidates
        plausible |= torch.isin(ids, unheld)
    held = torch.minimum(combined.float(), expected)
    return torch.where(plausible, combined.float(), held).to(combined.dtype)


def steer_top_k_values(logits: torch.Tensor, candidates: torch.Tensor, combined: torch.Tensor,
                       strength: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """steer_top_k without building the (N, V) rows: ids (N, k) and their steered logits (N, k),
    the only finite entries of the steered rows. Unused ranks (-1) repeat rank 0 (always valid) in
    both, so duplicate scatter writes agree."""
    valid = candidates >= 0
    ids = torch.where(valid, candidates, candidates[:, :1])
    steered = logits.gather(1, ids) + strength[:, None] * combined
    return ids, torch.where(valid, steered, steered[:, :1])


def steer_full(logits: torch.Tensor, combined: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """top_k 0: every token. logits, combined (N, V); strength (N,)."""
    return logits + strength[:, None] * combined


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor, truncate: bool | None = None) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (per row), as vLLM's
    sampler does: a token stays if the mass strictly above it is below top_p. truncate: whether
    any row has top_p < 1, where the caller knows it on the host (else read from the device: a
    host sync); the common case (no row truncates) skips the sort."""
    if not (bool((top_p < 1.0).any()) if truncate is None else truncate):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop = before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def sampled_kl(sampled: torch.Tensor, base: torch.Tensor, temperature: torch.Tensor,
               top_p: torch.Tensor, truncate: bool | None = None) -> torch.Tensor:
    """KL(pi || p) per row: pi is the distribution the sampler actually draws from (logits
    `sampled`, -inf outside token mode's top-k, divided by the temperature, then top-p
    truncated); p is the base model's whole-vocabulary distribution at the same temperature.
    Finite for temperature > 0 (p has full support). Greedy rows (temperature 0) compare two
    point masses: 0 if their argmaxes agree, +inf otherwise.
    sampled, base (N, V) logits; temperature, top_p (N,) -> (N,) float32."""
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None].float()
    log_pi = torch.log_softmax(apply_top_p(sampled.float() / t, top_p, truncate), dim=-1)
    log_p = torch.log_softmax(base.float() / t, dim=-1)
    pi = log_pi.exp()
    kl = torch.where(pi > 0, pi * (log_pi - log_p), torch.zeros_like(pi)).sum(-1)
    changed = sampled.argmax(-1) != base.argmax(-1)
    point = torch.where(changed, torch.full_like(kl, float("inf")), torch.zeros_like(kl))
    return torch.where(greedy, point, kl)


def top_k_kl(steered: torch.Tensor, candidates: torch.Tensor, base: torch.Tensor, temperature: torch.Tensor,
             top_p: torch.Tensor, truncate: bool | None = None, any_greedy: bool | None = None,
             tail_shift: torch.Tensor | None = None) -> torch.Tensor:
    """sampled_kl of steered rows that are -inf outside their top-k candidates, from the k
    candidates alone: pi lives on them, so KL(pi || p) = sum over the candidates of
    pi (log pi - log p), with log p = base / t - logsumexp(base / t). One pass over the vocabulary
    (the logsumexp) instead of the dozen of the (N, V) version, which dominated token mode's step
    at 64 rows. steered (N, k) logits of candidates (N, k) (-1: unused rank, its steered logit
    ignored); base (N, V); temperature, top_p (N,); truncate: any top_p < 1, any_greedy: any
    temperature <= 0, where the caller knows it on the host (None: read from the device).
    tail_shift (N,): rows that keep their tail (control.tail keep), every other token at its base
    logit + tail_shift; sampled (temperature > 0) and not top-p truncated (the caller's to check)."""
    if tail_shift is not None:
        return _kept_tail_kl(steered, candidates, base, temperature, tail_shift)
    valid = candidates >= 0
    steered = steered.float().masked_fill(~valid, float("-inf"))
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None].float()
    log_pi = torch.log_softmax(apply_top_p(steered / t, top_p, truncate), dim=-1)  # (N, k)
    ids = candidates.clamp(min=0)
    picked = base.gather(1, ids).float()  # the candidates hold each row's maximum, the top token
    log_p = picked / t - _logsumexp(base.float(), t, picked.amax(-1, keepdim=True))
    pi = log_pi.exp()
    kl = torch.where(pi > 0, pi * (log_pi - log_p), torch.zeros_like(pi)).sum(-1)
    if not (bool(greedy.any()) if any_greedy is None else any_greedy):
        return kl
    # Greedy rows: point masses, as sampled_kl (argmax ties go to the lowest token id, as torch's
    # argmax over the (N, V) rows does).
    top = steered.max(-1, keepdim=True).values
    picked = torch.where(valid & (steered == top), ids, torch.full_like(ids, base.shape[-1])).min(-1).values
    point = torch.where(picked != base.argmax(-1), torch.full_like(kl, float("inf")), torch.zeros_like(kl))
    return torch.where(greedy, point, kl)


def _kept_tail_kl(steered: torch.Tensor, candidates: torch.Tensor, base: torch.Tensor, temperature: torch.Tensor,
                  tail_shift: torch.Tensor) -> torch.Tensor:
    """top_k_kl of rows whose other tokens keep their base logits + tail_shift, in closed form from
    the k candidates and one logsumexp: every tail token has the same log ratio d = shift / t -
    log Z' + log Z to the base, so the tail adds pi(tail) * d, pi(tail) from the base's tail mass
    1 - p(top k)."""
    valid = candidates >= 0
    ids = candidates.clamp(min=0)
    t = temperature[:, None].float()
    picked = base.gather(1, ids).float()
    log_z = _logsumexp(base.float(), t, picked.amax(-1, keepdim=True))  # (N, 1)
    log_p = (picked / t - log_z).masked_fill(~valid, float("-inf"))  # (N, k)
    log_tail = (1 - log_p.exp().sum(-1, keepdim=True)).clamp(min=0).log() + log_z  # log sum_tail exp(base / t)
    shift = tail_shift[:, None].float() / t
    u = (steered.float() / t).masked_fill(~valid, float("-inf"))
    log_z_steered = torch.logsumexp(torch.cat([u, log_tail + shift], dim=-1), dim=-1, keepdim=True)
    log_pi = u - log_z_steered
    pi = log_pi.exp()
    kl = torch.where(pi > 0, pi * (log_pi - log_p), torch.zeros_like(pi)).sum(-1)
    pi_tail = (log_tail + shift - log_z_steered).exp()[:, 0]
    d = (shift - log_z_steered + log_z)[:, 0]
    return kl + torch.where(pi_tail > 0, pi_tail * d, torch.zeros_like(kl))


def _logsumexp(x: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """logsumexp(x / t) per row (N, 1); x (N, V), t and m (N, 1), m each row's maximum. One
    (N, V) temporary, written in place (torch.logsumexp of x / t makes three and reads the rows
    once more for their maxima: at 64 x 49,152 each pass costs about 1.5 ms on a CPU core)."""
    m = torch.where(m.isfinite(), m, torch.zeros_like(m))  # as torch.logsumexp on rows of +-inf
    return torch.sub(x, m).div_(t).exp_().sum(-1, keepdim=True).log_() + m / t


def best_of_n_kl_bound(n: int) -> float:
    """The paper's bound on KL(best-of-n || base) for one selection among n: log n - (n-1)/n."""
    return math.log(n) - (n - 1) / n


def select_candidate(combined: torch.Tensor, selection: str, strength: float,
                     generator: torch.Generator | None = None) -> int:
    """Pick one of K candidates by their combined values (K,): the argmax, or a sample from
    softmax(strength * value)."""
    if selection == "argmax" or combined.numel() == 1:
        return int(combined.argmax())
    probs = torch.softmax(strength * combined.double(), dim=0)
    return int(torch.multinomial(probs, 1, generator=generator))
