"""Generate the Python gRPC modules from the .proto files under proto/lstm_stream.

lstm_stream/v1/inference.proto      the native API
lstm_stream/oip/grpc_service.proto  the Open Inference Protocol (KServe v2 / Triton)

python proto/generate.py            # rewrite the committed modules
python proto/generate.py --out DIR  # write them under DIR (the drift test compares)
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["lstm_stream/v1/inference.proto", "lstm_stream/oip/grpc_service.proto"]


def googleapis_include() -> Path:
    """Where google/rpc/status.proto lies: googleapis-common-protos (grpcio-status needs it)."""
    from google.rpc import status_pb2

    return Path(status_pb2.__file__).parents[2]


def generate(out: Path = PROTO_ROOT) -> None:
    include = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"-I{googleapis_include()}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(PROTO_ROOT / name) for name in PROTO_FILES),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args().out)
    sys.exit(0)
