"""Models and versions from the client's side (DESIGN 1.8), against lstm-serve on a repository
of three models: the SDKs create sessions, predict, describe and batch on the model version
asked for, and say where a session lives; lstm-client's commands take --model and
--model-version, and info lists every model."""

import asyncio
import json
import re

import grpc
import numpy as np
import pytest

from lstm_model.checkpoint import BUNDLED_MODEL_DIR, load_model
from lstm_model.cli import main as lstm_model
from lstm_stream.client import AsyncStreamingClient, LstmStreamError, StreamingClient
from lstm_stream.client.cli import format_models
from lstm_stream.v1 import inference_pb2 as pb
from tests.client.test_cli import from_csv, lstm_client, to_csv
from tests.client.test_node_example import install_node_example, run_example
from tests.factories import ServeProcess, offline, random_steps

# name, version, sizes: alpha's two versions differ in weights, beta in every size.
LAYOUT = {
    ("alpha", 1): dict(input_size=3, hidden_size=8, num_layers=1, output_size=2, seed=1),
    ("alpha", 2): dict(input_size=3, hidden_size=8, num_layers=1, output_size=2, seed=2),
    ("beta", 1): dict(input_size=5, hidden_size=6, num_layers=2, output_size=4, seed=3),
}
READY = pb.MODEL_VERSION_STATE_READY


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """REPO/NAME/VERSION/, laid out by lstm-model init (named by the path) and publish."""
    repo = tmp_path_factory.mktemp("repository")
    for (name, version), sizes in LAYOUT.items():
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in sizes.items()]
        assert lstm_model(["init", *flags, "--out", str(repo / name / str(version))]) == 0
    assert lstm_model(["publish", str(BUNDLED_MODEL_DIR), "--repository", str(repo)]) == 0
    return repo


@pytest.fixture(scope="module")
def models(repository):
    """Each version's model, offline: {(name, version): loaded model}."""
    keys = [*LAYOUT, ("basic-motions", 1)]
    return {key: load_model(repository / key[0] / str(key[1])) for key in keys}


@pytest.fixture(scope="module")
def server(repository):
    with ServeProcess("--model-repository", str(repository), "--repository-poll-s", "0") as proc:
        yield proc


def expected(models, key, steps):
    return offline(models[key].model, steps)


def test_a_session_lives_on_the_version_asked_for_and_says_so(server, models):
    alpha, beta = random_steps(9, 3, seed=1), random_steps(9, 5, seed=2)
    with StreamingClient(server.target) as client:
        with client.open_session(model="beta") as session:
            assert (session.model, session.model_version) == ("beta", 1)
            assert (session.input_size, session.output_size) == (5, 4)
            outputs = session.send(beta)
        np.testing.assert_allclose(outputs, expected(models, ("beta", 1), beta), atol=1e-5)
        with client.open_session(model="alpha", model_version=1) as session:
            assert (session.model, session.model_version) == ("alpha", 1)
            outputs = session.send(alpha)
        np.testing.assert_allclose(outputs, expected(models, ("alpha", 1), alpha), atol=1e-5)
        with client.open_session() as session:  # the default model, its newest version
            assert (session.model, session.model_version) == ("alpha", 2)
            outputs = session.send(alpha)
        np.testing.assert_allclose(outputs, expected(models, ("alpha", 2), alpha), atol=1e-5)


def test_attach_takes_the_sessions_own_model(server, models):
    steps = random_steps(10, 5, seed=3)
    with StreamingClient(server.target) as client:
        session = client.open_session(model="beta")
        first = session.send(steps[:4])
        placed = client.get_session(session.detach())
        assert (placed.model, placed.model_version, placed.next_step) == ("beta", 1, 4)
        with client.attach(session.session_id) as again:
            assert (again.model, again.model_version, again.input_size) == ("beta", 1, 5)
            rest = again.send(steps[4:])
    outputs = np.concatenate([first, rest])
    np.testing.assert_allclose(outputs, expected(models, ("beta", 1), steps), atol=1e-5)


