"""A hostile HTM worker in Python (nats-py): what a holder of the shared `worker` credential
tries against bulwark (issue 16, item 6). Driven by tests/worker_identity.rs.

Usage: python3 worker_attack.py NATS_URL MODE [ARGS...]
Every mode connects as the `worker` identity of nats.conf (inbox prefix `_INBOX_worker`) and
prints one JSON line when it is set up ({"ready": true}) and one with what happened at the end:
- `term`: subscribes to the services' inboxes (`_INBOX.>`) to see JetStream deliveries and
  terminates every one it sees (`+TERM` on its `$JS.ACK...` reply subject); also sends `+TERM`
  blindly to a guessed ack subject of the task queue. Ends when a line arrives on stdin.
  Prints {"deliveries": n, "terminated": n, "errors": [...]}.
- `liar WORKER_ID CAPACITY`: heartbeats claiming CAPACITY slots, accepts every assignment and
  never reports (it hoards tasks). Ends when a line arrives on stdin. Prints
  {"assignments": [task ids], "errors": [...]}.
- `steal WORKER_ID TASK_ID BEATS`: heartbeats BEATS times under another worker's id as a new
  run (so the scheduler would think the real one restarted and run its task again), then reports
  TASK_ID completed under fence 1 with a forged result. Prints {"report_code": code or null,
  "report": body, "errors": [...]}.
- `many-ids PREFIX COUNT`: heartbeats once under each of COUNT new worker ids PREFIX-0, PREFIX-1, ...
  (each id would stay bound, and be remembered when it dies). Prints {"sent": n, "errors": [...]}.
- `srv NAME`: answers `$SRV.PING`, `$SRV.PING.NAME` and `$SRV.INFO.NAME` as micro service NAME
  (id IMPOSTOR). Ends when a line arrives on stdin. Prints {"pings_answered": n, "errors": [...]}.
"""
import asyncio
import json
import sys
import time

import nats

errors = []


async def on_error(err) -> None:
    errors.append(str(err))


async def connect(url: str):
    return await nats.connect(url, user="worker", password="worker-dev",
                              inbox_prefix="_INBOX_worker", error_cb=on_error,
                              allow_reconnect=False)


def heartbeat(worker_id: str, capacity: int, run_id: str, uptime: float, in_flight: int = 0) -> bytes:
    return json.dumps({
        "worker_id": worker_id, "cpu_percent": 0.0, "memory_mb": 10.0, "in_flight": in_flight,
        "capacity": capacity, "tasks_completed": 0, "tasks_failed": 0, "uptime_seconds": uptime,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "run_id": run_id,
    }).encode()


async def stdin_line() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def say(value: dict) -> None:
    print(json.dumps(value), flush=True)


async def term(nc) -> dict:
    seen = {"deliveries": 0, "terminated": 0}

    async def on_delivery(msg) -> None:
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            seen["deliveries"] += 1
            await nc.publish(msg.reply, b"+TERM")
            seen["terminated"] += 1

    await nc.subscribe("_INBOX.>", cb=on_delivery)
    await nc.publish("$JS.ACK.BULWARK_TASKS.scheduler-p5.1.1.1.0.0", b"+TERM")
    await nc.flush()
    say({"ready": True})
    await stdin_line()
    return seen


async def liar(nc, worker_id: str, capacity: int) -> dict:
    held = []

    async def on_assignment(msg) -> None:
        assignment = json.loads(msg.data)
        if assignment["task"]["task_id"] not in held:
            held.append(assignment["task"]["task_id"])
        await nc.publish(msg.reply, json.dumps({"accepted": True, "worker_id": worker_id}).encode())

    await nc.subscribe(f"htm.worker.{worker_id}.task", cb=on_assignment)
    await nc.flush()
    started = time.time()
    stop = asyncio.create_task(stdin_line())
    say({"ready": True})
    while not stop.done():
        beat = heartbeat(worker_id, capacity, "liar-run", time.time() - started, len(held))
        await nc.publish(f"htm.heartbeat.{worker_id}", beat)
        await asyncio.wait([stop], timeout=0.1)
    return {"assignments": held}


async def steal(nc, worker_id: str, task_id: str, beats: int) -> dict:
    say({"ready": True})
    for _ in range(beats):
        await nc.publish(f"htm.heartbeat.{worker_id}", heartbeat(worker_id, 4, "impostor-run", 0.0))
        await nc.flush()
        await asyncio.sleep(0.05)
    forged = {"task_id": task_id, "worker_id": worker_id, "fence": 1, "outcome": "completed",
              "result": {"handled_by": "impostor", "forged": True}}
    reply = await nc.request("htm.task.result", json.dumps(forged).encode(), timeout=5)
    code = (reply.headers or {}).get("Nats-Service-Error-Code")
    return {"report_code": code, "report": reply.data.decode()}


async def many_ids(nc, prefix: str, count: int) -> dict:
    say({"ready": True})
    for i in range(count):
        worker_id = f"{prefix}-{i}"
        await nc.publish(f"htm.heartbeat.{worker_id}", heartbeat(worker_id, 1, f"run-{i}", 0.0))
    await nc.flush()
    return {"sent": count}


async def srv(nc, name: str) -> dict:
    answered = {"pings_answered": 0}
    info = {"type": "io.nats.micro.v1.ping_response", "name": name, "id": "IMPOSTOR",
            "version": "9.9.9", "metadata": {}}

    async def answer(msg) -> None:
        answered["pings_answered"] += 1
        await nc.publish(msg.reply, json.dumps(info).encode())

    for subject in ("$SRV.PING", f"$SRV.PING.{name}", f"$SRV.INFO.{name}"):
        await nc.subscribe(subject, cb=answer)
    await nc.flush()
    say({"ready": True})
    await stdin_line()
    return answered


async def main(url: str, mode: str, args: list) -> None:
    nc = await connect(url)
    if mode == "term":
        outcome = await term(nc)
    elif mode == "liar":
        outcome = await liar(nc, args[0], int(args[1]))
    elif mode == "steal":
        outcome = await steal(nc, args[0], args[1], int(args[2]))
    elif mode == "many-ids":
        outcome = await many_ids(nc, args[0], int(args[1]))
    elif mode == "srv":
        outcome = await srv(nc, args[0])
    else:
        raise SystemExit(f"unknown mode {mode}")
    try:
        await nc.flush(timeout=2)
    except Exception as err:  # the server may have closed us after violations
        errors.append(f"flush: {err}")
    outcome["errors"] = errors
    say(outcome)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
