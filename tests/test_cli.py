"""The ``agentmesh`` CLI's process handling, without the services."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def test_a_service_started_by_up_dies_with_up(tmp_path: Path) -> None:
    """`up` killed outright (no orderly stop) must not leave its services orphaned."""
    pid_file = tmp_path / "child.pid"
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from cli.main import _terminate_with_parent
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")])}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", parent, env=env, cwd=REPO)
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.05)
    child_pid = int(pid_file.read_text())
    process.kill()
    await process.wait()
    for _ in range(200):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        # A zombie still answers kill(0): reap it if it became ours, else wait for init.
        await asyncio.sleep(0.05)
    else:
        os.kill(child_pid, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")
