"""The playground page (GET /playground) in a real browser: headless Chromium from Debian
(deploy/install-chromium.sh), driven by Playwright for Python, against a live server on the tiny
model. Screenshots land in each test's tmp_path (pytest prints where on failure)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest

from cdserve.server.playground import STATIC_DIR

CHROMIUM = "/usr/bin/chromium"
KEY = "playground-key-42"
ANSWER_TIMEOUT_MS = 60_000
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


# ---------------------------------------------------------------- browser fixtures

@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        msg = f"{CHROMIUM} is not installed: run deploy/install-chromium.sh"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        # Debian's Chromium, never Playwright's own download (there is none here).
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


RECORD_ANSWERS = """
window.__answers = [];
const pageFetch = window.fetch;
window.fetch = async (url, init) => {
  const response = await pageFetch(url, init);
  if (String(url).endsWith("completions") && init && init.body) {
    const mode = JSON.parse(init.body).control.mode;
    response.clone().text().then((body) => window.__answers.push(
      {mode, body, type: response.headers.get("content-type")}));
  }
  return response;
};
"""


class Page:
    """A page plus what it logged: console errors and warnings, uncaught exceptions, and every
    request it made (URL, method, body)."""

    def __init__(self, browser, base_url: str, viewport: dict, **context_kw):
        self.context = browser.new_context(viewport=viewport, **context_kw)
        self.page = self.context.new_page()
        self.base_url = base_url
        self.console: list[str] = []
        self.requests: list = []
        self.page.on("console", lambda m: m.type in ("error", "warning")
                     and self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r))
        # The answers as the page received them: a clone of each streamed response (the page
        # still reads its own copy chunk by chunk). Streamed bodies are not kept by the browser.
        self.page.add_init_script(RECORD_ANSWERS)

    def open(self) -> None:
        self.page.goto(f"{self.base_url}/playground")

    def wait_for_sliders(self) -> None:
        self.page.wait_for_selector("#heads input[type=range]")

    def posts(self, path: str) -> list[dict]:
        return [json.loads(r.post_data) for r in self.requests
                if r.method == "POST" and r.url.endswith(path)]

    def foreign_requests(self) -> list[str]:
        return [r.url for r in self.requests
                if not (r.url.startswith(self.base_url + "/") or r.url.startswith("data:"))]

    def run_and_wait(self) -> None:
        self.page.click("#run")
        for panel in ("plain", "steered"):
            self.page.wait_for_selector(f"#{panel} [data-metric=KL], #{panel} [data-role=error]:not([hidden])",
                                        timeout=ANSWER_TIMEOUT_MS)

    def shot(self, path: Path) -> None:
        self.page.screenshot(path=str(path), full_page=True)


@pytest.fixture
def open_page(browser, tmp_path):
    pages: list[Page] = []

    def _open(server, viewport=DESKTOP, **context_kw) -> Page:
        p = Page(browser, server.url, viewport, **context_kw)
        pages.append(p)
        p.open()
        return p

    yield _open
    for p in pages:
        p.context.close()


def scorer_info(server) -> dict:
    with server.http() as http:
        return http.get("/v1/scorers").json()["data"][0]


def answer_control(response_text: str) -> dict:
    """The `control` a streamed answer reported (its last chunk carries it)."""
    controls = [c["control"] for line in response_text.splitlines() if line.startswith("data: {")
                for c in json.loads(line[6:]).get("choices", []) if c.get("control")]
    assert len(controls) == 1, response_text
    return controls[0]


def shown_values(page, panel: str) -> dict[str, float]:
    rows = page.page.locator(f"#{panel} [data-metric]")
    return {rows.nth(i).get_attribute("data-metric"): float(rows.nth(i).get_attribute("data-value"))
            for i in range(rows.count())}


# ---------------------------------------------------------------- served offline, from the package

def test_page_and_its_files_are_served_from_the_package(server):
    index = httpx.get(f"{server.url}/", timeout=10)
    assert index.status_code == 200 and 'href="/playground"' in index.text
    page = httpx.get(f"{server.url}/playground", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Only this server's files may load: a CDN link would be refused by the browser.
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', page.text)
    assert sorted(assets) == ["/playground/static/playground.css", "/playground/static/playground.js"]
    for asset in assets:
        r = httpx.get(f"{server.url}{asset}", timeout=10)
        assert r.status_code == 200 and r.text == (STATIC_DIR / Path(asset).name).read_text()
        assert "default-src 'self'" in r.headers["content-security-policy"]
    for f in STATIC_DIR.iterdir():
        assert not re.search(r"https?://", f.read_text()), f"{f.name} links to another host"


def test_package_data_ships_every_playground_file():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).parents[3]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cdserve"]
    files = [f.relative_to(root / "cdserve").as_posix() for f in STATIC_DIR.rglob("*") if f.is_file()]
    assert files
    for f in files:
        assert any(fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns), \
            f"{f} is not in [tool.setuptools.package-data] cdserve"


# ---------------------------------------------------------------- the page in Chromium

def test_page_loads_without_console_errors_and_sliders_match_scorers(open_page, server, tmp_path):
    p = open_page(server)
    p.wait_for_sliders()
    info = scorer_info(server)
    page = p.page
    sliders = page.locator("#heads input[type=range]")
    assert sliders.count() == len(info["heads"])
    weights = info["ranges"]["weights"]
    for i, head in enumerate(info["heads"]):
        slider = sliders.nth(i)
        assert slider.get_attribute("data-head") == head["name"]
        assert float(slider.get_attribute("min")) == weights["min"]
        assert float(slider.get_attribute("max")) == weights["max"]
        assert float(slider.input_value()) == head["default_weight"]
        assert float(page.input_value(f"#wn-{head['name']}")) == head["default_weight"]
        row = page.locator(f".head:has(#w-{head['name']})")
        assert head["description"] in row.inner_text()
    defaults, ranges = info["defaults"], info["ranges"]
    for field in ("strength", "top_k", "plausibility", "block_size", "num_candidates"):
        box = page.locator(f"#{field}")
        assert float(box.input_value()) == defaults[field]
        assert float(box.get_attribute("min")) == ranges[field]["min"]
        assert float(box.get_attribute("max")) == ranges[field]["max"]
    assert page.input_value("#tail") == defaults["tail"]
    assert page.locator("#scorer-warning").is_visible() == (not info["trained"])

    # Only the fields a mode uses are shown.
    def visible() -> set[str]:
        return {f for f in ("strength", "top_k", "tail", "plausibility", "block_size", "num_candidates", "selection")
                if page.locator(f"#{f}").is_visible()}

    page.select_option("#mode", "token")
    assert visible() == {"strength", "top_k", "tail", "plausibility"}
    page.select_option("#mode", "block")
    page.select_option("#selection", "argmax")
    assert visible() == {"block_size", "num_candidates", "selection"}
    page.select_option("#selection", "sample")
    assert visible() == {"block_size", "num_candidates", "selection", "strength"}
    page.select_option("#mode", "best_of_n")
    assert visible() == {"num_candidates", "selection", "strength"}

    p.shot(tmp_path / "loaded.png")
    assert p.console == []
    assert p.foreign_requests() == []


def test_slider_then_run_streams_two_answers_with_values_and_kl(open_page, server, tmp_path):
    p = open_page(server)
    p.wait_for_sliders()
    page = p.page
    page.fill("#max_tokens", "12")
    page.fill("#seed", "7")
    page.select_option("#mode", "token")
    page.select_option("#tail", "keep")
    # Move the slider as a user would: focus it and step it with the keyboard.
    slider = page.locator("#w-positive")
    start = float(slider.input_value())
    slider.focus()
    for _ in range(15):
        page.keyboard.press("ArrowRight")
    moved = float(slider.input_value())
    assert moved > start
    assert float(page.input_value("#wn-positive")) == moved

    p.run_and_wait()
    p.shot(tmp_path / "answers.png")

    plain_body, steered_body = sorted(p.posts("/v1/chat/completions"), key=lambda b: b["control"]["mode"] != "none")
    assert plain_body["stream"] is steered_body["stream"] is True
    assert plain_body["seed"] == steered_body["seed"] == 7
    assert plain_body["control"] == {"mode": "none", "weights": {"positive": moved}}
    assert steered_body["control"]["mode"] == "token"
    assert steered_body["control"]["weights"] == {"positive": moved}
    assert steered_body["control"]["tail"] == "keep"
    answers = {a["mode"]: a for a in page.evaluate("window.__answers")}
    assert set(answers) == {"none", "token"}

    info = scorer_info(server)
    heads = [h["name"] for h in info["heads"]]
    texts = {}
    for panel, mode in (("plain", "none"), ("steered", "token")):
        assert answers[mode]["type"].startswith("text/event-stream")
        control = answer_control(answers[mode]["body"])
        shown = shown_values(p, panel)
        assert list(shown) == [*heads, "combined", "KL"]
        for head in heads:
            assert shown[head] == pytest.approx(control["values"][head])
        assert shown["combined"] == pytest.approx(control["combined"])
        assert shown["KL"] == pytest.approx(control["kl"])
        texts[panel] = page.inner_text(f"#{panel} [data-role=text]")
        assert texts[panel].strip()
        assert f"{control['tokens_generated']} tokens" in page.inner_text(f"#{panel} [data-role=status]")
    assert shown_values(p, "plain")["KL"] == 0
    assert shown_values(p, "steered")["KL"] > 0
    assert texts["plain"] != texts["steered"]
    assert page.locator("#steered .bar-row.weighted").count() == 1  # the weighted head stands out
    assert p.console == []


def test_out_of_range_weight_shows_the_servers_400_message(open_page, server, tmp_path):
    p = open_page(server)
    p.wait_for_sliders()
    page = p.page
    page.fill("#wn-specific", "1e6")
    p.run_and_wait()
    p.shot(tmp_path / "error.png")
    # What the server says about this very request, asked directly.
    body = {**p.posts("/v1/chat/completions")[0], "stream": False}
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "control.weights.specific"
    for panel in ("plain", "steered"):
        shown = page.locator(f"#{panel} [data-role=error]")
        assert shown.is_visible()
        assert error["message"] in shown.inner_text()
        assert "refused the request (400)" in shown.inner_text()
        assert page.inner_text(f"#{panel} [data-role=text]") == ""
    assert page.get_attribute("#wn-specific", "aria-invalid") == "true"


@pytest.mark.parametrize("status, body, headers, words", [
    (503, {"error": {"message": "the queue is full (64 waiting)", "type": "service_unavailable_error"}},
     {"Retry-After": "3"}, "busy or not ready (503): the queue is full (64 waiting). Try again in 3 s."),
    (401, {"error": {"message": "incorrect API key", "type": "authentication_error"}},
     {}, "needs a valid API key (401): incorrect API key"),
])
def test_errors_are_shown_in_words(open_page, server, status, body, headers, words):
    """Errors a test cannot provoke cheaply (a full queue) are answered by a stub route."""
    p = open_page(server)
    p.wait_for_sliders()
    p.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=status, json=body, headers=headers))
    p.run_and_wait()
    for panel in ("plain", "steered"):
        assert words in p.page.inner_text(f"#{panel} [data-role=error]")


def test_error_inside_the_stream_is_shown(open_page, server):
    p = open_page(server)
    p.wait_for_sliders()
    frames = ('data: {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}\n\n'
              'data: {"error": {"message": "engine failed: out of memory", "type": "internal_error"}}\n\n'
              "data: [DONE]\n\n")
    p.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, body=frames, headers={"Content-Type": "text/event-stream"}))
    p.run_and_wait()
    assert "failed while streaming: engine failed: out of memory" in p.page.inner_text("#steered [data-role=error]")
    assert p.page.inner_text("#steered [data-role=text]") == "Hel"


# ---------------------------------------------------------------- copy as

def run_shell(command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    assert shutil.which("curl"), "curl is needed to run the copied command"
    return subprocess.run(["bash", "-c", command], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_copied_curl_command_returns_200_with_the_same_control(open_page, server, tmp_path):
    p = open_page(server, permissions=["clipboard-read", "clipboard-write"])
    p.wait_for_sliders()
    page = p.page
    # Quotes, an apostrophe and a newline: the shell quoting must carry them intact.
    prompt = 'It\'s "quoted" and $HOME stays literal;\nsecond line'
    page.fill("#prompt", prompt)
    page.fill("#max_tokens", "10")
    page.fill("#seed", "3")
    page.fill("#wn-concise", "0.5")
    page.fill("#strength", "4")
    page.fill("#top_k", "10")
    page.fill("#plausibility", "0.05")
    p.run_and_wait()
    page.check("input[name=copy-as][value=curl]")
    page.click("#copy")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.inner_text("#snippet")
    (tmp_path / "copied.sh").write_text(copied)

    done = run_shell(copied + " -w '\\n%{http_code}'")
    assert done.returncode == 0, done.stderr
    response, status = done.stdout.rsplit("\n", 1)
    assert status == "200", response
    steered = next(b for b in p.posts("/v1/chat/completions") if b["control"]["mode"] != "none")
    sent = json.loads(re.search(r"-d '(.*)'", copied, re.DOTALL).group(1).replace("'\\''", "'"))
    assert sent == {k: v for k, v in steered.items() if k != "stream"}
    assert sent["messages"][0]["content"] == prompt
    assert sent["control"] == {"mode": "token", "weights": {"positive": 1.0, "concise": 0.5},
                               "strength": 4, "top_k": 10, "tail": "drop", "plausibility": 0.05}
    choice = json.loads(response)["choices"][0]
    assert choice["control"]["mode"] == "token"
    assert set(choice["control"]["values"]) == {h["name"] for h in scorer_info(server)["heads"]}


def test_copied_python_code_runs(open_page, server):
    p = open_page(server)
    p.wait_for_sliders()
    page = p.page
    page.fill("#max_tokens", "6")
    page.check("input[name=kind][value=completion]")
    page.select_option("#mode", "best_of_n")
    page.select_option("#selection", "sample")
    page.fill("#num_candidates", "2")
    page.check("input[name=copy-as][value=python]")
    code = page.inner_text("#snippet")
    assert 'extra_body={"control": ' in code and "client.completions.create(" in code
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    control = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert control["mode"] == "best_of_n"


# ---------------------------------------------------------------- API key and phone width

@pytest.fixture(scope="module")
def keyed(launch):
    return launch("--max-model-len", "1024", "--max-tokens-limit", "100", api_key=KEY)


def test_api_key_is_asked_for_and_stays_in_the_browser(open_page, keyed, tmp_path):
    p = open_page(keyed)
    page = p.page
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    assert "needs a valid API key" in notice.inner_text()
    assert page.locator("#run").is_disabled()
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    p.wait_for_sliders()
    assert notice.is_hidden()
    page.fill("#max_tokens", "6")
    p.run_and_wait()
    assert page.locator("[data-role=error]:visible").count() == 0
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in p.requests if "/v1/" in r.url
               and r.method == "POST")
    snippet = page.inner_text("#snippet")
    assert KEY not in snippet and "Bearer $CDSERVE_API_KEY" in snippet
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert p.context.cookies() == []
    done = run_shell(snippet + " -w '\\n%{http_code}'", env={"CDSERVE_API_KEY": KEY})
    assert done.stdout.rsplit("\n", 1)[1] == "200", done.stdout
    p.shot(tmp_path / "keyed.png")
    # The 401 on load is the only thing the console may mention.
    assert all("401" in line for line in p.console), p.console


def test_phone_width(open_page, server, tmp_path):
    p = open_page(server, viewport=PHONE)
    p.wait_for_sliders()
    page = p.page
    page.fill("#max_tokens", "8")
    p.run_and_wait()
    p.shot(tmp_path / "phone.png")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    plain = page.locator("#plain").bounding_box()
    steered = page.locator("#steered").bounding_box()
    assert steered["y"] >= plain["y"] + plain["height"]  # stacked, not squeezed side by side
    for el in ("#prompt", "#run", "#w-positive", "#snippet"):
        box = page.locator(el).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], el
    assert p.console == []
