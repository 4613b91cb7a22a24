"""A worker written with the Python SDK (clients/python, `bulwark_worker`).

Usage: python3 sdk_worker.py NATS_URL WORKER_ID
Handles `query_knowledge` (echoes the payload's `echo`), `execute_sandbox` (sleeps
`payload.sleep_s`, so it can be cancelled) and `deploy_model` (fails for good). Runs until its
stdin closes (the test drops it); prints one JSON line of its counts at the end.
"""
import asyncio
import json
import sys

from bulwark_worker import PermanentError, Worker


async def main(url: str, worker_id: str) -> None:
    worker = Worker(worker_id, capacity=4, heartbeat_interval_s=0.2)
    cancelled = []

    @worker.handler("query_knowledge")
    async def answer(task):
        return {"handled_by": worker_id, "echo": task.payload.get("echo"), "attempt": task.attempt}

    @worker.handler("execute_sandbox")
    async def long_job(task):
        try:
            await asyncio.sleep(task.payload.get("sleep_s", 300))
        except asyncio.CancelledError:
            cancelled.append(task.task_id)
            print(json.dumps({"cancelled": task.task_id}), flush=True)
            raise
        return {"slept": True}

    @worker.handler("deploy_model")
    async def refuse(task):
        raise PermanentError("models are not deployed from here")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin, lambda: stop.set() if not sys.stdin.read(1) else None)
    print(json.dumps({"ready": worker_id}), flush=True)
    await worker.serve(url, stop)
    print(json.dumps({"completed": worker.completed, "failed": worker.failed, "cancelled": cancelled}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
