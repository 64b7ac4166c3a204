"""The deploy files, checked without a Docker engine: promtool, docker-compose config, and the
dashboard's queries against the metrics a live server exports."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import fetch
from tests.factories import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_accepts_the_config_and_rules():
    promtool = require_binary("promtool")
    assert "SUCCESS" in run(promtool, "check", "config", str(DEPLOY / "prometheus/prometheus.yml"))
    assert "SUCCESS: 6 rules found" in run(
        promtool, "check", "rules", str(DEPLOY / "prometheus/rules.yml")
    )


def test_every_alert_passes_its_promtool_unit_test():
    promtool = require_binary("promtool")
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "prometheus/rules.test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert (
        alerts
        == tested
        == {
            "LstmStepLatencyP99High",
            "LstmErrorRatioHigh",
            "LstmSessionsNearCapacity",
            "LstmTargetDown",
            "LstmStateStoreDown",
        }
    )
    assert "SUCCESS" in run(promtool, "test", "rules", str(DEPLOY / "prometheus/rules.test.yml"))


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_accepts_both_variants(profile):
    compose = require_binary("docker-compose")
    config = yaml.safe_load(run(compose, "--profile", profile, "config"))
    services = config["services"]
    server = services[f"lstm-serve-{profile}"]
    assert server["profiles"] == [profile]
    assert "lstm-serve" in server["networks"]["default"]["aliases"]
    assert {p["target"] for p in server["ports"]} == {50051, 8000}
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if profile == "gpu":
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert server["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    else:
        assert devices is None
        assert server["build"]["args"]["TORCH_VARIANT"] == "cpu"
        assert server["environment"]["LSTM_SERVE_DEVICE"] == "cpu"
    assert {"prometheus", "grafana"} <= set(services)


def test_docker_compose_scale_profile_is_replicas_behind_nginx_with_redis():
    compose = require_binary("docker-compose")
    services = yaml.safe_load(run(compose, "--profile", "scale", "config"))["services"]
    replicas = sorted(name for name in services if name.startswith("replica-"))
    assert replicas == ["replica-1", "replica-2", "replica-3"]
    for name in replicas:
        replica = services[name]
        assert replica["profiles"] == ["scale"]
        assert replica["environment"]["LSTM_SERVE_STATE_STORE"] == "redis://redis:6379/0"
        assert "ports" not in replica  # reached through nginx only
        assert "lstm-serve" in replica["networks"]["default"]["aliases"]  # scraped by DNS
    addresses = {services[name]["networks"]["default"]["ipv4_address"] for name in replicas}
    assert len(addresses) == 3  # fixed, distinct: nginx resolves the names once
    nginx = services["nginx"]
    assert [p["target"] for p in nginx["ports"]] == [50051]
    assert nginx["ulimits"]["nofile"]["soft"] >= 65536
    assert any(
        v.endswith("deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro") for v in nginx["volumes"]
    )
    conf = (DEPLOY / "nginx/nginx.conf").read_text()
    assert "hash $http_x_session_id consistent;" in conf and "grpc_pass grpc://" in conf
    upstreams = re.findall(r"^\s*server (replica-\d+):50051", conf, flags=re.M)
    assert upstreams == replicas
    assert "redis" in services


def test_dockerfile_is_multi_stage_non_root_with_a_grpc_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, flags=re.M)) == 2
    assert re.search(r"^USER lstm$", dockerfile, flags=re.M)
    assert 'CMD ["lstm-client", "health"' in dockerfile
    assert 'ENTRYPOINT ["lstm-serve"]' in dockerfile
    assert "ARG TORCH_VARIANT=cu128" in dockerfile


def test_container_healthcheck_command_reports_serving(served):
    from tests.factories import console_script

    result = subprocess.run(
        [console_script("lstm-client"), "health", "--target", served.target],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


def promql_metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(lstm_[a-z_]+|up)\b", expr))
    return {n for n in names if not n.startswith("lstm:")}


def exported_names(metrics_text: str) -> set[str]:
    """Names with samples, and those declared (# TYPE) with none yet, e.g. labelled ones."""
    names = {"up"}
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def test_dashboard_queries_name_only_exported_metrics(served):
    dashboard = json.loads((DEPLOY / "grafana/dashboards/lstm-stream.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in (
        "latency",
        "timesteps per second",
        "batch size",
        "active sessions",
        "status code",
        "queue wait vs compute",
    ):
        assert wanted in titles
    exported = exported_names(fetch(f"http://127.0.0.1:{served.metrics_port}/metrics"))
    for expr in exprs:
        unknown = promql_metric_names(expr) - exported
        assert not unknown, f"{expr!r} names metrics the server does not export: {unknown}"
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        assert not promql_metric_names(rule["expr"]) - exported, rule["expr"]


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    source = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert source["datasources"][0]["uid"] == "prometheus"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
