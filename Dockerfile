# lstm-serve image. GPU hosts (default): the CUDA build of torch, whose wheels carry the CUDA
# runtime, so no CUDA base image is needed; the host needs the NVIDIA container toolkit.
# CPU-only image: docker build --build-arg TORCH_VARIANT=cpu -t lstm-stream:cpu .
# Torch from a mirror or a local index: --build-arg TORCH_INDEX_URL=https://mirror/whl/cu128
# (an index on the host's loopback needs docker build --network host).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md /src/
COPY proto /src/proto
COPY lstm_model /src/lstm_model
COPY server /src/server
COPY client /src/client
RUN pip install '/src[server]' && rm -rf /src
# The native GRU layer loop (lstm_model/native.py), compiled here for every CPU capability ATen
# dispatches to (AVX512, AVX2, DEFAULT): the runtime image has no compiler, and the server loads
# the one matching the CPU it runs on.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && lstm-model build-kernels --capability all --dir /opt/venv/share/lstm-stream/kernels \
    && rm -rf /var/lib/apt/lists/*

FROM python:${PYTHON_VERSION}-slim
# The snapshot directory exists and is the server's: a named volume mounted over it starts
# with this owner (a root-owned mount is refused at start: lstm-serve checks it can write).
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/lstm-stream lstm \
    && install -d -o lstm -g lstm /var/lib/lstm-stream/snapshots
COPY --from=build /opt/venv /opt/venv
# The drain grace fits inside `docker stop`'s default 10 s with time for the snapshot; with a
# longer grace, give the container more (compose: stop_grace_period; run: --stop-timeout).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    LSTM_SERVE_HOST=0.0.0.0 LSTM_SERVE_PORT=50051 LSTM_SERVE_METRICS_PORT=8000 \
    LSTM_SERVE_SNAPSHOT_DIR=/var/lib/lstm-stream/snapshots LSTM_SERVE_SHUTDOWN_GRACE_S=5 \
    LSTM_STREAM_KERNEL_DIR=/opt/venv/share/lstm-stream/kernels
USER lstm
WORKDIR /var/lib/lstm-stream
EXPOSE 50051 8000
# Asks the gRPC health service (grpc.health.v1), as an orchestrator's probe would.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["lstm-client", "health", "--target", "localhost:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lstm-serve"]
