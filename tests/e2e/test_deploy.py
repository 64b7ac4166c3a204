"""The deploy files, checked without a Docker engine: promtool, docker-compose config, and the
dashboard's queries against the metrics a live server exports. test_docker.py runs them."""

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


def compose_services() -> dict:
    compose = require_binary("docker-compose")
    return yaml.safe_load(run(compose, "config"))["services"]


def published(service: dict) -> dict[int, str]:
    """{container port: host address} of a service's published ports, in either form that
    `docker-compose config` writes them."""
    found = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found[port["target"]] = port.get("host_ip", "0.0.0.0")
        else:
            parts = port.split("/")[0].split(":")
            found[int(parts[-1])] = parts[0] if len(parts) == 3 else "0.0.0.0"
    return found


def gpu_devices(service: dict):
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_single_server_of_each_variant(profile):
    services = compose_services()
    server = services[f"lstm-serve-{profile}"]
    assert server["profiles"] == [profile]
    assert "lstm-serve" in server["networks"]["default"]["aliases"]
    # gRPC for clients everywhere; metrics for the operator, on loopback unless opened.
    assert published(server) == {50051: "0.0.0.0", 8000: "127.0.0.1"}
    # The named volume at the snapshot directory itself (the image makes it the server's).
    snapshot_dir = server["environment"]["LSTM_SERVE_SNAPSHOT_DIR"]
    assert server["volumes"] == [f"snapshots:{snapshot_dir}:rw"]
    if profile == "gpu":
        assert gpu_devices(server) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert server["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    else:
        assert gpu_devices(server) is None
        assert server["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert server["environment"]["LSTM_SERVE_DEVICE"] == "auto"
    # The drain grace and the snapshot fit in the time compose gives before SIGKILL.
    assert float(server["environment"]["LSTM_SERVE_SHUTDOWN_GRACE_S"]) + 5 <= 30
    assert server["stop_grace_period"] == "30s"


def test_operator_ports_are_on_loopback_and_grafana_only_on_request():
    services = compose_services()
    assert "profiles" not in services["prometheus"]  # with every profile
    assert published(services["prometheus"]) == {9090: "127.0.0.1"}
    assert services["grafana"]["profiles"] == ["grafana"]
    assert published(services["grafana"]) == {3000: "127.0.0.1"}


@pytest.mark.parametrize(("profile", "suffix"), [("scale", ""), ("scale-cpu", "-cpu")])
def test_docker_compose_scale_profiles_are_replicas_behind_nginx_with_redis(profile, suffix):
    services = compose_services()
    replicas = [f"replica{suffix}-{n}" for n in (1, 2, 3)]
    assert sorted(n for n, s in services.items() if profile in s.get("profiles", [])) == sorted(
        [*replicas, f"nginx{suffix}", "redis"]
    )
    for n, name in enumerate(replicas, 1):
        replica = services[name]
        assert replica["environment"]["LSTM_SERVE_STATE_STORE"] == "redis://redis:6379/0"
        assert "ports" not in replica  # reached through nginx only
        aliases = replica["networks"]["default"]["aliases"]
        assert "lstm-serve" in aliases  # scraped by DNS
        assert name == f"replica-{n}" or f"replica-{n}" in aliases  # nginx's upstream name
        assert (gpu_devices(replica) is not None) == (profile == "scale")
        assert replica["image"] == ("lstm-stream:gpu" if profile == "scale" else "lstm-stream:cpu")
    addresses = {services[name]["networks"]["default"]["ipv4_address"] for name in replicas}
    assert len(addresses) == 3  # fixed, distinct: nginx resolves the names once
    nginx = services[f"nginx{suffix}"]
    assert published(nginx) == {50051: "0.0.0.0"}
    assert sorted(nginx["depends_on"]) == replicas
    assert nginx["ulimits"]["nofile"]["soft"] >= 65536
    assert any(
        v.endswith("deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro") for v in nginx["volumes"]
    )
    conf = (DEPLOY / "nginx/nginx.conf").read_text()
    assert "hash $lstm_route_key consistent;" in conf and "grpc_pass grpc://" in conf
    # Batch calls route by partition, single-session calls by id unless they name one too.
    assert re.search(
        r'""\s+\$http_x_session_id;\s+default partition-\$http_x_lstm_partition;', conf
    )
    upstreams = re.findall(r"^\s*server (replica-\d+):50051", conf, flags=re.M)
    assert upstreams == ["replica-1", "replica-2", "replica-3"]


def test_dockerfile_is_multi_stage_non_root_with_a_grpc_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, flags=re.M)) == 2
    assert re.search(r"^USER lstm$", dockerfile, flags=re.M)
    assert 'CMD ["lstm-client", "health"' in dockerfile
    assert 'ENTRYPOINT ["lstm-serve"]' in dockerfile
    assert "ARG TORCH_VARIANT=cu128" in dockerfile
    # The index is an argument (a mirror, a local index), defaulting to PyTorch's own.
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}" in dockerfile
    assert '--index-url "${TORCH_INDEX_URL}"' in dockerfile
    assert "# syntax=" not in dockerfile  # BuildKit would fetch that frontend from Docker Hub
    # Sessions kept in a directory of the server's own; the drain grace plus the snapshot fit
    # in `docker stop`'s default 10 s (test_docker.py stops the container that way).
    assert "install -d -o lstm -g lstm /var/lib/lstm-stream/snapshots" in dockerfile
    assert "LSTM_SERVE_SNAPSHOT_DIR=/var/lib/lstm-stream/snapshots" in dockerfile
    grace = float(re.search(r"LSTM_SERVE_SHUTDOWN_GRACE_S=([\d.]+)", dockerfile).group(1))
    assert grace + 5 <= 10


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
    (selector,) = dashboard["templating"]["list"]  # the model selector, from every loaded model
    assert (selector["name"], selector["definition"]) == (
        "model",
        "label_values(lstm_model_info, name)",
    )
    work = [e for e in exprs if re.search(r"lstm_(timesteps|batch_size|queue_wait|batch_co)", e)]
    assert len(work) >= 5 and all('model=~"$model"' in e for e in work), work
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
