"""``agentmesh up`` (what ``make run`` starts) through real processes and the README's grpcurl.

The README's grpcurl lines are run as written, only with the ports swapped for free ones so
the test never collides with a running mesh.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
DEFAULT_PORTS = {"orchestrator": 50051, "inference": 50052, "tools": 50053}

pytestmark = pytest.mark.slow


def test_grpcurl_is_installed() -> None:
    """The dev extras ship grpcurl; without it the README checks below cannot run: fail."""
    assert GRPCURL is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def readme_grpcurl_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip().startswith("grpcurl ")
    ]


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    return str(blocks[0])


async def _run(argv: list[str], timeout_s: float = 60) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    return int(process.returncode or 0), out.decode()


async def _wait_all_serving(ports: dict[str, int], timeout_s: float) -> None:
    assert GRPCURL is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = dict(ports)
    while pending and loop.time() < deadline:
        for name, port in list(pending.items()):
            code, out = await _run(
                [GRPCURL, "-plaintext", f"localhost:{port}", "grpc.health.v1.Health/Check"]
            )
            if code == 0 and '"SERVING"' in out:
                del pending[name]
        await asyncio.sleep(2)
    assert not pending, f"not SERVING in time: {sorted(pending)}"


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.usefixtures("without_shared_engine")
async def test_up_serves_health_reflection_and_the_readme_commands(tmp_path: Path) -> None:
    ports = {name: _free_port() for name in DEFAULT_PORTS}
    env = {
        **os.environ,
        "AGENTMESH_ORCHESTRATOR_PORT": str(ports["orchestrator"]),
        "AGENTMESH_INFERENCE_PORT": str(ports["inference"]),
        "AGENTMESH_TOOLS_PORT": str(ports["tools"]),
        "AGENTMESH_ORCHESTRATOR_INFERENCE__TARGET": f"127.0.0.1:{ports['inference']}",
        "AGENTMESH_ORCHESTRATOR_TOOLS__TARGET": f"127.0.0.1:{ports['tools']}",
        "AGENTMESH_ORCHESTRATOR_METRICS_PORT": "0",
        "AGENTMESH_INFERENCE_METRICS_PORT": "0",
        "AGENTMESH_TOOLS_METRICS_PORT": "0",
        "AGENTMESH_ORCHESTRATOR_DATA_DIR": str(tmp_path),
        "AGENTMESH_TOOLS_DATA_DIR": str(tmp_path),
        "AGENTMESH_INFERENCE_DATA_DIR": str(tmp_path),
        # The prepared model is shared with the other tests: convert it once.
        "AGENTMESH_INFERENCE_MODEL_CACHE_DIR": str(REPO / "var" / "models"),
        "AGENTMESH_INFERENCE_CPU_KVCACHE_GIB": "1",
        # The one override of the agent: the 135M model's plan decides which tools run, so the
        # first round is made to include crm_lookup (the engine still writes its arguments)
        # and the README's turns are checked for a finished tool call.
        "AGENTMESH_ORCHESTRATOR_PROFILE__REQUIRED_FIRST_ROUND_TOOLS": '["crm_lookup"]',
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "up",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output: list[str] = []

    async def collect() -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            output.append(line.decode(errors="replace"))

    collector = asyncio.create_task(collect())
    try:
        await _wait_all_serving(ports, timeout_s=900)
        commands = readme_grpcurl_commands()
        assert len(commands) >= 15
        for command in commands:
            for name, default in DEFAULT_PORTS.items():
                command = command.replace(f"localhost:{default}", f"localhost:{ports[name]}")
            argv = shlex.split(command)
            argv[0] = str(GRPCURL)
            code, out = await _run(argv, timeout_s=600)
            assert code == 0, f"{command}\n{out}"
            method = argv[-1].rsplit("/", 1)[-1]
            expected = {
                "list": ["grpc.health.v1.Health", "grpc.reflection", "agentmesh."],
                "Check": ['"SERVING"'],
                "ListLanes": ['"workhorse"', '"LANE_STATE_SERVING"'],
                "StreamGenerate": ['"text_delta"', '"summary"'],
                "CallTools": ['"crm_lookup"', '"PARSE_OUTCOME_OK"'],
                "ListTools": ['"kb_search"', '"registry_version"'],
                "ExecuteTool": ['"TOOL_RESULT_STATUS_OK"', "CUST-0001"],
                "ExecuteTools": ['"call_id": "a"', '"call_id": "b"'],
                "CreateSession": ['"demo-1"'],
                "RunTurn": [
                    '"turn_started"',
                    '"plan"',
                    '"tool_call_finished"',
                    '"crm_lookup"',
                    '"turn_completed"',
                    '"llm_stages"',
                ],
                "GetSession": ['"ROLE_USER"', '"ROLE_ASSISTANT"'],
            }.get(method, [])
            for fragment in expected:
                assert fragment in out, f"{command}\n{out[-2000:]}"
        example = readme_python_example().replace(
            "localhost:50051", f"localhost:{ports['orchestrator']}"
        )
        code, out = await _run([sys.executable, "-c", example], timeout_s=600)
        assert code == 0, out
        assert "[crm_lookup: OK]" in out and "total" in out, out
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 180) == 0, "".join(output[-80:])
        assert "exit codes" in "".join(output)
    finally:
        if process.returncode is None:
            # The orderly stop first, so the services it started stop with it.
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 120)
            except TimeoutError:
                process.kill()
                await process.wait()
        collector.cancel()
