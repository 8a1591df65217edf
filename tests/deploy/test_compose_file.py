"""The Compose stack: one server service per profile under the alias Prometheus scrapes, a stop
grace that covers the drain, mounts that exist, and settings the server knows."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from deploy_helpers import COMPOSE, PROMETHEUS_CONFIG, REPO

from cdserve.config_flags import ENV_PREFIX, env_names
from cdserve.server.settings import ServerSettings

# Read by deploy/docker/entrypoint.sh (or by libraries), not by the server's settings.
ENTRYPOINT_VARS = {
    "CDSERVE_MODEL_ID",
    "CDSERVE_SCORER_ID",
    "CDSERVE_MODEL_DIR",
    "CDSERVE_SCORER_DIR",
    "CDSERVE_MODEL_REVISION",
    "CDSERVE_SCORER_REVISION",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the YAML anchors and merge keys


def servers(compose):
    return {k: v for k, v in compose["services"].items() if k.startswith("cdserve-")}


def test_one_server_per_profile_under_the_scraped_alias(compose):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cdserve"]
    host, port = job["static_configs"][0]["targets"][0].split(":")
    s = servers(compose)
    assert {tuple(v["profiles"]) for v in s.values()} == {("gpu",), ("cpu",)}
    for name, svc in s.items():
        assert host in svc["networks"]["default"]["aliases"], name
        assert svc["environment"]["CDSERVE_PORT"] == port
        assert svc["environment"]["CDSERVE_HOST"] == "0.0.0.0"
        assert svc["ports"][0].endswith(f":{port}")


def test_build_targets_exist(compose):
    dockerfile = (REPO / "Dockerfile").read_text()
    for name, svc in servers(compose).items():
        assert (COMPOSE.parent / svc["build"]["context"]).resolve() == REPO
        assert re.search(rf"^FROM \S+ AS {svc['build']['target']}$", dockerfile, re.MULTILINE), name


def test_gpu_service_reserves_gpus(compose):
    gpu = compose["services"]["cdserve-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["environment"]["CDSERVE_BACKEND"] == "vllm"
    assert "deploy" not in compose["services"]["cdserve-cpu"]


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


def test_stop_grace_covers_the_drain(compose):
    for name, svc in servers(compose).items():
        drain = float(svc["environment"]["CDSERVE_SHUTDOWN_GRACE_SECONDS"])
        assert seconds(svc["stop_grace_period"]) >= drain + 5, name


def test_mounted_host_paths_exist(compose):
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("../"):
                assert (COMPOSE.parent / host).exists(), f"{name}: {host}"


def test_environment_names_are_server_settings(compose):
    """Every CDSERVE_* name a server gets is one the settings read (an old or misspelt name would
    otherwise be ignored), sections' fields included (CDSERVE_VLLM__TENSOR_PARALLEL_SIZE)."""
    known = env_names(ServerSettings)
    for name, svc in servers(compose).items():
        names = {k for k in svc["environment"] if k.startswith("CDSERVE_")}
        assert names - ENTRYPOINT_VARS <= known, (
            f"{name}: {sorted(names - ENTRYPOINT_VARS - known)}"
        )


def test_api_key_is_never_set_to_an_empty_string(compose):
    """An empty CDSERVE_API_KEY is refused at start-up: pass it through only when it is set."""
    for svc in servers(compose).values():
        assert svc["environment"]["CDSERVE_API_KEY"] is None


def test_default_environment_makes_valid_settings(compose, monkeypatch):
    """With no .env, each server's environment passes the server's own validation."""
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for name, svc in servers(compose).items():
        for key, value in svc["environment"].items():
            if (
                key.startswith(ENV_PREFIX)
                and key not in ENTRYPOINT_VARS
                and value is not None
            ):
                # ${NAME:-default} as Compose resolves it with NAME unset
                monkeypatch.setenv(key, re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)))
        s = ServerSettings()
        assert (s.host, s.port) == ("0.0.0.0", 8000), name
