"""The deploy, for real on a Docker engine: the CPU image built from the project's Dockerfile,
run alone (healthy, streaming, metrics, a snapshot kept across a restart in a volume mounted at
the snapshot directory, a root-owned mount refused), then the compose file's cpu and scale-cpu
profiles brought up as a user would. Base images are Debian stand-ins (tests/e2e/docker_parts.py).
Grafana has no stand-in: its files are checked in test_deploy.py."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from lstm_stream.client import AsyncStreamingClient, ClientOptions, StreamingClient
from tests.e2e import docker_parts
from tests.e2e.conftest import fetch
from tests.e2e.docker_parts import ROOT, docker
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import free_port, offline, random_chunks, random_steps, wait_for

pytestmark = pytest.mark.timeout(1800)  # the first test builds the images
SNAPSHOTS = "/var/lib/lstm-stream/snapshots"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = docker_parts.Engine(tmp_path_factory.mktemp("docker"))
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory):
    logs = tmp_path_factory.mktemp("docker-build")
    docker_parts.make_standins(logs)
    return docker_parts.build_cpu_image(logs)


@pytest.fixture
def network(engine):
    """A network of the test's own: the only one its containers join."""
    name = f"lstm-stream-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    containers: list[str] = []
    yield name, containers
    for container in containers:
        docker("rm", "-f", "-v", container, check=False)
    docker("network", "rm", name, check=False)


@pytest.fixture
def volume(engine):
    name = f"lstm-stream-test-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", name)
    yield name
    for container in docker("ps", "-aq", "--filter", f"volume={name}").split():
        docker("rm", "-f", container, check=False)
    docker("volume", "rm", "-f", name)


def run_server(image: str, network, *options: str) -> tuple[str, str, int]:
    """A detached server container; (id, gRPC target, metrics port) as seen from the host."""
    name, containers = network
    container = docker(
        "run", "-d", "--network", name, "-p", "127.0.0.1::50051", "-p", "127.0.0.1::8000",
        "--health-interval", "1s",  # the image's own check, asked more often than in production
        *options, image,
    )  # fmt: skip
    containers.append(container)
    return container, f"127.0.0.1:{host_port(container, 50051)}", host_port(container, 8000)


def host_port(container: str, port: int) -> int:
    return int(docker("port", container, f"{port}/tcp").splitlines()[0].rsplit(":", 1)[1])


def wait_healthy(container: str, timeout: float = 180) -> None:
    def status() -> str:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", container))
        assert state["Status"] == "running", docker("logs", container, check=False)
        return state.get("Health", {}).get("Status", "")

    wait_for(lambda: status() == "healthy", timeout, interval=0.5, what=f"{container} healthy")


def metric(text: str, name: str) -> float:
    """A metric's samples summed over their labels (lstm_timesteps_total over every model)."""
    lines = [line for line in text.splitlines() if line.startswith((name + " ", name + "{"))]
    assert lines, f"{name} not exported"
    return sum(float(line.split()[-1]) for line in lines)


def test_the_image_serves_and_keeps_sessions_across_a_restart(
    image, network, volume, bundled_model
):
    """Healthy by its HEALTHCHECK; streams equal offline; /metrics counts them; `docker stop`
    snapshots to a volume mounted at the snapshot directory itself, and a new container on the
    same volume resumes the session at its next step."""
    steps = random_steps(40, 6, seed=61)
    expected = offline(bundled_model, steps)
    mount = ("-v", f"{volume}:{SNAPSHOTS}")
    first, target, metrics_port = run_server(image, network, *mount)
    wait_healthy(first)
    with StreamingClient(target) as client:
        session = client.open_session()
        outputs = [session.send(chunk) for chunk in np.split(steps[:20], [3, 4, 11])]
        session_id = session.detach()
    np.testing.assert_allclose(np.concatenate(outputs), expected[:20], atol=1e-5, rtol=0)
    text = fetch(f"http://127.0.0.1:{metrics_port}/metrics")
    assert metric(text, "lstm_timesteps_total") == 20
    assert metric(text, "lstm_sessions_active") == 1

    docker("stop", first, timeout=60)  # SIGTERM, the image's default 10 s
    state = json.loads(docker("inspect", "--format", "{{json .State}}", first))
    logs = docker_parts.logs(first)
    assert state["ExitCode"] == 0, logs
    assert f"wrote 1 sessions to {SNAPSHOTS}/sessions.snapshot" in logs, logs

    second, target, _ = run_server(image, network, *mount)
    wait_healthy(second)
    with StreamingClient(target) as client:
        session = client.attach(session_id)
        assert session.next_step == 20
        rest = session.send(steps[20:])
        assert_state_equals_offline(target, session_id, bundled_model, steps)
        session.close()
    np.testing.assert_allclose(rest, expected[20:], atol=1e-5, rtol=0)


