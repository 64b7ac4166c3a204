"""A real Docker engine for the deploy tests: dockerd started if none runs, stand-ins for the
public base images made from Debian's own packages (Docker Hub is out of reach), a local index
holding the pinned CPU torch wheel, and the project's image built from its own Dockerfile.

Everything here is made once per test session and reused by the next one while its recipe is
unchanged (images are cached by a hash of it); containers, networks and volumes are the tests'
to remove. Only loopback and the package registries are reached from a container.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import yaml

from tests.factories import require_binary, wait_for

ROOT = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("LSTM_STREAM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"  # Debian 12: Python 3.11, as in python:3.11-slim
# One Debian root serves every stand-in: one bootstrap instead of four, one layer on disk.
PACKAGES = [
    "ca-certificates",
    "python3",
    "python3-venv",
    "python-is-python3",
    "prometheus",
    "nginx",
    "redis-server",
]
# Run in the new root before it is packed: the host's CA certificates, trusted.
CUSTOMIZE_HOOKS = [
    'mkdir -p "$1/usr/local/share/ca-certificates"',
    "! [ -d /usr/local/share/ca-certificates ] || "
    'cp -r /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/"',
    'chroot "$1" update-ca-certificates',
]
# What each public image's own Dockerfile sets, so that the compose file runs unchanged.
STANDIN_CONFIG = {
    "python": [
        # Containers reach PyPI through this machine's HTTPS proxy: trust what the host trusts.
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt "
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        'CMD ["python3"]',
    ],
    "prometheus": [
        "WORKDIR /prometheus",
        'ENTRYPOINT ["/usr/bin/prometheus"]',
        'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]',
    ],
    "nginx": ['CMD ["nginx", "-g", "daemon off;"]'],
    "redis": [
        "WORKDIR /data",
        # As the official image's entrypoint: a leading "redis-server" is the server itself,
        # and protected mode is off (that image builds Redis so), so peers may connect.
        'ENTRYPOINT ["/bin/sh", "-c", "[ \\"$1\\" = redis-server ] && shift; '
        'exec redis-server \\"$@\\" --protected-mode no", "redis"]',
        'CMD ["redis-server"]',
    ],
}


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stdout}{result.stderr}")
    return result.stdout.strip()


def logs(container: str) -> str:
    """What the container wrote, stdout and stderr together."""
    result = subprocess.run(
        ["docker", "logs", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=60,
    )  # fmt: skip
    return result.stdout


class Engine:
    """The Docker engine: the one that runs, or dockerd started here (and stopped by stop())."""

    def __init__(self, log_dir: Path) -> None:
        require_binary("docker")
        self.process: subprocess.Popen | None = None
        if not self.answers():
            self.process = self.start_dockerd(log_dir / "dockerd.log")

    @staticmethod
    def answers() -> bool:
        return docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30) != ""

    def start_dockerd(self, log: Path) -> subprocess.Popen:
        binary = require_binary("dockerd")
        if os.geteuid() != 0:
            import pytest

            message = "no Docker engine runs, and only root can start dockerd here"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
        with open(log, "w") as out:
            process = subprocess.Popen([binary], stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.answers, 60, interval=0.5, what=f"dockerd to answer (log: {log})")
        return process

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(60)


def recipe_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def image_exists(tag: str) -> bool:
    found = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=30)
    return found.returncode == 0


def debian_root(log_dir: Path) -> str:
    """Debian's minimal root with the stand-ins' packages and this host's CA certificates,
    imported as an image (tag returned); mmdebstrap streams the tarball into docker import."""
    certs = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    tag = "lstm-stream-standin/debian:" + recipe_hash(
        SUITE, PACKAGES, CUSTOMIZE_HOOKS, [c.read_bytes().hex() for c in certs]
    )
    if image_exists(tag):
        return tag
    mmdebstrap = require_binary("mmdebstrap")
    command = [
        mmdebstrap,
        "--variant=apt",
        "--dpkgopt=force-unsafe-io",  # a throwaway root: no fsync per file
        *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "doc", "locale")),
        "--include=" + ",".join(PACKAGES),
        *(f"--customize-hook={hook}" for hook in CUSTOMIZE_HOOKS),
        SUITE,
        "-",
        MIRROR,
    ]
    with open(log_dir / "mmdebstrap.log", "w") as log:
        bootstrap = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        imported = subprocess.run(
            ["docker", "import", "-", tag], stdin=bootstrap.stdout, capture_output=True, text=True
        )
        bootstrap.stdout.close()
        code = bootstrap.wait(600)
    assert code == 0 and imported.returncode == 0, (
        f"mmdebstrap exit {code} (log: {log_dir / 'mmdebstrap.log'}); {imported.stderr}"
    )
    return tag


def dockerfile_arg(name: str) -> str:
    """The default of an ARG of the project's Dockerfile."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    return re.search(rf"^ARG {name}=(\S+)$", dockerfile, flags=re.M).group(1)


