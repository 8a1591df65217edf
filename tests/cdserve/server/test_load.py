"""Concurrency, cancellation, the bounded queue and the metrics, on live servers."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

PROMPT = "Hello there"  # the tiny model answers it with a long greedy loop, never EOS


def test_32_concurrent_streams(server):
    async def one(client, i: int) -> tuple[str, int]:
        control = {"mode": "token", "weights": {"positive": 1.0}} if i % 2 else {"mode": "none"}
        stream = await client.completions.create(model=server.model, prompt=f"{PROMPT} {i}", max_tokens=16,
                                                 seed=i, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"control": control})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def main():
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    before = server.metric("cdserve_requests_total", endpoint="/v1/completions", status="200")
    results = asyncio.run(main())
    assert len(results) == 32 and all(1 <= tokens <= 16 for _, tokens in results)
    assert server.metric("cdserve_requests_total", endpoint="/v1/completions", status="200") == before + 32
    server.wait_for(lambda: server.metric("cdserve_requests_in_flight") == 0, what="in-flight back to 0")
    server.wait_for(lambda: server.metric("cdserve_requests_running") == 0, what="engine batch empty")


def test_metrics_move(server, client):
    names = ["cdserve_prompt_tokens_total", "cdserve_generation_tokens_total",
             "cdserve_time_to_first_token_seconds_count", "cdserve_time_per_output_token_seconds_count",
             "cdserve_e2e_request_latency_seconds_count", "cdserve_engine_step_seconds_count",
             "cdserve_scorer_step_seconds_count", "cdserve_candidates_generated_total"]
    before = {n: server.metric(n) for n in names}
    ok_before = server.metric("cdserve_requests_total", endpoint="/v1/chat/completions", mode="block", status="200")
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8, extra_body={"control": {"mode": "block", "block_size": 4,
                                                                             "num_candidates": 2}})
    assert r.usage.completion_tokens >= 2
    after = {n: server.metric(n) for n in names}
    assert all(after[n] > before[n] for n in names), {n: (before[n], after[n]) for n in names}
    assert after["cdserve_prompt_tokens_total"] - before["cdserve_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["cdserve_generation_tokens_total"] - before["cdserve_generation_tokens_total"] == \
        r.usage.completion_tokens
    assert server.metric("cdserve_requests_total", endpoint="/v1/chat/completions", mode="block",
                         status="200") == ok_before + 1
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("cdserve_queue_depth", "cdserve_requests_in_flight", "cdserve_batch_rows"):
        assert f"\n{name} " in text


@pytest.fixture(scope="module")
def small_server(launch):
    """One request of n=4 fills the batch; one more may wait; the next gets 503."""
    return launch("--max-model-len", "1024", "--max-tokens-limit", "1000", "--max-batch-rows", "4",
                       "--max-n", "4", "--max-waiting", "1", "--control-num-candidates", "1",
                       "--control-max-num-candidates", "1", "--retry-after-seconds", "2")


def test_full_queue_gets_503_and_a_disconnect_frees_the_batch(small_server):
    srv = small_server
    long = {"model": srv.model, "prompt": PROMPT, "max_tokens": 1000, "n": 4, "temperature": 0, "stream": True}
    short = {"model": srv.model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    closed_before = srv.metric("cdserve_requests_total", status="499")
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        # A: fills all 4 batch rows with a long stream
        with http.stream("POST", "/v1/completions", json=long) as a:
            assert a.status_code == 200
            lines = a.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            srv.wait_for(lambda: srv.metric("cdserve_batch_rows") == 4, what="A running on 4 rows")

            # B: waits for a batch slot (the queue holds one)
            b_result = {}
            b = threading.Thread(target=lambda: b_result.update(r=httpx.post(
                f"{srv.url}/v1/completions", json=short, timeout=60)))
            b.start()
            srv.wait_for(lambda: srv.metric("cdserve_queue_depth") == 1, what="B queued")

            # C: the queue is full
            c = http.post("/v1/completions", json=short)
            assert c.status_code == 503 and c.headers["retry-after"] == "2"
            assert c.json()["error"]["code"] == "queue_full"
            assert not b_result  # B is still waiting behind A
        # A's client went away mid-stream: A leaves the batch, B gets its slot and finishes
        started = time.monotonic()
        b.join(30)
    assert b_result["r"].status_code == 200, b_result["r"].text
    assert time.monotonic() - started < 10  # A alone would have run ~1000 more steps
    srv.wait_for(lambda: srv.metric("cdserve_requests_total", status="499") == closed_before + 1,
                 what="A counted as client-closed")
    srv.wait_for(lambda: srv.metric("cdserve_requests_running") == 0, what="engine batch empty")
    assert srv.metric("cdserve_requests_in_flight") == 0
    assert srv.metric("cdserve_requests_total", status="503") >= 1


def test_sigterm_drains(launch):
    """On SIGTERM: new connections are refused; a request that fits in the grace period completes
    normally; one that outlives it ends with an error event, then [DONE]; the server exits 0.
    (This is also the live test of a stream failing after it started.)"""
    srv = launch("--max-model-len", "1024", "--max-tokens-limit", "1000", "--shutdown-grace-seconds", "1.5")
    # 1000 steps of 4 rows: several seconds, well past the grace period
    long_body = {"model": srv.model, "prompt": PROMPT, "max_tokens": 1000, "n": 4, "temperature": 0,
                 "stream": True}
    short_body = {"model": srv.model, "prompt": "The cat", "max_tokens": 5, "temperature": 0, "stream": True}
    long_events: list[str] = []
    first_long = threading.Event()

    def read_long():
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=long_body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    long_events.append(line)
                    first_long.set()

    reader = threading.Thread(target=read_long)
    reader.start()
    try:
        assert first_long.wait(30)
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=short_body, timeout=60) as short:
            lines = (line for line in short.iter_lines() if line.startswith("data: "))
            short_events = [next(lines)]  # both requests are now in flight
            srv.proc.send_signal(signal.SIGTERM)
            srv.wait_for(lambda: _refused(srv.url), what="new connections refused")
            short_events.extend(lines)
        reader.join(30)
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
    assert short_events[-1] == "data: [DONE]"
    assert json.loads(short_events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert long_events[-1] == "data: [DONE]"
    error = json.loads(long_events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable_error"
    assert "finished server process" in srv.log().lower()


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return False
    except httpx.TransportError:
        return True
