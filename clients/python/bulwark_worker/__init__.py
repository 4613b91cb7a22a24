"""A worker SDK for bulwark's HTM: the worker protocol of docs/htm.md behind a decorator.

    from bulwark_worker import Worker

    worker = Worker("py-1", capacity=4)

    @worker.handler("query_knowledge")
    async def answer(task):
        return {"answer": 42, "question": task.payload.get("question")}

    worker.run("nats://127.0.0.1:4222")

The worker connects as a NATS user of the WORKERS account (`worker` by default), heartbeats on
`htm.heartbeat.<id>`, accepts assignments on `htm.worker.<id>.task` (refusing them when full),
runs each through the handler of its `intent_type`, and reports `started`, then `completed`
(the handler's return value is the result) or `failed` (the exception's message), under the
assignment's fence, retrying a report until the scheduler answers and dropping the task on 409
or 404. A cancel on `htm.worker.<id>.cancel` cancels the handler's asyncio task.

Raise `PermanentError` for a failure another attempt would repeat; any other exception is
retryable. A plain (non-async) handler runs in a thread; it cannot be interrupted by a cancel.
"""

import asyncio
import inspect
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

import nats

__all__ = ["Worker", "Task", "PermanentError"]


class PermanentError(Exception):
    """A failure another attempt would repeat: the task fails for good (`retryable: false`)."""


@dataclass
class Task:
    """One task, as the scheduler assigned it."""

    task_id: str
    intent_id: str
    intent_type: str
    actor: str
    payload: Any
    priority: int
    autonomy_tier: int
    correlation_id: str
    queued_at: str
    fence: int
    attempt: int
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


Handler = Callable[[Task], Any]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"


