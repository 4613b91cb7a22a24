"""A foreign HTM worker in Python (nats-py), following docs/htm.md (the worker protocol).

Usage: python3 worker.py NATS_URL WORKER_ID TASKS
Connects as the `worker` identity of nats.conf (with its own inbox prefix, `_INBOX_worker`: the
only inboxes it may read), heartbeats on htm.heartbeat.<id> every 0.2 s, takes assignments on
htm.worker.<id>.task, reports started and completed on htm.task.result under the assignment's
fence, and exits after completing TASKS tasks.
"""
import asyncio
import json
import sys
import time

import nats


async def main(url: str, worker_id: str, tasks: int) -> None:
    nc = await nats.connect(url, user="worker", password="worker-dev", inbox_prefix="_INBOX_worker")
    started = time.time()
    done = 0
    finished = asyncio.Event()
    in_flight = 0

    async def heartbeat() -> None:
        while not finished.is_set():
            beat = {
                "worker_id": worker_id, "cpu_percent": 1.0, "memory_mb": 20.0, "in_flight": in_flight,
                "capacity": 4, "tasks_completed": done, "tasks_failed": 0,
                "uptime_seconds": time.time() - started,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            }
            await nc.publish(f"htm.heartbeat.{worker_id}", json.dumps(beat).encode())
            await asyncio.sleep(0.2)

    async def report(task_id: str, fence: int, outcome: str, result=None) -> bool:
        body = {"task_id": task_id, "worker_id": worker_id, "fence": fence, "outcome": outcome}
        if result is not None:
            body["result"] = result
        for _ in range(50):
            try:
                reply = await nc.request("htm.task.result", json.dumps(body).encode(), timeout=2)
            except Exception:
                await asyncio.sleep(0.2)
                continue
            return not (reply.headers or {}).get("Nats-Service-Error-Code")
        return False

    async def run(assignment: dict) -> None:
        nonlocal done, in_flight
        task, fence = assignment["task"], assignment["fence"]
        if await report(task["task_id"], fence, "started"):
            result = {"handled_by": worker_id, "intent_type": task["intent_type"], "echo": task["payload"].get("echo")}
            if await report(task["task_id"], fence, "completed", result):
                done += 1
        in_flight -= 1
        if done >= tasks:
            finished.set()

    async def on_assignment(msg) -> None:
        nonlocal in_flight
        assignment = json.loads(msg.data)
        in_flight += 1
        await msg.respond(json.dumps({"accepted": True, "worker_id": worker_id}).encode())
        asyncio.create_task(run(assignment))

    await nc.subscribe(f"htm.worker.{worker_id}.task", cb=on_assignment)
    beating = asyncio.create_task(heartbeat())
    await asyncio.wait_for(finished.wait(), timeout=60)
    await beating
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
