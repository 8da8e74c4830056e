# Inference on NVIDIA GPUs: `ghcr.io/agentmesh/agentmesh-inference-gpu:<version>`. The same
# vLLM version as the CPU image (pyproject extras cpu/gpu pin one). Weights are not in the
# image: the Deployment's init container runs `agentmesh models pull` into the model cache.
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY shared shared
COPY services services
COPY cli cli
COPY config config
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[gpu]" grpcio-tools==1.85.1 \
 && mkdir -p /opt/gen \
 && /opt/venv/bin/python -m grpc_tools.protoc -Iproto --python_out=/opt/gen --grpc_python_out=/opt/gen $(find proto -name '*.proto') \
 && echo /opt/gen > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/agentmesh_gen.pth"

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 agentmesh && useradd --uid 10001 --gid 10001 --no-create-home agentmesh
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/gen /opt/gen
COPY --from=build /src/config /app/config
WORKDIR /app
# Read-only root filesystem: every cache vLLM, Triton or torch.compile writes goes to /tmp.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 HOME=/tmp XDG_CACHE_HOME=/tmp/.cache \
    VLLM_CACHE_ROOT=/tmp/vllm TRITON_CACHE_DIR=/tmp/triton AGENTMESH_DATA_DIR=/var/lib/agentmesh
USER 10001:10001
EXPOSE 50052 9102
CMD ["python", "-m", "services.inference"]
