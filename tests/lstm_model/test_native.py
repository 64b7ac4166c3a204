"""lstm_model/native.py: building, finding and loading the native GRU layer loop, and what a
GRU runs when there is none. (Its numbers against nn.GRU: test_gru_sequence.py.)"""

import json
import logging
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lstm_model import cli, native
from lstm_model.gru_sequence import GruSequence
from tests.factories import make_model, require_binary, require_native_gru

ROOT = Path(__file__).resolve().parents[2]
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def no_kernel_yet(monkeypatch, tmp_path):
    """This process as if it had not looked for the kernel yet, its kernel directory empty."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv(native.KERNEL_DIR_ENV, str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def failing_compiler(tmp_path: Path) -> str:
    script = tmp_path / "cxx"
    script.write_text("#!/bin/sh\necho 'gru_layer.cpp:1: error: no such header' >&2\nexit 3\n")
    script.chmod(0o755)
    return str(script)


def test_the_kernel_is_built_once_into_the_kernel_directory_and_found_there(tmp_path):
    require_binary(os.environ.get("CXX") or "c++")
    directory = tmp_path / "kernels"
    results: list[Path] = []
    builders = [
        threading.Thread(target=lambda: results.append(native.build(directory=directory)))
        for _ in range(2)
    ]  # two at once, as two servers starting together would
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    capability = native.host_capability()
    assert results == [native.library_path(capability, directory)] * 2
    assert [p.name for p in directory.iterdir()] == [results[0].name]  # no temporary file left
    assert results[0].name.startswith(f"gru_layer-{capability.lower()}-")
    built = results[0].stat().st_mtime_ns
    assert native.build(directory=directory) == results[0]
    assert results[0].stat().st_mtime_ns == built  # found, not built again


def test_another_torch_or_capability_names_another_file(monkeypatch, tmp_path):
    before = native.library_path("AVX2", tmp_path)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert native.library_path("AVX2", tmp_path) != before
    assert native.library_path("AVX512", tmp_path) != native.library_path("AVX2", tmp_path)


def test_a_failed_build_says_what_the_compiler_said_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", failing_compiler(tmp_path))
    with pytest.raises(native.NativeBuildError, match=r"exited 3 building gru_layer.cpp for "):
        native.build(directory=tmp_path / "kernels")
    with pytest.raises(native.NativeBuildError, match="no such header"):
        native.build(directory=tmp_path / "kernels")
    assert list((tmp_path / "kernels").iterdir()) == []


def test_an_unknown_capability_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(
        native.NativeBuildError, match=r"unknown CPU capability 'SSE9': expected one of AVX512"
    ):
        native.build("SSE9", tmp_path)


def test_without_a_compiler_a_gru_runs_its_python_loop_and_says_why(
    no_kernel_yet, monkeypatch, caplog
):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    model = make_model(input_size=3, hidden_size=20, num_layers=2, output_size=2, cell="gru")
    with caplog.at_level(logging.WARNING, logger="lstm_model.native"):
        kernel = GruSequence(model)
        GruSequence(model)  # asks again: the answer is kept, the warning not repeated
    assert kernel.native is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "native GRU kernel unavailable, GRU chunks run in Python: "
        "no C++ compiler: '/nonexistent/c++' not found (install g++ or set CXX)"
    ]
    x = torch.randn(4, 6, 3)  # (B, T, I)
    with torch.inference_mode():
        want, (h_want,) = model(x)
    got, (h_got,) = kernel(x, model.init_state(4))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_got, h_want, atol=1e-5, rtol=0)


def test_switched_off_it_neither_builds_nor_loads(no_kernel_yet, monkeypatch):
    monkeypatch.setenv(native.SWITCH_ENV, "0")
    assert native.gru_layer() is None
    assert native._failure == "switched off by LSTM_STREAM_NATIVE_KERNELS=0"
    assert not no_kernel_yet.exists()


def test_the_op_refuses_tensors_of_the_wrong_shape_saying_what_it_got():
    gru_layer = require_native_gru()
    hidden, batch, steps = 8, 2, 3
    weight, bias = torch.randn(3 * hidden, hidden), torch.randn(3 * hidden)
    h0, out = torch.zeros(batch, hidden), torch.empty(steps, batch, hidden)
    empty = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"H = 8, got \[3, 2, 20\]"):
        gru_layer(torch.randn(steps, batch, 20), h0, weight, bias, empty, out)
    with pytest.raises(RuntimeError, match=r"h0 must be \(B, H\) = \(2, 8\), got \[3, 8\]"):
        gru_layer(torch.randn(steps, batch, 24), torch.zeros(3, hidden), weight, bias, empty, out)
    with pytest.raises(RuntimeError, match="float32 tensors only"):
        gru_layer(torch.randn(steps, batch, 24).double(), h0, weight, bias, empty, out)


def test_the_cli_builds_into_a_directory_and_fails_in_one_line(monkeypatch, tmp_path, capsys):
    require_binary(os.environ.get("CXX") or "c++")
    assert cli.main(["build-kernels", "--dir", str(tmp_path / "k")]) == 0
    capability = native.host_capability()
    path = native.library_path(capability, tmp_path / "k")
    assert capsys.readouterr().out == f"{capability}: {path}\n"
    assert path.exists()
    monkeypatch.setenv("CXX", failing_compiler(tmp_path))
    assert cli.main(["build-kernels", "--capability", "DEFAULT", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("lstm-model: ") and "cxx exited 3 building gru_layer.cpp for DEFAULT" in err
    )


CAPABILITY_CHECK = """
import json, sys, torch
from lstm_model import native
from lstm_model.gru_sequence import GruSequence
from tests.factories import make_inputs, make_model
model = make_model(input_size=4, hidden_size=40, num_layers=2, output_size=3, cell="gru")
kernel = GruSequence(model)
x = make_inputs(9, 11, 4)  # (B, T, I)
h0 = (torch.randn(2, 9, 40),)  # (L, B, H)
with torch.inference_mode():
    want, (h_want,) = model(x, h0)
got, (h_got,) = kernel(x, h0)
print(json.dumps({"capability": native.host_capability(), "native": kernel.native is not None,
    "files": sorted(p.name for p in native.kernel_dir().iterdir()),
    "error": max((got - want).abs().max().item(), (h_got - h_want).abs().max().item())}))
"""


@pytest.mark.skipif(not X86, reason="AVX2 and AVX512 builds are for x86 CPUs")
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_the_builds_for_narrower_cpus_equal_the_module(capability, tmp_path):
    """What an image built with --capability all holds for a CPU without AVX512 (or AVX2),
    run as ATen would there: ATEN_CPU_CAPABILITY lowers this process's capability."""
    require_binary(os.environ.get("CXX") or "c++")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower(), "PYTHONPATH": str(ROOT)}
    env[native.KERNEL_DIR_ENV] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", CAPABILITY_CHECK], env=env, capture_output=True, text=True,
        timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["capability"] == capability and found["native"]
    assert found["files"] == [native.library_path(capability, tmp_path).name]
    assert found["error"] < 1e-5