GRU_IN_THE_IMAGE = """
import json, shutil, torch
from lstm_model import native
from lstm_model.config import LSTMConfig
from lstm_model.gru_sequence import GruSequence
from lstm_model.model import SequenceModel
model = SequenceModel(LSTMConfig(4, 40, 2, 3, cell="gru")).eval()
kernel = GruSequence(model)
x = torch.randn(9, 11, 4)  # (B, T, I)
with torch.inference_mode():
    want, (h_want,) = model(x)
got, (h_got,) = kernel(x, model.init_state(9))
print(json.dumps({"native": kernel.native is not None, "compiler": shutil.which("c++"),
    "kernels": sorted(p.name for p in native.kernel_dir().iterdir()),
    "error": max((got - want).abs().max().item(), (h_got - h_want).abs().max().item())}))
"""


def test_the_image_runs_a_gru_on_its_prebuilt_native_kernel(image):
    """The runtime image has no compiler; the build stage compiled the GRU loop for every CPU
    capability, and the server's user loads the one for this CPU."""
    found = json.loads(
        docker("run", "--rm", "--entrypoint", "python", image, "-c", GRU_IN_THE_IMAGE).splitlines()[
            -1
        ]
    )
    assert found["compiler"] is None
    assert [name.split("-")[1] for name in found["kernels"]] == ["avx2", "avx512", "default"]
    assert found["native"] and found["error"] < 1e-5


def test_a_snapshot_dir_the_server_cannot_write_is_refused_at_start(image, network):
    """A root-owned mount over the snapshot directory: one line and exit 1 at start, not a
    healthy server that loses every session at its first SIGTERM."""
    name, _ = network
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", name, "--tmpfs", f"{SNAPSHOTS}:mode=0755", image],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1, lines
    assert lines == [
        f"lstm-serve: --snapshot-dir {SNAPSHOTS}: not writable by user lstm (uid 10001) "
        "(Permission denied); sessions could not be saved at shutdown. Give the directory to "
        "that user or choose another"
    ]