def public_images() -> dict[str, str]:
    """The public images the Dockerfile and compose file name, by stand-in kind."""
    python = dockerfile_arg("PYTHON_VERSION")
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {
        "python": f"python:{python}-slim",
        "prometheus": services["prometheus"]["image"],
        "nginx": services["nginx"]["image"],
        "redis": services["redis"]["image"],
    }


def make_standins(log_dir: Path) -> dict[str, str]:
    """Tag a stand-in for each public image, built on the Debian root; {kind: tag}."""
    base = debian_root(log_dir)
    images = public_images()
    for kind, tag in images.items():
        dockerfile = "\n".join([f"FROM {base}", *STANDIN_CONFIG[kind], ""])
        docker("build", "-q", "-t", tag, "-", input=dockerfile, timeout=120)
    return images


INDEX_PORT = 47_841


class TorchIndex:
    """A package index on loopback holding the pinned torch wheel and its dependencies, in the
    layout pip reads (simple/<project>/<files>); `docker build --network host` reaches it."""

    def __init__(self, directory: Path) -> None:
        wheels = directory / "wheels"
        requirement = f"torch=={dockerfile_arg('TORCH_VERSION')}"  # what the build asks for
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
             "--dest", str(wheels), requirement],
            check=True, timeout=600,
        )  # fmt: skip
        torch_wheels = [w.name for w in wheels.glob("torch-*.whl")]
        assert all("+cpu" in name for name in torch_wheels), (
            f"pip found {torch_wheels}, not the CPU build: point it at PyTorch's CPU index "
            "(PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)"
        )
        for wheel in wheels.iterdir():
            project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
            (directory / "simple" / project).mkdir(parents=True, exist_ok=True)
            os.link(wheel, directory / "simple" / project / wheel.name)
        handler = partial(QuietHandler, directory=str(directory))
        try:  # one port run after run: the URL is a build argument, so the layers stay cached
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
        except OSError:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/simple"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


# What the Dockerfile copies: an image built from the same files (and base) is not rebuilt.
BUILD_INPUTS = ["Dockerfile", "pyproject.toml", "README.md", "proto", "lstm_model", "server",
                "client"]  # fmt: skip


def source_hash(base_image: str) -> str:
    digest = hashlib.sha256(docker("image", "inspect", "--format", "{{.Id}}", base_image).encode())
    for name in BUILD_INPUTS:
        path = ROOT / name
        for file in sorted([path] if path.is_file() else path.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(ROOT)).encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def built_from(tag: str) -> str:
    """The source hash the image `tag` was built from; "" when there is no such image."""
    label = '{{index .Config.Labels "lstm-stream.source"}}'
    return docker("image", "inspect", "--format", label, tag, check=False)


def build_cpu_image(log_dir: Path, tag: str = "lstm-stream:cpu") -> str:
    """The project's image from its own Dockerfile, CPU variant, torch from a local index."""
    sources = source_hash(public_images()["python"])
    if built_from(tag) == sources:
        return tag
    torch_index = TorchIndex(log_dir / "torch-index")
    try:
        return _build(log_dir, tag, sources, torch_index.url)
    finally:
        torch_index.close()


def _build(log_dir: Path, tag: str, sources: str, index_url: str) -> str:
    started = time.monotonic()
    result = subprocess.run(
        ["docker", "build", "--network", "host", "-t", tag,
         "--label", f"lstm-stream.source={sources}", "--build-arg", "TORCH_VARIANT=cpu",
         "--build-arg", f"TORCH_INDEX_URL={index_url}", str(ROOT)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},  # the engine's own builder: no Hub images
    )  # fmt: skip
    (log_dir / "docker-build.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The image this one replaced, left without a tag.
    docker("image", "prune", "-f", "--filter", "label=lstm-stream.source", timeout=300)
    print(f"built {tag} in {time.monotonic() - started:.0f} s")
    return tag


def compose_binary() -> list[str]:
    """docker-compose (v1, Debian's package) or the v2 plugin: the compose file suits both."""
    found = shutil.which("docker-compose")
    if found:
        return [found]
    if docker("compose", "version", check=False, timeout=30):
        return ["docker", "compose"]
    return [require_binary("docker-compose")]