def test_asyncio_sessions_and_predict_on_the_version_asked_for(server, models):
    alpha, beta = random_steps(7, 3, seed=4), random_steps(7, 5, seed=5)

    async def run():
        async with AsyncStreamingClient(server.target) as client:
            async with client.open_session(model="beta") as session:
                placed = (session.model, session.model_version, session.input_size)
                streamed = await session.send(beta)
            predicted = await client.predict(alpha, model="alpha", model_version=1)
            info = await client.info("beta")
            return placed, streamed, predicted, info

    placed, streamed, predicted, info = asyncio.run(run())
    assert placed == ("beta", 1, 5)
    np.testing.assert_allclose(streamed, expected(models, ("beta", 1), beta), atol=1e-5)
    np.testing.assert_allclose(predicted, expected(models, ("alpha", 1), alpha), atol=1e-5)
    assert (info.name, info.model_version, info.input_size, info.output_size) == ("beta", 1, 5, 4)


def test_info_and_predict_name_a_model_version(server, models):
    steps = random_steps(6, 5, seed=6)
    with StreamingClient(server.target) as client:
        default = client.info()
        beta = client.info(model="beta")
        alpha_1 = client.info(model="alpha", model_version=1)
        predicted = client.predict(steps, model="beta")
    assert (default.name, default.model_version) == ("alpha", 2)
    assert default.fingerprint == models["alpha", 2].fingerprint
    assert (beta.name, beta.model_version, beta.version) == ("beta", 1, "1")
    assert (beta.input_size, beta.hidden_size, beta.num_layers, beta.output_size) == (5, 6, 2, 4)
    assert (alpha_1.model_version, alpha_1.fingerprint) == (1, models["alpha", 1].fingerprint)
    np.testing.assert_allclose(predicted, expected(models, ("beta", 1), steps), atol=1e-5)


@pytest.mark.parametrize(("model", "version"), [("gamma", 0), ("alpha", 9), ("beta", 2)])
def test_an_unknown_model_or_version_is_model_not_found(server, model, version):
    with StreamingClient(server.target) as client:
        calls = {
            "open_session": lambda: client.open_session(model=model, model_version=version),
            "info": lambda: client.info(model, version),
            "predict": lambda: client.predict(np.zeros((1, 3)), model, version),
            "step_batch": lambda: client.step_batch(
                {"nf": np.zeros((1, 3))}, (), (), model, version
            ),
        }
        for what, call in calls.items():
            with pytest.raises(LstmStreamError) as err:
                call()
            assert (err.value.code, err.value.reason) == (
                grpc.StatusCode.NOT_FOUND,
                "MODEL_NOT_FOUND",
            ), what
            assert model in err.value.details, (what, err.value.details)


def versions_of(listed: pb.ListModelsResponse) -> dict[tuple[str, int], pb.ModelVersionStatus]:
    return {(m.name, v.version): v for m in listed.models for v in m.versions}


def test_list_models_names_every_version_its_state_and_live_sessions(server, models):
    with StreamingClient(server.target) as client:
        before = versions_of(client.list_models())
        opened = [client.open_session(model="alpha", model_version=1) for _ in range(2)]
        opened.append(client.open_session(model="beta"))
        listed = client.list_models()
        from_asyncio = asyncio.run(_list_models_async(server.target))
        for session in opened:
            session.close()
        after = versions_of(client.list_models())
    assert listed.default_model == "alpha"
    assert [m.name for m in listed.models] == ["alpha", "basic-motions", "beta"]
    during = versions_of(listed)
    assert sorted(during) == sorted(models)
    for key, status in during.items():
        assert (status.state, status.fingerprint, status.error) == (
            READY,
            models[key].fingerprint,
            "",
        ), key
    opened_on = {("alpha", 1): 2, ("beta", 1): 1}
    for key in models:
        assert during[key].sessions == before[key].sessions + opened_on.get(key, 0), key
        assert after[key].sessions == before[key].sessions, key
    assert versions_of(from_asyncio).keys() == during.keys()


async def _list_models_async(target: str) -> pb.ListModelsResponse:
    async with AsyncStreamingClient(target) as client:
        return await client.list_models()