class Compose:
    """`docker-compose -p <own name> ...` on the shipped file, host ports chosen free. Only
    where this host's open-file limit is below what the file asks for nginx (65,536; a sandbox
    without CAP_SYS_RESOURCE), an override file lowers it to the host's limit."""

    def __init__(self, *profiles: str, tmp_path: Path) -> None:
        self.project = f"lstm-stream-test-{uuid.uuid4().hex[:8]}"
        self.ports = {name: free_port() for name in ("GRPC", "METRICS", "PROMETHEUS", "GRAFANA")}
        ports = {f"LSTM_STREAM_{name}_PORT": str(port) for name, port in self.ports.items()}
        self.env = {**os.environ, **ports}
        self.command = [*docker_parts.compose_binary(), "-p", self.project,
                        "-f", str(ROOT / "docker-compose.yml")]  # fmt: skip
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if limit < 65536:
            override = tmp_path / "docker-compose.nofile.yml"
            nofile = {"ulimits": {"nofile": {"soft": limit, "hard": limit}}}
            override.write_text(yaml.safe_dump({"services": {"nginx-cpu": nofile}}))
            self.command += ["-f", str(override)]
        for profile in profiles:
            self.command += ["--profile", profile]

    def __call__(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            [*self.command, *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def container(self, service: str) -> str:
        return self("ps", "-q", service).strip()

    def __enter__(self) -> Compose:
        try:
            self("up", "-d", "--no-build")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            print(self("logs", "--no-color", "--tail", "50"))
        self("down", "-v", "--remove-orphans", "-t", "30")


def prometheus_targets(port: int) -> list[dict]:
    try:
        body = json.loads(fetch(f"http://127.0.0.1:{port}/api/v1/targets"))
    except OSError:
        return []
    return [t for t in body["data"]["activeTargets"] if t["labels"]["job"] == "lstm-serve"]


def test_compose_cpu_profile_serves_and_prometheus_scrapes_it(image, bundled_model, tmp_path):
    steps = random_steps(12, 6, seed=62)
    with Compose("cpu", tmp_path=tmp_path) as stack:
        wait_healthy(stack.container("lstm-serve-cpu"))
        target = f"127.0.0.1:{stack.ports['GRPC']}"
        with StreamingClient(target) as client, client.open_session() as session:
            outputs = session.send(steps)
        assert_equals_offline(outputs, bundled_model, steps)
        text = fetch(f"http://127.0.0.1:{stack.ports['METRICS']}/metrics")
        assert metric(text, "lstm_timesteps_total") == 12
        wait_for(
            lambda: [t["health"] for t in prometheus_targets(stack.ports["PROMETHEUS"])]
            == ["up"],
            180, interval=1, what="Prometheus to scrape lstm-serve-cpu (one target, up)",
        )  # fmt: skip


SESSIONS, STEPS = 60, 30
SCALE_OPTIONS = dict(deadline_s=60.0, max_retries=50, backoff_initial_s=0.05, backoff_max_s=1.0)


def replica_metric(container: str, name: str) -> float:
    """Read inside the container: a scale replica publishes no port."""
    script = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
    return metric(docker("exec", container, "python", "-c", script), name)


def test_compose_scale_cpu_profile_survives_a_killed_replica(image, bundled_model, tmp_path):
    """nginx, three CPU replicas and Redis: sessions spread over the replicas; one replica is
    killed mid-stream; every session finishes through nginx with outputs equal offline."""
    inputs = [random_steps(STEPS, 6, seed=7000 + i) for i in range(SESSIONS)]
    plans = [random_chunks(STEPS, 4, seed=7000 + i) for i in range(SESSIONS)]
    with Compose("scale-cpu", tmp_path=tmp_path) as stack:
        replicas = [stack.container(f"replica-cpu-{n}") for n in (1, 2, 3)]
        for replica in replicas:
            wait_healthy(replica)
        options = ClientOptions(target=f"127.0.0.1:{stack.ports['GRPC']}", **SCALE_OPTIONS)
        results, created = asyncio.run(
            drive_through_a_kill(options, inputs, plans, replicas, bundled_model)
        )
    assert sum(created) == SESSIONS and all(c > 0 for c in created), created  # spread
    for steps, outputs in zip(inputs, results, strict=True):
        assert outputs.shape == (STEPS, 4)  # none lost, none repeated
        assert_equals_offline(outputs, bundled_model, steps)


async def drive_through_a_kill(options, inputs, plans, replicas, model):
    halfway = asyncio.Barrier(len(inputs) + 1)
    killed = asyncio.Event()

    async def one(client, steps, plan):
        chunks = np.split(steps, np.cumsum(plan)[:-1])
        half = len(chunks) // 2
        session = await client.open_session()
        outputs = [await session.send(chunk) for chunk in chunks[:half]]
        await halfway.wait()
        await killed.wait()
        outputs += [await session.send(chunk) for chunk in chunks[half:]]
        # Each step applied once, through the failover: the exported state says so where the
        # saturated softmax outputs could not. Routed by x-session-id, as the SDK's calls are.
        routed = (("x-session-id", session.session_id),)
        await asyncio.to_thread(
            assert_state_equals_offline, options.target, session.session_id, model, steps, routed
        )
        await session.close()
        return np.concatenate(outputs)

    async def kill():
        await halfway.wait()  # every session created and half streamed
        try:
            created = [replica_metric(r, "lstm_sessions_created_total") for r in replicas]
            docker("kill", replicas[0])
        finally:  # a failure here fails the test instead of leaving the sessions waiting
            killed.set()
        return created

    async with AsyncStreamingClient(options=options) as client:
        killing = asyncio.create_task(kill())
        results = await asyncio.gather(
            *(one(client, s, p) for s, p in zip(inputs, plans, strict=True))
        )
        return results, await killing


def test_the_stand_ins_stand_for_the_images_the_deploy_files_name():
    images = docker_parts.public_images()
    assert images == {
        "python": "python:3.11-slim",
        "prometheus": "prom/prometheus:v2.53.2",
        "nginx": "nginx:1.27",
        "redis": "redis:7.4",
    }
    assert set(images) == set(docker_parts.STANDIN_CONFIG)
    assert Path(ROOT / "Dockerfile").read_text().count("FROM python:${PYTHON_VERSION}-slim") == 2
