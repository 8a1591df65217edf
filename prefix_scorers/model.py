"""The multi-head prefix scorer: a small causal transformer with a CD-Q output.

For a prefix h_t (the hidden state after reading tokens up to t) and each possible next token z,

    Q_h(prefix, z) = <U_h h_t, E_z> / sqrt(d_e) + b_h        for every head h,

where E is the token embedding [V, d_e] (usually the base model's, frozen) and U_h a [d_e, d]
projection per head. This factorisation is why the scorer stays small and cheap: the heads add
H * d_e * d parameters instead of H * V * d, and decoding only needs Q for the base model's top-k
candidates (k dot products) or, with top_k 0, one [d_e] x [d_e, V] product for the weighted
combination of the heads (Q is linear in U, so the heads are combined before touching E).

Ensemble heads (`config.ensemble`, E > 1): each head holds E projections U_{h,e} (and biases
b_{h,e}) on the same trunk state h_t, trained on different bootstrap resamples of the rollouts.
The head's value is their mean, its spread (how unsure the scorer is) their standard deviation.
Serving cost: one trunk pass plus H * E projections. Everything below the trunk works on the
H * E "members", head-major (member h*E + e); `head_values` averages them back to H heads.

The blocks follow Hugging Face's Llama layout and RoPE convention, so a scorer can start as a
copy of the first layers of a Llama-family base model (see `init_from_base`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefix_scorers.config import ScorerConfig
from prefix_scorers.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, HF Llama convention (rotate_half). x: (B, nh, T, hs), positions: (B, T)."""
    hs = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hs)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """q (B, nh, T, hs) over keys/values (B, nkv, L, hs) (nkv divides nh), attn_mask (B, 1, T, L)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, d: int, nh: int, nkv: int, theta: float):
        super().__init__()
        self.nh, self.nkv, self.hs, self.theta = nh, nkv, d // nh, theta
        self.q_proj = nn.Linear(d, nh * self.hs, bias=False)
        self.k_proj = nn.Linear(d, nkv * self.hs, bias=False)
        self.v_proj = nn.Linear(d, nkv * self.hs, bias=False)
        self.o_proj = nn.Linear(nh * self.hs, d, bias=False)

    def forward(self, x, positions, attn_mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nkv, L+T, hs)
        # A cache may attend itself (the vLLM worker's: keys a group of rows share, read once)
        attend = getattr(cache, "attend", attention)
        y = attend(layer, q, k, v, attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.num_key_value_heads, cfg.rope_theta)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, attn_mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), positions, attn_mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class ScorerStep:
    """What one scorer pass leaves for decoding: per-head query vectors at each position."""

    queries: torch.Tensor  # (B, T, H*E, d_e): U_{h,e} h_t / sqrt(d_e), head-major members


class PrefixScorer(nn.Module):
    def __init__(self, config: ScorerConfig, embedding: torch.Tensor | None = None):
        super().__init__()
        a, e = config.architecture, config.embedding
        self.config = config
        H, E = len(config.heads), config.ensemble_size
        if e.source == "base":
            if embedding is None:
                raise ValueError("this scorer reuses the base model's embedding: pass base_embedding")
            if tuple(embedding.shape) != (a.vocab_size, e.dim):
                raise ValueError(f"base embedding has shape {tuple(embedding.shape)}, the scorer "
                                 f"expects ({a.vocab_size}, {e.dim})")
            # Frozen and not saved: the checkpoint stores its fingerprint instead.
            self.register_buffer("embed_weight", embedding.detach().clone(), persistent=False)
        else:
            self.embed = nn.Embedding(a.vocab_size, e.dim)
        self.in_proj = nn.Identity() if e.dim == a.hidden_size else nn.Linear(e.dim, a.hidden_size, bias=False)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        # (H*E, d_e, d) and (H*E,): with E = 1 exactly the single-projection checkpoint's tensors
        self.head_proj = nn.Parameter(torch.randn(H * E, e.dim, a.hidden_size) * a.hidden_size**-0.5)
        self.head_bias = nn.Parameter(torch.zeros(H * E))
        n = config.normalization
        self.register_buffer("norm_mean", torch.tensor(n.mean, dtype=torch.float32))  # (H, P)
        self.register_buffer("norm_std", torch.tensor(n.std, dtype=torch.float32))  # (H, P)

    # -- pieces -------------------------------------------------------------------------------
    @property
    def embedding(self) -> torch.Tensor:
        return self.embed_weight if hasattr(self, "embed_weight") else self.embed.weight

    @property
    def num_heads(self) -> int:
        return len(self.config.heads)

    @property
    def ensemble_size(self) -> int:
        """E: value projections per head (1: no ensemble, no spread)."""
        return self.config.ensemble_size

    def head_values(self, members: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Per-head values (the ensemble mean) of member values: H*E members on `dim` -> H heads."""
        E = self.ensemble_size
        if E == 1:
            return members
        dim = dim % members.dim()
        return members.unflatten(dim, (self.num_heads, E)).mean(dim + 1)

    def parameter_count(self) -> int:
        """Parameters the scorer adds (a base embedding it reuses is not counted)."""
        return sum(p.numel() for p in self.parameters())

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> ScorerStep:
        """Read tokens (B, T) and return the per-head queries at each of them.

        positions (B, T): token positions (default 0..T-1 after the cache). valid (B, T): False for
        padding or placeholder tokens, which no later token may attend to. With `cache`, the new
        keys/values are appended to it (incremental decoding). last_only: queries (B, 1, ...) at the
        last token only (a prefill's: the head projections at every token cost a sixth of its pass).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        if positions is None:
            start = cache.mask.sum(1, keepdim=True) if past else torch.zeros(B, 1, dtype=torch.long,
                                                                             device=input_ids.device)
            positions = start + torch.arange(T, device=input_ids.device)
        key_valid = valid if cache is None else (valid if past == 0 else torch.cat([cache.mask, valid], 1))
        if cache is not None:
            cache.mask = key_valid
        attn_mask = self._attention_mask(key_valid, T, past)
        x = self.in_proj(F.embedding(input_ids, self.embedding))
        for i, block in enumerate(self.layers):
            x = block(x, positions, attn_mask, cache, i)
        h = self.norm(x[:, -1:] if last_only else x)  # (B, T, d)
        q = torch.einsum("btd,hed->bthe", h, self.head_proj) / math.sqrt(self.head_proj.shape[1])
        return ScorerStep(queries=q)

    @staticmethod
    def _attention_mask(key_valid: torch.Tensor, T: int, past: int) -> torch.Tensor:
        """(B, 1, T, past+T) bool: causal, valid keys only, and each token sees itself (so that a
        padding query never has every key masked, which would give NaN)."""
        L = past + T
        dev = key_valid.device
        qpos = past + torch.arange(T, device=dev)[:, None]  # (T, 1)
        kpos = torch.arange(L, device=dev)[None, :]  # (1, L)
        causal = kpos <= qpos  # (T, L)
        mask = causal[None] & key_valid[:, None, :]  # (B, T, L)
        mask = mask | (kpos == qpos)[None]
        return mask[:, None]

    # -- values -------------------------------------------------------------------------------
    def values(self, queries: torch.Tensor) -> torch.Tensor:
        """Raw Q of every member and every next token: (..., H*E, d_e) -> (..., H*E, V)."""
        return queries @ self.embedding.T.to(queries.dtype) + self.head_bias[:, None]

    def values_at(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Raw Q of given next tokens. queries (N, H*E, d_e), tokens (N, k) -> (N, H*E, k)."""
        e = F.embedding(tokens, self.embedding).to(queries.dtype)  # (N, k, d_e)
        return torch.einsum("nhe,nke->nhk", queries, e) + self.head_bias[:, None]

    def combined_values(self, queries: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
        """Combined normalised value sum_h w_h (Q_h - mean_h) / std_h of every next token (N, V),
        Q_h being the ensemble mean. Q is linear in the queries, so the members are mixed first and
        the vocabulary is touched once: (N, d_e) x (d_e, V). queries (N, H*E, d_e); mean, std,
        weights (N, H)."""
        E = self.ensemble_size
        scale = weights / std  # (N, H)
        member_scale = scale.repeat_interleave(E, dim=1) / E  # (N, H*E): the mean over members
        q = (queries * member_scale[..., None]).sum(1)  # (N, d_e)
        offset = (member_scale * self.head_bias[None]).sum(1) - (scale * mean).sum(1)  # (N,)
        return q @ self.embedding.T.to(q.dtype) + offset[:, None]

    def norm_stats(self, gen_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (N, H) for generated-token positions (N,), clipped to the last bucket."""
        p = gen_positions.clamp(max=self.norm_mean.shape[1] - 1)
        return self.norm_mean[:, p].T, self.norm_std[:, p].T

    def score(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Full recompute: raw member Q (B, T, H*E, V) at every position of (B, T) token ids."""
        return self.values(self.forward(input_ids, valid=valid).queries)
