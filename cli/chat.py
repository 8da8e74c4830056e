"""``agentmesh chat``: a terminal conversation with the orchestrator.

Streams the answer as it is generated, shows each tool call with its status, and prints the
turn's latency breakdown (the seed's per-turn budget table, measured). Ctrl-C during a turn
cancels it (the orchestrator aborts the engine request); Ctrl-D or /quit leaves.

A turn that proposes a write (a refund, a credit) ends AWAITING_CONFIRMATION: the proposal is
shown with its amount and the user answers y/n (with scripted ``-m`` messages, ``--yes`` or
``--no`` decides; the default is no). The answer is sent as a confirming or rejecting turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any

import grpc
import typer
from rich.console import Console
from rich.prompt import Confirm
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {
    "OK": "green",
    "PROPOSED": "yellow",
    "DECLINED": "yellow",
    "SKIPPED_DUPLICATE": "yellow",
    "SKIPPED_CAP": "yellow",
}


def _pb() -> Any:
    """orchestrator.v1, imported when a command runs (not when the CLI loads)."""
    from agentmesh.orchestrator.v1 import orchestrator_pb2

    return orchestrator_pb2


def state_name(value: int) -> str:
    """An ActionState as a word ("EXECUTED")."""
    return str(_pb().ActionState.Name(value)).removeprefix("ACTION_STATE_")


LATENCY_STAGES = (
    ("plan", "Plan"),
    ("tool_emit", "Tool calls (parallel emit)"),
    ("tool_wall", "Tool wall"),
    ("observe", "Observe / parse"),
    ("compose", "Compose"),
    ("queue_prefill", "Queue + prefill (TTFT)"),
    ("network", "Network round trips"),
    ("total", "Total"),
)


def _seconds(value: Any) -> float:
    return float(value.seconds + value.nanos / 1e9)


def latency_table(done: Any) -> Table:
    """The per-turn latency table of a TurnCompleted event."""
    table = Table(title="Turn latency", show_header=True, header_style="bold")
    table.add_column("Stage")
    table.add_column("Seconds", justify="right")
    for field, label in LATENCY_STAGES:
        style = "bold" if field == "total" else None
        table.add_row(label, f"{_seconds(getattr(done.latency, field)):.3f}", style=style)
    return table


def amount_text(action: Any) -> str:
    """An action's amount with its currency ("49.00 EUR")."""
    return f"{action.amount_cents / 100:.2f} {action.currency}".strip()


def proposal_text(action: Any) -> Text:
    """What the user is asked to confirm: the summary, the amount and the action id."""
    text = Text("Proposed, not done yet: ", style="bold yellow")
    text.append(action.summary, style="bold")
    text.append(f"\n  amount: {amount_text(action)}   action: {action.action_id}", style="yellow")
    return text


def usage_table(done: Any) -> Table:
    table = Table(title="Tokens by lane", show_header=True, header_style="bold")
    for column in ("Lane", "Model", "Generations", "Prompt", "Cached", "Completion"):
        table.add_column(column, justify="left" if column in ("Lane", "Model") else "right")
    for lane in done.usage:
        table.add_row(
            lane.lane,
            lane.model,
            str(lane.generations),
            str(lane.usage.prompt_tokens),
            str(lane.usage.cached_prompt_tokens),
            str(lane.usage.completion_tokens),
        )
    return table