def test_batches_run_on_the_version_asked_for(server, models):
    ids = [f"models-batch-{i}" for i in range(5)]
    inputs = {sid: random_steps(6, 5, seed=10 + i) for i, sid in enumerate(ids)}
    with StreamingClient(server.target) as client:
        first = client.step_batch({sid: x[:2] for sid, x in inputs.items()}, model="beta")
        rest = list(
            client.stream_batches(
                [
                    {sid: x[2:4] for sid, x in inputs.items()},
                    {sid: x[4:] for sid, x in inputs.items()},
                ],
                model="beta",
            )
        )
        placed = {(s.model, s.model_version) for s in map(client.get_session, ids)}
        ended = client.step_batch({sid: np.zeros((0, 5)) for sid in ids}, end=ids, model="beta")
    assert placed == {("beta", 1)} and not ended.errors
    for sid, x in inputs.items():
        got = np.concatenate([first[sid], rest[0][sid], rest[1][sid]])
        np.testing.assert_allclose(got, expected(models, ("beta", 1), x), atol=1e-5)


def test_asyncio_batches_run_on_the_version_asked_for(server, models):
    ids = [f"models-async-batch-{i}" for i in range(4)]
    inputs = {sid: random_steps(5, 3, seed=20 + i) for i, sid in enumerate(ids)}

    async def run():
        async with AsyncStreamingClient(server.target) as client:
            first = await client.step_batch(
                {sid: x[:2] for sid, x in inputs.items()}, model="alpha", model_version=1
            )
            rest = [
                r
                async for r in client.stream_batches(
                    [{sid: x[2:] for sid, x in inputs.items()}], model="alpha", model_version=1
                )
            ]
            placed = {
                (s.model, s.model_version) for s in [await client.get_session(i) for i in ids]
            }
            end = {sid: np.zeros((0, 3)) for sid in ids}
            await client.step_batch(end, end=ids, model="alpha", model_version=1)
            return first, rest[0], placed

    first, rest, placed = asyncio.run(run())
    assert placed == {("alpha", 1)}
    for sid, x in inputs.items():
        got = np.concatenate([first[sid], rest[sid]])
        np.testing.assert_allclose(got, expected(models, ("alpha", 1), x), atol=1e-5)


# lstm-client


def test_info_prints_the_model_asked_for_and_lists_every_model(server, models):
    with StreamingClient(server.target) as client:
        session = client.open_session(model="beta")
        result = lstm_client("info", "--target", server.target, "--model", "beta")
        sessions = {key: s.sessions for key, s in versions_of(client.list_models()).items()}
        session.close()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fingerprint = models["beta", 1].fingerprint[:12]
    assert lines[0] == f"model        beta v1 ({fingerprint})"
    assert "input 5, hidden 6 x 2 layers, output 4" in lines[1]
    listing = lines[lines.index("models       (* the default)") + 1 :]

    def line(marker, name, version):
        count = sessions[name, version]
        return [*marker, name, f"v{version}", "READY", str(count), "session" + "s" * (count != 1)]

    assert sessions["beta", 1] >= 1
    assert [line.split() for line in listing] == [
        line("*", "alpha", 1),
        line("*", "alpha", 2),
        line("", "basic-motions", 1),
        line("", "beta", 1),
    ]
    default = lstm_client("info", "--target", server.target)
    assert default.stdout.startswith("model        alpha v2 "), default.stdout


def test_info_of_an_unknown_model_is_one_line_naming_it(server):
    result = lstm_client("info", "--target", server.target, "--model", "gamma")
    assert result.returncode == 1
    assert result.stderr.startswith(f"lstm-client: {server.target}: NOT_FOUND MODEL_NOT_FOUND: ")
    assert "gamma" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_format_models_marks_the_default_and_says_why_a_version_failed():
    listed = pb.ListModelsResponse(
        default_model="b",
        models=[
            pb.ModelStatus(
                name="a",
                versions=[
                    pb.ModelVersionStatus(
                        version=1, state=pb.MODEL_VERSION_STATE_DRAINING, sessions=1
                    ),
                    pb.ModelVersionStatus(
                        version=2, state=pb.MODEL_VERSION_STATE_FAILED, error="no weights"
                    ),
                ],
            ),
            pb.ModelStatus(name="b", versions=[pb.ModelVersionStatus(version=10, state=READY)]),
        ],
    )
    assert format_models(listed) == [
        "models       (* the default)",
        "     a  v1   DRAINING  1 session",
        "     a  v2   FAILED    0 sessions  no weights",
        "  *  b  v10  READY     0 sessions",
    ]


