"""Schemathesis against a live server's own /openapi.json: requests generated from the schema
(fixed seed, bounded) must never get a 5xx, every response must match the schema, and every
schema-valid request must be accepted; schema-invalid ones must be refused with a 4xx.

CI runs a few hundred cases. The longer local fuzz (benchmarks/RESULTS.md, "API conformance")
is the same test with more examples per operation:

    CDSERVE_FUZZ_EXAMPLES=800 CDSERVE_FUZZ_MAX_TIME=480 \
        .venv/bin/python -m pytest -q -s tests/cdserve/server/test_fuzz.py::test_schemathesis

(CDSERVE_FUZZ_MAX_TIME: schemathesis's --max-time, fuzzing repeats until that many seconds are spent.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Small limits keep each case cheap (max_tokens <= 2) and make n x num_candidates always fit
# max_batch_rows, so that every request the schema allows can be scheduled.
FUZZ_FLAGS = ("--max-model-len", "1024", "--max-tokens-limit", "2", "--max-n", "2",
              "--control-max-num-candidates", "4", "--control-max-block-size", "8",
              "--max-batch-rows", "64", "--max-body-bytes", "1000000")
EXAMPLES = int(os.environ.get("CDSERVE_FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("CDSERVE_FUZZ_SEED", "20261128"))
MAX_TIME = os.environ.get("CDSERVE_FUZZ_MAX_TIME")
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,positive_data_acceptance,negative_data_rejection")


def schemathesis(url: str, report: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
           "--checks", CHECKS, "--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "1",
           "--phases", "examples,coverage,fuzzing", "--request-timeout", "60", "--no-color",
           "--report", "junit", "--report-junit-path", str(report), "--continue-on-failure",
           *(["--max-time", MAX_TIME] if MAX_TIME else []), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800, cwd=report.parent,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})


@pytest.fixture(scope="module")
def fuzz_server(launch):
    return launch(*FUZZ_FLAGS)


def test_schemathesis(fuzz_server, tmp_path):
    srv = fuzz_server
    run = schemathesis(srv.url, tmp_path / "junit.xml")
    out = run.stdout + run.stderr
    summary = re.search(r"(\d+) generated", out)
    print(out[-3000:])
    assert run.returncode == 0, out[-20000:]
    assert summary and int(summary.group(1)) >= min(200, 2 * EXAMPLES), out[-3000:]
    assert "Traceback" not in srv.log() and " 500 " not in srv.log(), srv.log()[-5000:]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_server_schema_has_the_limits(fuzz_server, path):
    """The document the fuzzer reads holds the server's limits (else it would test nothing)."""
    import httpx

    srv = fuzz_server
    doc = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
    name = "CompletionRequest" if path == "/v1/completions" else "ChatCompletionRequest"
    props = doc["components"]["schemas"][name]["properties"]
    assert props["model"]["const"] == srv.model
    assert {"maximum": 2, "minimum": 1, "type": "integer"} in props["max_tokens"]["anyOf"]
    assert {"maximum": 2, "minimum": 1, "type": "integer"} in props["n"]["anyOf"]
