"""A foreign client that tries to exhaust bulwark's storage, as the anonymous agent would.

Usage: python3 storage_attacks.py ATTACK NATS_URL [ARGS...]  (no credentials: the `agent`).
Prints one JSON line of what it did and saw; tests/storage.rs judges the effect on bulwark.

Attacks:
  big-event TYPE BYTES          one event of BYTES on mesh.TYPE, as a request (JetStream's answer
                                to the stored-or-refused message comes back) and then published
  flood-events TYPE COUNT BYTES COUNT events of BYTES each on mesh.TYPE, then one `last` event
  submit COUNT PREFIX           COUNT query_knowledge intents PREFIX-0.. (tier 0, queued at once)
"""
import asyncio
import json
import sys

import nats


def event(event_type, size, marker):
    return json.dumps({"event_type": event_type, "payload": {"marker": marker, "blob": "x" * size}}).encode()


async def big_event(nc, errors, args):
    event_type, size = args[0], int(args[1])
    reply = None
    try:
        answer = await nc.request(f"mesh.{event_type}", event(event_type, size, "big"), timeout=5)
        reply = answer.data.decode(errors="replace")
    except Exception as e:  # a refusal may also come back as no answer at all
        reply = f"no answer: {type(e).__name__}"
    await nc.publish(f"mesh.{event_type}", event(event_type, size, "big"))
    await nc.publish(f"mesh.{event_type}", event(event_type, 16, "after"))
    await nc.flush()
    return {"reply": reply, "errors": errors}


async def flood_events(nc, errors, args):
    event_type, count, size = args[0], int(args[1]), int(args[2])
    for i in range(count):
        await nc.publish(f"mesh.{event_type}", event(event_type, size, f"n{i}"))
    await nc.publish(f"mesh.{event_type}", event(event_type, 16, "last"))
    await nc.flush()
    return {"published": count + 1, "errors": errors}


async def submit(nc, errors, args):
    count, prefix = int(args[0]), args[1]
    answers = []
    for i in range(count):
        intent = {"intent_id": f"{prefix}-{i}", "intent_type": "query_knowledge", "actor": "agent",
                  "payload": {}}
        reply = await nc.request("htm.intent.submit", json.dumps(intent).encode(), timeout=10)
        answers.append(json.loads(reply.data))
    return {"answers": answers, "errors": errors}


ATTACKS = {"big-event": big_event, "flood-events": flood_events, "submit": submit}


async def main(attack, url, args):
    errors = []

    async def on_error(e):
        errors.append(str(e))

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False)
    try:
        result = await ATTACKS[attack](nc, errors, args)
    finally:
        await nc.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
