"""ARGS-style reward-guided search (Khanov et al., "ARGS: Alignment as Reward-Guided Search",
ICLR 2024), served over the OpenAI chat API so the load benchmark drives it like cdserve.

As published: at every step the base model's top-k next tokens are each appended to the
sequence, and a value model scores every candidate sequence with a full forward pass (no cache
across steps); the next token maximises `log p(z) + w * value(z)` (ARGS-greedy), or is sampled
from softmax((log p + w * value) / temperature) when temperature > 0 (ARGS-stochastic).
Requests run one at a time. The base model keeps its KV cache (that part is not ARGS's cost).

The value model is cdserve's own prefix scorer (same weights, same head combination
`sum_h w_h (Q_h - mean_h) / std_h`), read as a reward model: the value of a candidate sequence is
read at the position before its last token, at that token. So cdserve token mode and this
server differ only in the method: one incremental scorer step per token for all k candidates
at once (cdserve) against k full passes per token (ARGS).

    python -m benchmarks.baselines.args_server --port 8100 --model smollm2 --scorer default

Request: the chat body, with `control` giving `weights`, `strength` (the ARGS w) and `top_k` as
for cdserve's token mode (other control fields are ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request

from benchmarks.baselines import openai_api as api
from cdserve.control.steering import combine_heads
from cdserve.scorer_store import resolve_scorer
from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import load_scorer


class ArgsDecoder:
    """Base model + value model; `generate` yields text pieces, one token at a time."""

    def __init__(self, model: str, scorer: str, default_strength: float, default_top_k: int):
        self.model_dir = resolve_model(model, default_cache_dir()) if model == "smollm2" else Path(model)
        self.tok = load_tokenizer(self.model_dir)
        self.base = load_model(self.model_dir)
        scorer_dir = resolve_scorer(scorer, self.model_dir, default_cache_dir(), self.base, self.tok)
        self.scorer = load_scorer(scorer_dir, self.tok, self.base.get_input_embeddings().weight)
        self.heads = [h.name for h in self.scorer.config.heads]
        self.name = self.model_dir.name
        self.default_strength, self.default_top_k = default_strength, default_top_k

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        msgs = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                 else "".join(p.get("text", "") for p in m["content"])} for m in messages]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _weights(self, control: dict[str, Any]) -> torch.Tensor:
        w = control.get("weights") or {self.heads[0]: 1.0}
        return torch.tensor([[float(w.get(h, 0.0)) for h in self.heads]])  # (1, H)

    @torch.inference_mode()
    def values(self, ids: torch.Tensor, candidates: torch.Tensor, step: int,
               weights: torch.Tensor) -> torch.Tensor:
        """Combined value of each candidate sequence: k full scorer passes, batched.
        ids (1, T), candidates (k,) -> (k,)."""
        k = candidates.numel()
        seqs = torch.cat([ids.expand(k, -1), candidates[:, None]], dim=1)  # (k, T+1)
        queries = self.scorer(seqs).queries[:, -2]  # (k, H, d_e): read before the candidate
        raw = self.scorer.values_at(queries, candidates[:, None])  # (k, H, 1)
        mean, std = self.scorer.norm_stats(torch.full((k,), step))  # (k, H)
        return combine_heads(raw, mean, std, weights.expand(k, -1))[:, 0]  # (k,)

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_tokens: int, control: dict[str, Any],
                 temperature: float, emit) -> tuple[int, str]:
        """Decode; `emit(text)` receives each new piece. Returns (tokens, finish_reason)."""
        strength = float(control.get("strength", self.default_strength))
        top_k = int(control.get("top_k", self.default_top_k)) or self.default_top_k
        weights = self._weights(control)
        ids = torch.tensor([prompt])
        out = self.base(ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        output: list[int] = []
        text = ""
        for step in range(max_tokens):
            logp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(logp, top_k)
            score = top.values + strength * self.values(ids, top.indices, step, weights)  # (k,)
            if temperature > 0:
                pick = torch.multinomial(torch.softmax(score / temperature, -1), 1)[0]
            else:
                pick = score.argmax()
            token = int(top.indices[pick])
            output.append(token)
            if token == self.tok.eos_token_id:
                return len(output), "stop"
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            new_text = self.tok.decode(output, skip_special_tokens=True)
            emit(new_text[len(text):])
            text = new_text
            out = self.base(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        return len(output), "length"


def build_app(decoder: ArgsDecoder) -> FastAPI:
    app = FastAPI(title="ARGS-style baseline")
    api.add_probes(app, decoder.name)
    one_at_a_time = asyncio.Lock()

    async def run(body: dict[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        """Yields ('text', piece) per token, then ('end', (prompt_len, tokens, finish))."""
        prompt = decoder.prompt_ids(body["messages"])
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def work() -> None:
            try:
                n, finish = decoder.generate(prompt, api.max_tokens(body), body.get("control") or {},
                                             float(body.get("temperature", 1.0) or 0.0),
                                             lambda s: loop.call_soon_threadsafe(queue.put_nowait, ("text", s)))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", (len(prompt), n, finish)))
            except Exception as e:  # noqa: BLE001 - reported to the client
                loop.call_soon_threadsafe(queue.put_nowait, ("error", repr(e)))

        async with one_at_a_time:
            threading.Thread(target=work, daemon=True).start()
            while True:
                kind, item = await queue.get()
                yield kind, item
                if kind != "text":
                    return

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        cid = api.completion_id()
        if body.get("stream"):
            async def events() -> AsyncIterator[str]:
                async for kind, item in run(body):
                    if kind == "text":
                        yield api.chunk(cid, decoder.name, item)
                    elif kind == "end":
                        prompt_len, n, finish = item
                        yield api.chunk(cid, decoder.name, None, finish)
                        if (body.get("stream_options") or {}).get("include_usage"):
                            yield api.usage_chunk(cid, decoder.name, prompt_len, n)
                    else:
                        yield api.sse({"error": {"message": item, "type": "server_error"}})
                yield api.DONE
            return api.stream(events())
        text, end = "", None
        async for kind, item in run(body):
            if kind == "text":
                text += item
            elif kind == "end":
                end = item
            else:
                return api.JSONResponse({"error": {"message": item}}, status_code=500)
        prompt_len, n, finish = end
        return api.response(cid, decoder.name, text, finish, prompt_len, n)

    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--scorer", default="default", help="'default', 'untrained' or a checkpoint folder")
    ap.add_argument("--strength", type=float, default=2.0, help="default ARGS weight w")
    ap.add_argument("--top-k", type=int, default=20, help="default k")
    args = ap.parse_args(argv)
    decoder = ArgsDecoder(args.model, args.scorer, args.strength, args.top_k)
    uvicorn.run(build_app(decoder), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
