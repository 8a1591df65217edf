"""The reward service: batching across callers, Python rewards, and an HTTP reward model served by
the test (a real HTTP server on 127.0.0.1) that is fine, slow, failing or answering garbage."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from cdserve.rewards import RewardConfig, RewardError, RewardService
from prefix_scorers.rewards import registry
from prefix_scorers.rewards.builtin import concise, vader_compound

WAIT_S = 10  # a future's result() limit: far above any expected latency


# --- an HTTP reward model, one behaviour per path ---

class RewardModel(BaseHTTPRequestHandler):
    release = threading.Event()  # /slow answers once this is set (or after 30 s)

    def do_POST(self):
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
        lengths = [float(len(t)) for t in texts]
        status, body = 200, {"scores": lengths}
        if self.path == "/slow":
            self.release.wait(30)
        elif self.path == "/fail":
            status, body = 500, "model exploded"
        elif self.path == "/notjson":
            body = "<html>oops</html>"
        elif self.path == "/count":
            body = {"scores": lengths[:-1]}
        elif self.path == "/nan":
            body = {"scores": [float("nan")] * len(texts)}
        elif self.path == "/range":
            body = {"scores": [5.0] * len(texts)}
        elif self.path == "/strings":
            body = {"scores": ["high"] * len(texts)}
        elif self.path == "/noscores":
            body = {"score": lengths}
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (the slow path)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def reward_url():
    RewardModel.release.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RewardModel)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    RewardModel.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def make():
    """Build services (closed at the end), each with a listener recording its calls."""
    services = []

    def _make(**config) -> tuple[RewardService, list[tuple]]:
        service = RewardService(RewardConfig(**config))
        events: list[tuple] = []
        service.add_listener(lambda *e: events.append(e))
        services.append(service)
        return service, events

    yield _make
    for s in services:
        s.close()


@pytest.fixture
def counted(monkeypatch):
    """A Python reward (len of each text) that records its calls; 'bad' makes it raise, 'hang'
    makes it wait for `release`."""
    calls: list[list[str]] = []
    release = threading.Event()

    def fn(texts):
        calls.append(list(texts))
        if "bad" in texts:
            raise ValueError("cannot score 'bad'")
        if "hang" in texts:
            release.wait(30)
        return [len(t) for t in texts]

    monkeypatch.setitem(registry._REGISTRY, "test_len", registry.Reward("test_len", fn, "length", (0, 1e9)))
    yield calls
    release.set()


# --- batching, Python rewards ---

def test_concurrent_submits_share_calls_and_keep_order(make, counted):
    service, events = make(python=["test_len"], batch_wait_ms=500)
    n = 8
    start = threading.Barrier(n)
    futures: list = [None] * n

    def caller(i):  # one submit every 30 ms, all within the batch wait
        start.wait()
        time.sleep(0.03 * i)
        futures[i] = service.submit("test_len", ["x" * (i + 1), "y" * (10 * i + 1), ""])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, f in enumerate(futures):
        assert f.result(WAIT_S) == [i + 1, 10 * i + 1, 0]
    assert len(counted) <= 2, f"{n} concurrent submits made {len(counted)} calls"
    assert sum(len(c) for c in counted) == 3 * n
    assert [(e[0], e[1], e[3]) for e in events] == [("test_len", len(c), True) for c in counted]


def test_max_batch_splits_a_call(make, counted):
    service, events = make(python=["test_len"], max_batch=5, batch_wait_ms=50)
    texts = ["a" * k for k in range(12)]
    assert service.submit("test_len", texts).result(WAIT_S) == list(range(12))
    assert sorted(len(c) for c in counted) == [2, 5, 5]
    assert sorted(e[1] for e in events) == [2, 5, 5]


def test_a_failing_call_fails_only_its_futures(make, counted):
    service, events = make(python=["test_len", "concise"], max_batch=1, batch_wait_ms=100)
    good, bad, other = (service.submit("test_len", [t]) for t in ("good", "bad", "fine"))
    short = service.submit("concise", ["two words"])
    assert good.result(WAIT_S) == [4] and other.result(WAIT_S) == [4]
    with pytest.raises(RewardError, match="Python reward 'test_len' raised ValueError: cannot score") as e:
        bad.result(WAIT_S)
    assert e.value.reward == "test_len"
    assert short.result(WAIT_S) == [1 - 2 / 50]
    assert sorted(ok for *_, ok in events) == [False, True, True, True]


def test_a_hung_python_reward_times_out(make, counted):
    service, events = make(python=["test_len"], timeout_s=0.3, threads=2, batch_wait_ms=0)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"did not answer within 0.3 s \(rewards.timeout_s\)"):
        service.submit("test_len", ["hang"]).result(WAIT_S)
    assert time.monotonic() - t0 < 3
    assert service.submit("test_len", ["ok"]).result(WAIT_S) == [2]  # the other pool thread
    assert [e[3] for e in events] == [False, True]


def test_builtin_rewards_through_the_service(make):
    service, events = make()
    texts = ["I love this, it is wonderful!", "This is awful and I hate it.", ""]
    assert service.submit("concise", texts).result(WAIT_S) == concise(texts)
    assert service.submit("vader_compound", texts).result(WAIT_S) == vader_compound(texts)
    assert {"civility", "concise", "readable", "vader_compound"} <= set(service.names())
    assert {(e[0], e[1], e[3]) for e in events} == {("concise", 3, True), ("vader_compound", 3, True)}
    assert service.submit("concise", []).result(WAIT_S) == []


def test_unknown_reward_is_refused_at_once(make):
    service, _ = make(python=["concise"])
    with pytest.raises(RewardError, match=r"unknown reward 'vader_compound': this server can call \['concise'\]"):
        service.submit("vader_compound", ["x"])


@pytest.mark.parametrize("config, message", [
    ({"python": ["concise", "happy"]}, r"unknown Python rewards \['happy'\]: registered rewards are \[.*'concise'"),
    ({"http": {"concise": "http://127.0.0.1:1/"}}, r"HTTP rewards \['concise'\] have the names of registered"),
    ({"http": {"m": "127.0.0.1:1"}}, "must start with http:// or https://"),
    ({"http": {"m": "http://h/"}, "http_range": {"n": (0, 1)}}, r"http_range names \['n'\]"),
    ({"http": {"m": "http://h/"}, "http_range": {"m": (1, 0)}}, "min <= max"),
    ({"modules": ["no_such_reward_module"]}, "cannot import a reward module"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_bad_configuration_is_refused(config, message):
    with pytest.raises(ValidationError, match=message):
        RewardConfig(**config)


def test_close_fails_what_is_pending(make, counted):
    service, _ = make(python=["test_len"], batch_wait_ms=10_000)
    pending = service.submit("test_len", ["x"])
    service.close()
    with pytest.raises(RewardError, match="shut down"):
        pending.result(WAIT_S)
    with pytest.raises(RewardError, match="shut down"):
        service.submit("test_len", ["x"])


# --- an HTTP reward model ---

def test_http_reward_model(make, reward_url):
    service, events = make(python=[], http={"len": f"{reward_url}/ok", "raw": f"{reward_url}/ok"},
                           http_range={"len": (0, 100)}, batch_wait_ms=500)
    futures = []
    for i in range(4):
        futures.append(service.submit("len", ["a" * i, "b"]))
        time.sleep(0.03)
    assert [f.result(WAIT_S) for f in futures] == [[i, 1] for i in range(4)]
    assert [(e[0], e[1], e[3]) for e in events] == [("len", 8, True)]  # one request for all four
    described = "HTTP reward model (configured at start-up)"  # no URL: clients see this
    assert service.describe() == [
        {"name": "len", "description": described, "kind": "http", "range": [0, 100]},
        {"name": "raw", "description": described, "kind": "http", "range": [None, None]}]  # unbounded, JSON-safe


def test_slow_http_reward_times_out_and_later_calls_work(make, reward_url):
    # One pool thread: the next call can only run once the HTTP client gave up on the slow one.
    service, events = make(python=[], http={"slow": f"{reward_url}/slow", "ok": f"{reward_url}/ok"},
                           timeout_s=1.0, threads=1, batch_wait_ms=0)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"HTTP reward 'slow' did not answer within 1 s") as e:
        service.submit("slow", ["x"]).result(WAIT_S)
    assert e.value.reward == "slow" and time.monotonic() - t0 < 5
    assert service.submit("ok", ["abc"]).result(WAIT_S) == [3]
    assert [(e[0], e[3]) for e in events] == [("slow", False), ("ok", True)]


@pytest.mark.parametrize("path, message, detail", [
    ("/fail", r"answered HTTP 500; see the reward model's log", "model exploded"),
    ("/notjson", r"answered something that is not JSON; it must answer \{\"scores\"", "<html>oops</html>"),
    ("/noscores", r"answered JSON without a 'scores' list", '{"score": [2.0, 1.0]}'),
    ("/count", r"returned 1 scores for 2 texts; it must return one per text", ""),
    ("/nan", r"returned nan for text 0 \('ab'\): scores must be finite", ""),
    ("/range", r"returned 5.0 for text 0 \('ab'\), outside its declared range \[0, 1\]", ""),
    ("/strings", r"returned 'high' for text 0 \('ab'\): not a number", ""),
])
def test_http_reward_garbage_is_a_clear_error(make, reward_url, path, message, detail, caplog):
    service, events = make(python=[], http={"bad": f"{reward_url}{path}", "ok": f"{reward_url}/ok"},
                           http_range={"bad": (0, 1)})
    with pytest.raises(RewardError, match=message) as e:
        service.submit("bad", ["ab", "c"]).result(WAIT_S)
    assert e.value.reward == "bad" and str(e.value).startswith("HTTP reward 'bad' ")
    assert reward_url not in str(e.value) and detail in e.value.detail  # the client sees neither
    assert f"{reward_url}{path}" in caplog.text and detail in caplog.text  # the log has both
    assert service.submit("ok", ["ab"]).result(WAIT_S) == [2]
    assert [(e[0], e[1], e[3]) for e in events] == [("bad", 2, False), ("ok", 1, True)]


def test_unreachable_http_reward(make):
    service, events = make(python=[], http={"gone": "http://127.0.0.1:1/score"})
    with pytest.raises(RewardError, match=r"could not be reached \(ConnectError\); check that it is running"):
        service.submit("gone", ["x"]).result(WAIT_S)
    assert events[0][3] is False