class OlderServer:
    """A server from before ListModels: GetModelInfo only (the generated servicer answers the
    rest UNIMPLEMENTED)."""

    def __enter__(self):
        from concurrent import futures

        from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

        class Servicer(pb_grpc.InferenceServiceServicer):
            def GetModelInfo(self, request, context):
                return pb.GetModelInfoResponse(name="old", version="3", input_size=2, output_size=1)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_InferenceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(0)


def test_info_from_a_server_without_list_models_prints_the_model_info():
    with OlderServer() as old:
        result = lstm_client("info", "--target", f"127.0.0.1:{old.port}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model        old v3 ")
    assert "models" not in result.stdout.split()


def test_stream_creates_its_session_on_the_model_asked_for(server, models):
    steps = random_steps(8, 5, seed=30)
    result = lstm_client(
        "stream", "--target", server.target, "--model", "beta", stdin=to_csv(steps)
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"session \S+ from step 0 on beta v1", result.stderr), result.stderr
    np.testing.assert_allclose(
        from_csv(result.stdout), expected(models, ("beta", 1), steps), atol=1e-5
    )
    old = random_steps(4, 3, seed=31)
    flags = ["--model", "alpha", "--model-version", "1"]
    result = lstm_client("stream", "--target", server.target, *flags, stdin=to_csv(old))
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(
        from_csv(result.stdout), expected(models, ("alpha", 1), old), atol=1e-5
    )


def test_stream_refuses_a_model_the_resumed_session_does_not_live_on(server):
    with StreamingClient(server.target) as client:
        session_id = client.open_session(model="beta").detach()
        result = lstm_client(
            "stream", f"--session={session_id}", "--model", "alpha", "--target", server.target
        )
        client.delete_session(session_id)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"lstm-client: --session {session_id} lives on beta v1, not on alpha (--model)"
    )


@pytest.mark.parametrize("per_message", ["0", "3"])
def test_bench_runs_its_sessions_on_the_model_asked_for(server, per_message):
    """beta's inputs are 5 wide: sessions made on the default model (3) would refuse them."""
    flags = ["--sessions", "4", "--chunk", "2", "--duration", "0.5", "--json"]
    flags += ["--sessions-per-message", per_message, "--model", "beta", "--model-version", "1"]
    result = lstm_client("bench", "--target", server.target, *flags)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["errors"], report["error_sample"]) == (0, "")
    assert report["timesteps"] > 0


def test_demo_streams_through_the_model_asked_for(server):
    refused = lstm_client("demo", "--target", server.target)  # the default model is alpha
    assert refused.returncode == 2
    assert "the server runs 'alpha'" in refused.stderr
    result = lstm_client("demo", "--target", server.target, "--model", "basic-motions", timeout=300)
    assert result.returncode == 0, result.stderr
    card = (BUNDLED_MODEL_DIR / "MODEL_CARD.md").read_text()
    table = [line for line in result.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table) == 4 and all(row in card for row in table)


def test_model_version_must_be_a_number():
    result = lstm_client("info", "--model-version", "x")
    assert result.returncode == 2
    assert "--model-version: expected a version number (0: the newest), got 'x'" in result.stderr


def test_node_example_creates_its_session_on_the_model_asked_for(server, models, tmp_path_factory):
    work = install_node_example(tmp_path_factory)
    steps = random_steps(12, 5, seed=40)
    report = run_example(work, server.target, steps, "--model", "beta", "--model-version", "1")
    outputs = np.asarray(report["outputs"], dtype=np.float32)
    np.testing.assert_allclose(outputs, expected(models, ("beta", 1), steps), atol=1e-5)
