"""The committed generated modules are exactly what `make proto` writes from the .proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    f"{package}/{stem}{suffix}"
    for package, stem in (("v1", "inference"), ("oip", "grpc_service"))
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
]


def test_generated_code_matches_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)], check=True
    )
    for name in GENERATED:
        fresh = (tmp_path / "lstm_stream" / name).read_text()
        committed = (ROOT / "proto" / "lstm_stream" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_contract_names_are_in_the_proto():
    from lstm_stream.v1 import inference_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    assert sorted(service.methods_by_name) == sorted(
        [
            "GetModelInfo",
            "CreateSession",
            "GetSession",
            "DeleteSession",
            "StreamSteps",
            "Predict",
            "ExportSession",
            "ImportSession",
            "StepBatch",
            "StreamBatches",
            "ListModels",
        ]
    )
    request = pb.StreamStepsRequest.DESCRIPTOR.fields_by_name
    assert [
        request[n].number for n in ("session_id", "start_step", "inputs", "reset", "end_session")
    ] == [1, 2, 3, 4, 5]
    assert request["start_step"].has_presence
    assert request["answered_step"].has_presence  # beyond 1.3, optional (issue 27)
    response = pb.StreamStepsResponse.DESCRIPTOR.fields_by_name
    assert set(response) == {
        "session_id",
        "start_step",
        "num_steps",
        "outputs",
        "durable_step",
        "packed_outputs",
    }
    assert request["packed_inputs"].type == request["packed_inputs"].TYPE_BYTES
    assert "packed_inputs" in pb.PredictRequest.DESCRIPTOR.fields_by_name
    assert "packed_outputs" in pb.PredictResponse.DESCRIPTOR.fields_by_name
    assert pb.OutputKind.Name(0) == "OUTPUT_KIND_UNSPECIFIED"


def test_batch_names_are_those_of_the_contract():
    """DESIGN 1.7: StepBatch / StreamBatches and their messages' fields."""
    from lstm_stream.v1 import inference_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    stream = service.methods_by_name["StreamBatches"]
    assert stream.client_streaming and stream.server_streaming
    assert not service.methods_by_name["StepBatch"].client_streaming
    assert set(pb.StepBatchRequest.DESCRIPTOR.fields_by_name) == {
        "chunks",
        "create_missing",
        "model",
        "model_version",
    }
    chunk = pb.SessionChunk.DESCRIPTOR.fields_by_name
    assert set(chunk) == {
        "session_id",
        "start_step",
        "inputs",
        "packed_inputs",
        "reset",
        "end_session",
        "answered_step",  # beyond 1.7, optional: what a durable record keeps (issue 27)
    }
    assert chunk["start_step"].has_presence and chunk["answered_step"].has_presence
    assert set(pb.StepBatchResponse.DESCRIPTOR.fields_by_name) == {"results"}
    result = pb.ChunkResult.DESCRIPTOR.fields_by_name
    assert set(result) == {
        "session_id",
        "start_step",
        "num_steps",
        "outputs",
        "packed_outputs",
        "durable_step",
        "error",
    }
    assert result["error"].message_type.full_name == "google.rpc.Status"