class TurnPrinter:
    """Renders RunTurn events as they arrive."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.streaming = False

    def end_stream(self) -> None:
        if self.streaming:
            self.console.file.write("\n")
            self.streaming = False

    def event(self, response: Any) -> None:
        kind = response.WhichOneof("event")
        c = self.console
        if kind == "plan":
            p = response.plan
            tools = ", ".join(p.chosen_tools) or "no tools"
            c.print(
                Text(f"plan #{p.round} [{p.lane}] {p.text[:160]} -> {tools}", style="dim"),
                highlight=False,
            )
        elif kind == "tool_call_started":
            s = response.tool_call_started
            c.print(Text(f"  -> {s.name} {s.arguments_json}", style="cyan"), highlight=False)
        elif kind == "tool_call_finished":
            f = response.tool_call_finished
            style = STATUS_STYLE.get(f.status, "red")
            line = Text(f"  <- {f.name} ", style="cyan")
            line.append(f.status, style=f"bold {style}")
            line.append(f" {_seconds(f.latency) * 1000:.0f} ms")
            if f.truncated:
                line.append(" (truncated)", style="yellow")
            if f.error_message:
                line.append(f" {f.error_message}", style="dim")
            c.print(line, highlight=False)
        elif kind == "escalation":
            e = response.escalation
            what = "re-prompt with schema" if e.kind == 1 else "lane escalation"
            c.print(
                Text(f"  !! {what}: {e.from_lane} -> {e.to_lane} ({e.reason})", style="yellow"),
                highlight=False,
            )
        elif kind == "action_proposed":
            a = response.action_proposed.action
            c.print(
                Text(
                    f"  ?? proposed {a.action_id}: {a.summary} ({amount_text(a)})", style="yellow"
                ),
                highlight=False,
            )
        elif kind == "action_resolved":
            a = response.action_resolved.action
            state = state_name(a.state)
            line = Text(f"  == action {a.action_id} ", style="cyan")
            line.append(state, style="bold " + ("green" if state == "EXECUTED" else "yellow"))
            line.append(f": {a.summary}")
            if a.error_message:
                line.append(f" ({a.error_message})", style="dim")
            c.print(line, highlight=False)
        elif kind == "compose_delta":
            if not self.streaming:
                c.file.write("\n")
                self.streaming = True
            c.file.write(response.compose_delta.text)
            c.file.flush()
        elif kind == "turn_completed":
            self.end_stream()
            done = response.turn_completed
            for note in done.notes:
                c.print(Text(f"note: {note}", style="yellow"), highlight=False)
            c.print(latency_table(done))
            c.print(usage_table(done))
            c.print(
                Text(
                    f"tool calls: {done.tool_calls} this turn, {done.task_tool_calls} this task",
                    style="dim",
                )
            )


class TurnResult:
    """What the chat loop needs from a finished turn."""

    def __init__(self) -> None:
        self.completed: Any = None
        self.proposals: list[Any] = []
        self.failed = False

    @property
    def awaiting(self) -> list[Any]:
        """The actions this turn proposed, if it ended waiting for a confirmation."""
        done = self.completed
        if done is None or done.outcome != _pb().TURN_OUTCOME_AWAITING_CONFIRMATION:
            return []
        return self.proposals


async def run_turn(stub: Any, request: Any, printer: TurnPrinter) -> TurnResult:
    """Sends one RunTurn and renders its events; Ctrl-C cancels it."""
    console = printer.console
    result = TurnResult()
    call = stub.RunTurn(request)
    interrupted = False

    def on_sigint(call: Any = call) -> None:
        nonlocal interrupted
        interrupted = True
        call.cancel()  # the orchestrator aborts the turn's engine requests

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        async for response in call:
            printer.event(response)
            kind = response.WhichOneof("event")
            if kind == "action_proposed":
                result.proposals.append(response.action_proposed.action)
            elif kind == "turn_completed":
                result.completed = response.turn_completed
    except asyncio.CancelledError:
        if not interrupted:
            raise
        printer.end_stream()
        console.print("[yellow]turn cancelled[/yellow]")
    except grpc.aio.AioRpcError as err:
        printer.end_stream()
        if interrupted and err.code() == grpc.StatusCode.CANCELLED:
            console.print("[yellow]turn cancelled[/yellow]")
        else:
            console.print(f"[red]turn failed: {err.code().name}: {err.details()}[/red]")
            result.failed = True
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    return result


async def decide(action: Any, console: Console, *, scripted: bool, assume_yes: bool) -> bool:
    """Shows a proposal and returns whether the user confirms it."""
    console.print(proposal_text(action), highlight=False)
    if scripted:
        answer = assume_yes
        flag = "--yes" if assume_yes else "--no"
        console.print(
            Text(f"Go ahead? {'yes' if answer else 'no'} ({flag})", style="bold"), highlight=False
        )
        return answer
    try:
        return bool(
            await asyncio.to_thread(Confirm.ask, "Go ahead?", console=console, default=False)
        )
    except (EOFError, KeyboardInterrupt):
        console.print("[yellow]no answer: declining[/yellow]")
        return False


async def run_chat(
    target: str,
    *,
    customer_id: str,
    lane: str,
    messages: list[str],
    turn_budget_s: float,
    task_budget_s: float,
    console: Console,
    assume_yes: bool = False,
) -> int:
    from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
    from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc

    budget = pb.Budget()
    if turn_budget_s > 0:
        budget.turn_budget.FromNanoseconds(int(turn_budget_s * 1e9))
    if task_budget_s > 0:
        budget.task_budget.FromNanoseconds(int(task_budget_s * 1e9))
    printer = TurnPrinter(console)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        try:
            created = await stub.CreateSession(
                pb.CreateSessionRequest(customer_id=customer_id, budget=budget), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            console.print(f"[red]cannot create a session at {target}: {err.code().name}[/red]")
            return 1
        session_id = created.session.session_id
        console.print(f"[dim]session {session_id} (Ctrl-C cancels a turn, Ctrl-D quits)[/dim]")
        scripted = list(messages)
        while True:
            if scripted:
                text = scripted.pop(0)
                console.print(Text(f"you> {text}", style="bold"), highlight=False)
            elif messages:
                break
            else:
                try:
                    text = await asyncio.to_thread(input, "you> ")
                except (EOFError, KeyboardInterrupt):
                    break
            if text.strip() in ("/quit", "/exit"):
                break
            if not text.strip():
                continue
            result = await run_turn(
                stub,
                pb.RunTurnRequest(session_id=session_id, user_message=text, lane=lane),
                printer,
            )
            # A proposed write: ask, then send the confirming (or rejecting) turn.
            while not result.failed and result.awaiting:
                action = result.awaiting[-1]
                yes = await decide(action, console, scripted=bool(messages), assume_yes=assume_yes)
                request = (
                    pb.RunTurnRequest(
                        session_id=session_id, confirm_action_id=action.action_id, lane=lane
                    )
                    if yes
                    else pb.RunTurnRequest(
                        session_id=session_id, reject_action_id=action.action_id, lane=lane
                    )
                )
                result = await run_turn(stub, request, printer)
            if result.failed and messages:
                return 1
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.EndSession(pb.EndSessionRequest(session_id=session_id), timeout=5)
    return 0


def register(app: typer.Typer) -> None:
    """Adds ``chat`` to the ``agentmesh`` CLI."""

    @app.command()
    def chat(
        target: str = typer.Option("127.0.0.1:50051", help="The orchestrator's address."),
        customer: str = typer.Option("", "--customer", help="Customer id, e.g. CUST-0042."),
        lane: str = typer.Option("", help="Force one lane for every stage (default: auto)."),
        message: list[str] = typer.Option(
            [], "--message", "-m", help="Send these messages and exit (non-interactive)."
        ),
        turn_budget: float = typer.Option(0.0, help="Seconds per turn (0: server default)."),
        task_budget: float = typer.Option(0.0, help="Seconds per task (0: server default)."),
        yes: bool = typer.Option(
            False,
            "--yes/--no",
            help="With -m: confirm (--yes) or reject (--no) proposed actions. Default: no.",
        ),
    ) -> None:
        """Chat with the agent: streamed answers, tool calls and per-turn latency."""
        console = Console(file=sys.stdout)
        code = 0
        with contextlib.suppress(KeyboardInterrupt):
            code = asyncio.run(
                run_chat(
                    target,
                    customer_id=customer,
                    lane=lane,
                    messages=message,
                    turn_budget_s=turn_budget,
                    task_budget_s=task_budget,
                    console=console,
                    assume_yes=yes,
                )
            )
        raise typer.Exit(code)
