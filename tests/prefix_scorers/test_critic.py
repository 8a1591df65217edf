"""The critic labeller: reply parsing, a real HTTP server that answers badly (garbage, wrong
counts, out of range, non-JSON bodies, errors, slow replies), and a live cdserve serving the tiny
model as the critic."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from prefix_scorers.critic import (
    Critic,
    CriticConfig,
    build_messages,
    copies_example,
    parse_ratings,
)

S = (1.0, 10.0)


@pytest.mark.parametrize("reply,k,expected", [
    ('{"1": 7, "2": 3}', 2, [7, 3]),
    ('Here you go:\n```json\n{"segment 1": "8", "[2]": {"rating": 4}, "3": "6/10"}\n```', 3, [8, 4, 6]),
    ("[4, 5, 6]", 3, [4, 5, 6]),
    ("1: 7\n2. 5\nSegment 3 - 8/10\n**4**: 2", 4, [7, 5, 8, 2]),
    ('{"1": 7}', 3, [7, None, None]),  # missing numbers
    ('{"1": 0, "2": 11, "3": -4, "4": 10}', 4, [None, None, None, 10]),  # out of the scale
    ('{"1": "great", "2": null, "3": true, "4": NaN}', 4, [None] * 4),  # not numbers
    ('{"1": 3, "7": 9, "0": 5}', 2, [3, None]),  # segments that do not exist are ignored
    ("[4, 5]", 3, [None] * 3),  # a list of the wrong length cannot be aligned
    # SmolLM2-135M's reply as critic: it quotes the numbered segments ("[1]" parses as a JSON list)
    # before the object that rates them
    ('[1] It was great,\n[2] I went hiking\n\nThe JSON format is:\n{\n  "1": 10,\n  "2": 1\n}', 2, [10, 1]),
    ("Segments [1] and [2]: [6, 4]", 2, [6, 4]),  # the first list of k entries
    ("1: 5\n1: 6\n2: 3", 2, [None, 3]),  # contradictory ratings
    ("I think the answer is lovely overall.", 2, [None, None]),  # no ratings at all
    ('{"1": 7, "2": ', 2, [7, None]),  # JSON cut short: the line form still reads "1": 7
    ("", 1, [None]),
    (None, 2, [None, None]),
])
def test_parse_ratings(reply, k, expected):
    assert parse_ratings(reply, k, S) == expected


def test_ratings_that_only_copy_the_prompts_example_are_recognised():
    assert copies_example([10, 1, 10], S) and copies_example([10, 1, 10, None], S)
    assert copies_example([10, 1], S)
    assert not copies_example([10, 1, 10, 4], S)  # more than the example: a rating
    assert not copies_example([10, 1, 9], S) and not copies_example([10], S)  # one rating can be real


def test_prompt_numbers_the_segments_and_names_the_scale():
    msgs = build_messages("Review it.", [" Good food.", " Slow service,", " nice staff"], "positive sentiment", S)
    user = msgs[-1]["content"]
    assert "[1] Good food.\n[2] Slow service,\n[3] nice staff" in user
    assert "from 1 (not at all) to 10 (very much)" in user and "positive sentiment" in user and "3 segments" in user


# -- a real HTTP server that answers like a bad critic ------------------------------------------
REPLIES = {  # question -> what the server does
    "good": ("reply", '{"1": 9, "2": 2}'),
    "prose": ("reply", "Both segments are fine, I would say."),
    "count": ("reply", "[3, 4, 5]"),
    "range": ("reply", '{"1": 42, "2": 5}'),
    "fenced": ("reply", "Sure!\n```\n1: 6\n2: 7\n```"),
    # what SmolLM2-135M answers: the segments quoted, then the prompt's example {"1": 10, "2": 1}
    "copied": ("reply", '[1] first part,\n[2] second part\n{"1": 10, "2": 1}'),
    "nojson": ("raw", b"this is not JSON at all"),
    "nochoices": ("raw", json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                     "choices": []}).encode()),
    "error": ("status", 500),
    "slow": ("sleep", 30.0),
}


class BadCritic(BaseHTTPRequestHandler):
    calls: ClassVar[dict[str, int]] = {}
    inflight = 0
    max_inflight = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, json.dumps({"object": "list", "data": [{"id": "bad-critic", "object": "model",
                                                                  "created": 0, "owned_by": "test"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"].split("Question: ")[1].split("\n")[0]
        cls = type(self)
        with cls.lock:
            cls.calls[question] = cls.calls.get(question, 0) + 1
            cls.inflight += 1
            cls.max_inflight = max(cls.max_inflight, cls.inflight)
        try:
            kind, arg = REPLIES[question]
            time.sleep(0.05)  # long enough for requests to overlap
            if kind == "sleep":
                time.sleep(arg)
                kind, arg = "reply", '{"1": 5, "2": 5}'
            if kind == "status":
                self._send(arg, b'{"error": {"message": "boom"}}')
            elif kind == "raw":
                self._send(200, arg)
            else:
                self._send(200, json.dumps({
                    "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": arg}}]}).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)
        finally:
            with cls.lock:
                cls.inflight -= 1


@pytest.fixture
def bad_critic():
    BadCritic.calls, BadCritic.inflight, BadCritic.max_inflight = {}, 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), BadCritic)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_bad_critic_replies_become_missing_labels_never_errors(bad_critic):
    critic = Critic(CriticConfig(base_url=bad_critic, timeout=1.0, retries=1, concurrency=3))
    items = [(q, [" first part,", " second part"], "positive sentiment") for q in REPLIES]
    t0 = time.monotonic()
    results = dict(zip(REPLIES, critic.rate(items)))
    elapsed = time.monotonic() - t0
    ratings = {q: r for q, (r, _) in results.items()}
    assert ratings["good"] == [9, 2] and ratings["fenced"] == [6, 7]
    assert ratings["range"] == [None, 5]
    for q in ("prose", "count", "nojson", "nochoices", "error", "slow", "copied"):
        assert ratings[q] == [None, None], q
    # bounded: 1 retry for the 500 and the timeout (2 tries each), one try for every answered request
    assert BadCritic.calls["error"] == 2 and BadCritic.calls["slow"] == 2 and BadCritic.calls["good"] == 1
    assert BadCritic.max_inflight <= 3
    assert elapsed < 20, elapsed  # two 1 s timeouts plus backoff, not the 30 s the slow critic takes
    s = critic.stats
    assert s.requests == len(REPLIES) and s.failed >= 2 and s.ratings == 5 and s.missing == 2 * len(REPLIES) - 5
    assert s.copied_example == 1 and "1 replies copied the prompt's example" in s.summary()
    assert results["prose"][1] == "Both segments are fine, I would say."  # the raw reply is kept


def test_unreachable_critic():
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    item = [("q", [" a,", " b"], "positive sentiment")]
    critic = Critic(CriticConfig(base_url=url, model="m", timeout=1.0, retries=1))
    assert critic.rate(item) == [([None, None], None)]  # a named model: missing labels
    assert critic.stats.failed == 1 and critic.stats.errors["APIConnectionError"] == 1
    with pytest.raises(ValueError, match="cannot list the critic's models at .*pass --critic-model"):
        Critic(CriticConfig(base_url=url, timeout=1.0, retries=0)).rate(item)  # nothing to ask: an error


def _server_helpers():
    """tests/cdserve/server/conftest.py's start_server (one way to start a live server)."""
    path = Path(__file__).parents[1] / "cdserve" / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("cdserve_server_conftest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_critic_against_a_live_cdserve(tmp_path, tiny_model_dir, tiny_scorer_dir):
    helpers = _server_helpers()
    server = helpers.start_server(tmp_path, tiny_model_dir, tiny_scorer_dir, *helpers.TINY_FLAGS)
    try:
        critic = Critic(CriticConfig(base_url=f"{server.url}/v1", timeout=60, retries=0, concurrency=2,
                                     max_tokens=24, extra_body={"control": {"mode": "none"}}))
        items = [(f"Question {i}", [" The food was great.", " The staff was rude."], "positive sentiment")
                 for i in range(3)]
        results = critic.rate(items)
        assert critic.stats.requests == 3 and critic.stats.failed == 0
        for ratings, reply in results:
            assert isinstance(reply, str) and reply  # the tiny model's (random) answer came back
            assert len(ratings) == 2 and all(r is None or 1 <= r <= 10 for r in ratings)
    finally:
        server.stop()
