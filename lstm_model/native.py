"""Native CPU kernels: C++ compiled against the installed torch on first use, then kept.

There is one, the GRU layer loop (csrc/gru_layer.cpp, used by gru_sequence.GruSequence). It is
built with this machine's C++ compiler ($CXX, else c++) for the CPU capability ATen dispatches
to here (AVX512, AVX2 or DEFAULT), in about 7 s, into the kernel directory: $LSTM_STREAM_KERNEL_DIR,
else $XDG_CACHE_HOME/lstm-stream/kernels, else ~/.cache/lstm-stream/kernels. A file's name holds
a hash of the source, torch's version and the flags, so another torch or another source builds
a new file and never loads a stale one. Several processes may build at once: each writes its
own temporary file and renames it into place.

An image without a compiler ships the kernels prebuilt (`lstm-model build-kernels --capability
all` in the Dockerfile's build stage). Where none can be loaded or built (no compiler, a failed
build, LSTM_STREAM_NATIVE_KERNELS=0), `gru_layer()` returns None, the reason is logged once, and
the GRU runs its Python loop: the same numbers, slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "gru_layer.cpp"
KERNEL_DIR_ENV = "LSTM_STREAM_KERNEL_DIR"
SWITCH_ENV = "LSTM_STREAM_NATIVE_KERNELS"  # "0": never load or build
# ATen's x86 CPU capabilities and the flags that give at::vec::Vectorized their vector width,
# as ATen's own per-capability kernels are compiled. Elsewhere only DEFAULT is built.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
BUILD_TIMEOUT_S = 600


class NativeBuildError(RuntimeError):
    """A kernel could not be built; the message says why (the compiler's own words included)."""


def kernel_dir() -> Path:
    if os.environ.get(KERNEL_DIR_ENV):
        return Path(os.environ[KERNEL_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lstm-stream" / "kernels"


def host_capability() -> str:
    """The capability ATen's own kernels run with in this process (ATEN_CPU_CAPABILITY can lower
    it), so the native kernel uses no instruction ATen avoids."""
    capability = torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return capability if x86 and capability in CAPABILITY_FLAGS else "DEFAULT"


def compile_command(capability: str, output: Path) -> list[str]:
    if capability not in CAPABILITY_FLAGS:
        raise NativeBuildError(
            f"unknown CPU capability {capability!r}: expected one of {', '.join(CAPABILITY_FLAGS)}"
        )
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        os.environ.get("CXX") or "c++",
        "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w",
        *CAPABILITY_FLAGS[capability],
        f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-I", str(torch_dir / "include"),
        str(SOURCE), "-o", str(output),
        "-L", str(torch_dir / "lib"), "-ltorch_cpu", "-lc10",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip


def library_path(capability: str, directory: Path | None = None) -> Path:
    """Where the kernel built for this capability, source and torch lives (or will)."""
    recipe = hashlib.sha256(SOURCE.read_bytes())
    recipe.update(torch.__version__.encode())
    recipe.update(" ".join(compile_command(capability, Path("out"))[1:]).encode())
    name = f"gru_layer-{capability.lower()}-{recipe.hexdigest()[:16]}.so"
    return (directory or kernel_dir()) / name


def build(capability: str | None = None, directory: Path | None = None) -> Path:
    """The kernel's library for `capability` (default: this host's), built unless already there."""
    capability = capability or host_capability()
    path = library_path(capability, directory)
    if path.exists():
        return path
    command = compile_command(capability, path)
    if shutil.which(command[0]) is None:
        raise NativeBuildError(
            f"no C++ compiler: {command[0]!r} not found (install g++ or set CXX)"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
    except OSError as exc:
        raise NativeBuildError(f"cannot write the kernel directory {path.parent}: {exc}") from None
    command[command.index(str(path))] = partial
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise NativeBuildError(
                f"{command[0]} exited {done.returncode} building {SOURCE.name} for {capability}: "
                f"{done.stderr.strip()[-2000:]}"
            )
        os.chmod(partial, 0o755)  # readable by the server's own user where root built it
        os.replace(partial, path)  # whole or not at all, for a process building beside this one
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"{command[0]} took over {BUILD_TIMEOUT_S} s; gave up") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    return path


_lock = threading.Lock()
_loaded: Callable[..., None] | None = None
_failure: str | None = None  # why there is no native kernel in this process, once known


def gru_layer() -> Callable[..., None] | None:
    """torch.ops.lstm_stream.gru_layer, loaded (and built first if need be), or None."""
    global _loaded, _failure
    with _lock:
        if _loaded is None and _failure is None:
            try:
                _loaded = _load()
            except (NativeBuildError, OSError, RuntimeError) as exc:
                _failure = str(exc)
                log.warning("native GRU kernel unavailable, GRU chunks run in Python: %s", exc)
        return _loaded


def _load() -> Callable[..., None]:
    if os.environ.get(SWITCH_ENV, "1") == "0":
        raise NativeBuildError(f"switched off by {SWITCH_ENV}=0")
    capability = host_capability()
    started = time.perf_counter()
    built = not library_path(capability).exists()
    path = build(capability)
    if built:
        elapsed = time.perf_counter() - started
        log.info("built the native GRU kernel for %s in %.1f s: %s", capability, elapsed, path)
    torch.ops.load_library(str(path))
    return torch.ops.lstm_stream.gru_layer
