"""A hostile (or buggy) holder of the service credentials, in Python (nats-py).

Usage:
  python3 hostile_service.py NATS_URL junk-breaker BEFORE DURING
      Publishes BEFORE mesh events (mesh.test.flow), writes junk into the breaker's KV entry
      ($KV.bulwark_breaker.mesh) through JetStream, then publishes DURING more events.
      Prints one JSON line: {"event_ids": [...], "junk_seq": <stream sequence of the junk>}.
  python3 hostile_service.py NATS_URL publish SUBJECT BODY_JSON
      Publishes BODY_JSON on SUBJECT through JetStream (stored in BULWARK_MESH) and prints
      {"seq": <stream sequence>}.

Connects as `bulwark`/`bulwark-dev`: after the move to accounts only services can reach
bulwark's KV and service-produced subjects, so that is what an attacker would need.
"""
import asyncio
import json
import sys
import time
import uuid

import nats


def event(n: int) -> bytes:
    event_id = str(uuid.uuid4())
    body = {
        "event_id": event_id, "event_type": "test.flow", "source": "hostile_py",
        "correlation_id": event_id, "depth": 0,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "payload": {"n": n},
    }
    return event_id, json.dumps(body).encode()


async def publish_events(js, first: int, count: int) -> list:
    ids = []
    for n in range(first, first + count):
        event_id, body = event(n)
        await js.publish("mesh.test.flow", body)
        ids.append(event_id)
    return ids


async def main(url: str, command: str, args: list) -> None:
    nc = await nats.connect(url, user="bulwark", password="bulwark-dev")
    js = nc.jetstream(timeout=10)
    if command == "junk-breaker":
        before, during = int(args[0]), int(args[1])
        ids = await publish_events(js, 0, before)
        ack = await js.publish("$KV.bulwark_breaker.mesh", b"junk")
        ids += await publish_events(js, before, during)
        print(json.dumps({"event_ids": ids, "junk_seq": ack.seq}))
    elif command == "publish":
        subject, body = args[0], args[1]
        ack = await js.publish(subject, body.encode())
        print(json.dumps({"seq": ack.seq}))
    else:
        raise SystemExit(f"unknown command {command}")
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