class Worker:
    """An HTM worker. Register handlers with `@worker.handler(intent_type)`, then `run(url)`."""

    def __init__(
        self,
        worker_id: str,
        *,
        capacity: int = 4,
        user: str = "worker",
        password: str = "worker-dev",
        heartbeat_interval_s: float = 5.0,
        report_retry_s: float = 120.0,
        request_timeout_s: float = 2.0,
    ) -> None:
        if not worker_id or any(c in worker_id for c in ".*> \t"):
            raise ValueError(f"worker_id {worker_id!r} must be one subject token")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.worker_id = worker_id
        self.capacity = capacity
        self.user = user
        self.password = password
        self.heartbeat_interval_s = heartbeat_interval_s
        self.report_retry_s = report_retry_s
        self.request_timeout_s = request_timeout_s
        self._handlers: Dict[str, Handler] = {}
        # task id -> (fence, its state: "cancelled" and the handler's asyncio task once started)
        self._running: Dict[str, Tuple[int, Dict[str, Any]]] = {}
        self._work: set = set()
        self._finished: Dict[Tuple[str, int], None] = {}
        self._leader_floor = 0
        self._run_id = str(uuid.uuid4())
        self._started = time.time()
        self.completed = 0
        self.failed = 0
        self._nc = None

    # ---- registration ------------------------------------------------------------------

    def handler(self, intent_type: str) -> Callable[[Handler], Handler]:
        """Decorator: `fn(task)` runs the tasks of `intent_type` (async or plain)."""

        def register(fn: Handler) -> Handler:
            self._handlers[intent_type] = fn
            return fn

        return register

    # ---- running -----------------------------------------------------------------------

    def run(self, url: str = "nats://127.0.0.1:4222") -> None:
        """Runs until interrupted (Ctrl-C)."""
        try:
            asyncio.run(self.serve(url))
        except KeyboardInterrupt:
            pass

    async def serve(self, url: str, stop: Optional[asyncio.Event] = None) -> None:
        """Runs until `stop` is set (forever without one); running tasks get 10 s to finish."""
        stop = stop or asyncio.Event()
        self._nc = await nats.connect(
            url, user=self.user, password=self.password, inbox_prefix=f"_INBOX_{self.user}"
        )
        await self._nc.subscribe(f"htm.worker.{self.worker_id}.task", cb=self._on_assignment)
        await self._nc.subscribe(f"htm.worker.{self.worker_id}.cancel", cb=self._on_cancel)
        beating = asyncio.create_task(self._heartbeats(stop))
        try:
            await stop.wait()
        finally:
            beating.cancel()
            if self._work:
                await asyncio.wait(list(self._work), timeout=10)
            await self._nc.drain()

    # ---- the protocol ------------------------------------------------------------------

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            beat = {
                "worker_id": self.worker_id, "cpu_percent": 0.0, "memory_mb": 0.0,
                "in_flight": len(self._running), "capacity": self.capacity,
                "tasks_completed": self.completed, "tasks_failed": self.failed,
                "uptime_seconds": time.time() - self._started, "run_id": self._run_id,
                "timestamp": _now(),
            }
            try:
                await self._nc.publish(f"htm.heartbeat.{self.worker_id}", json.dumps(beat).encode())
            except Exception:  # disconnected: the next beat tries again
                pass
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.heartbeat_interval_s)
            except asyncio.TimeoutError:
                pass

    async def _refuse(self, msg, status: int, code: str, message: str) -> None:
        headers = {"Nats-Service-Error-Code": str(status), "Nats-Service-Error": message}
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        await self._nc.publish(msg.reply, body, headers=headers)

    async def _on_assignment(self, msg) -> None:
        try:
            assignment = json.loads(msg.data)
            t = assignment["task"]
            if assignment["worker_id"] != self.worker_id:
                raise ValueError(f"assignment is for {assignment['worker_id']!r}")
            task = Task(
                task_id=t["task_id"], intent_id=t["intent_id"], intent_type=t["intent_type"],
                actor=t.get("actor", ""), payload=t.get("payload"), priority=t.get("priority", 5),
                autonomy_tier=t.get("autonomy_tier", 2), correlation_id=t.get("correlation_id", ""),
                queued_at=t.get("queued_at", ""), fence=int(assignment["fence"]),
                attempt=int(assignment.get("attempt", 1)), raw=assignment,
            )
        except (ValueError, KeyError, TypeError) as err:
            await self._refuse(msg, 400, "invalid_assignment", f"assignment refused: {err}")
            return
        token = int(assignment.get("leader_token", 0) or 0)
        if token:
            if token < self._leader_floor:
                await self._refuse(msg, 409, "stale_leader",
                                   f"leader token {token} is below {self._leader_floor}")
                return
            self._leader_floor = token
        held = self._running.get(task.task_id)
        if (held and held[0] == task.fence) or (task.task_id, task.fence) in self._finished:
            await msg.respond(json.dumps({"accepted": True, "worker_id": self.worker_id,
                                          "already_running": True}).encode())
            return
        if len(self._running) >= self.capacity:
            await self._refuse(msg, 503, "unavailable", f"{self.worker_id} is full")
            return
        await msg.respond(json.dumps({"accepted": True, "worker_id": self.worker_id}).encode())
        state: Dict[str, Any] = {"cancelled": False, "handler": None}
        self._running[task.task_id] = (task.fence, state)
        work = asyncio.create_task(self._execute(task, state))
        self._work.add(work)
        work.add_done_callback(self._work.discard)

    async def _on_cancel(self, msg) -> None:
        try:
            req = json.loads(msg.data)
            task_id, fence = req["task_id"], int(req["fence"])
        except (ValueError, KeyError, TypeError) as err:
            await self._refuse(msg, 400, "invalid_cancel", f"cancel refused: {err}")
            return
        held = self._running.get(task_id)
        cancelled = bool(held and held[0] == fence)
        if cancelled:
            held[1]["cancelled"] = True
            if held[1]["handler"] is not None:
                held[1]["handler"].cancel()
        await msg.respond(json.dumps({"cancelled": cancelled, "task_id": task_id,
                                      "worker_id": self.worker_id}).encode())

    async def _execute(self, task: Task, state: Dict[str, Any]) -> None:
        last = "refused"
        try:
            last = await self._report(task, "started")
            if last != "accepted":
                return
            fn = self._handlers.get(task.intent_type)
            try:
                if state["cancelled"]:
                    raise asyncio.CancelledError()
                if fn is None:
                    raise PermanentError(
                        f"no handler for intent_type {task.intent_type!r} on {self.worker_id}")
                if inspect.iscoroutinefunction(fn):
                    state["handler"] = asyncio.ensure_future(fn(task))
                else:
                    state["handler"] = asyncio.ensure_future(asyncio.to_thread(fn, task))
                result = await state["handler"]
                outcome = ("completed", {"result": result})
            except asyncio.CancelledError:
                outcome = ("failed", {"error": "cancelled", "retryable": False})
            except PermanentError as err:
                outcome = ("failed", {"error": str(err) or "permanent failure", "retryable": False})
            except Exception as err:  # noqa: BLE001 - every failure is reported
                outcome = ("failed", {"error": f"{type(err).__name__}: {err}", "retryable": True})
            last = await self._report(task, outcome[0], **outcome[1])
            if last == "accepted":
                if outcome[0] == "completed":
                    self.completed += 1
                else:
                    self.failed += 1
        finally:
            held = self._running.get(task.task_id)
            if held and held[0] == task.fence:
                del self._running[task.task_id]
            if last != "gave_up":
                self._finished[(task.task_id, task.fence)] = None
                while len(self._finished) > 4096:
                    self._finished.pop(next(iter(self._finished)))

    async def _report(self, task: Task, outcome: str, **extra: Any) -> str:
        """`accepted`, `refused` (drop the task) or `gave_up` (no scheduler answered)."""
        body = {"task_id": task.task_id, "worker_id": self.worker_id, "fence": task.fence,
                "outcome": outcome, **extra}
        data = json.dumps(body).encode()
        deadline = time.monotonic() + self.report_retry_s
        backoff = 0.05
        while True:
            try:
                reply = await self._nc.request("htm.task.result", data, timeout=self.request_timeout_s)
                code = (reply.headers or {}).get("Nats-Service-Error-Code")
                if code is None:
                    return "accepted"
                if code in ("409", "404", "400"):
                    return "refused"
            except Exception:  # noqa: BLE001 - no responders, timeout: retry
                pass
            if time.monotonic() > deadline:
                return "gave_up"
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def _main() -> None:  # pragma: no cover - a smoke entry point
    worker = Worker(os.environ.get("WORKER_ID", "py-1"))

    @worker.handler("query_knowledge")
    async def answer(task: Task) -> Dict[str, Any]:
        return {"handled_by": worker.worker_id, "echo": (task.payload or {}).get("echo")}

    worker.run(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
