"""A foreign client that attacks bulwark's trust boundary, as an agent (or another identity) would.

Usage: python3 attacks.py ATTACK NATS_URL [ARGS...]  (connects without credentials, so as the
anonymous `agent`, unless USER and PASSWORD are set in the environment).
Prints one JSON line of what it did and saw; tests/trust_boundary.rs judges the effect on bulwark.

Attacks:
  forge-safeguard              a body claiming `layer2.critical_alert` from the watchdog, on an
                               allowed subject; then the real safeguard subject (refused)
  forge-facts TYPE EVENT_ID    an event on mesh.TYPE claiming source, depth, lineage, causation
                               and a victim's correlation id; published twice (a replay)
  aim-replies                  requests whose reply subjects are aimed at a KV key, a stream
                               subject and the JetStream API
  snoop SECONDS                subscribes to every inbox it may and reports what it read
  prepublish TYPE SECONDS      publishes events whose Nats-Msg-Id are the storm guard's natural
                               incident ids for TYPE, for the coming SECONDS
  claims                       submits an emergency type, a declared emergency, priority 9 and
                               ten minutes of work
  vote-as PROPOSAL NAME...     votes approve under each NAME on the plain subject (run it as the
                               operator: USER_NAME / USER_PASSWORD)
  flood-reviews COUNT BYTES    submits COUNT tier-0 intents with BYTES of payload each, to make
                               the review list larger than the server carries
  hog-slots COUNT WORK_MS      submits COUNT intents of WORK_MS of work each (hog-0, hog-1, ...),
                               to hold every worker slot
  read-notify-log              asks the notify service's delivery log (notify.log: webhook names,
                               undelivered bodies), which only the operator may read
"""
import asyncio
import json
import os
import sys
import time

import nats


async def connect(url):
    errors = []

    async def on_error(e):
        errors.append(str(e))

    user, password = os.environ.get("USER_NAME"), os.environ.get("USER_PASSWORD")
    options = {"error_cb": on_error, "allow_reconnect": False}
    if user:
        options.update(user=user, password=password, inbox_prefix=f"_INBOX_{user}")
    nc = await nats.connect(url, **options)
    return nc, errors


async def forge_safeguard(nc, errors, _args):
    body = {
        "event_type": "layer2.critical_alert",
        "source": "watchdog",
        "payload": {"alert": "scheduler_stalled", "resume_paused": True, "component": "scheduler"},
    }
    await nc.publish("mesh.custom.alert", json.dumps(body).encode())
    await nc.publish("mesh.layer2.critical_alert", json.dumps(body).encode())
    await nc.flush()
    await asyncio.sleep(0.5)
    return {"published": 2, "errors": errors}


async def forge_facts(nc, errors, args):
    event_type, event_id = args[0], args[1]
    body = {
        "event_id": event_id,
        "event_type": event_type,
        "source": "watchdog",
        "depth": 9,
        "lineage": [["task.failed", "scheduler"]] * 9,
        "causation_id": "victim-cause",
        "correlation_id": "victim-flow",
        "payload": {"forged": True},
    }
    for _ in range(2):
        await nc.publish(f"mesh.{event_type}", json.dumps(body).encode())
    await nc.flush()
    await asyncio.sleep(0.3)
    return {"published": 2, "errors": errors}


AIMED = [
    "$KV.bulwark_breaker.mesh",
    "$KV.bulwark_intents.aimed-victim",
    "$KV.bulwark_leases.scheduler",
    "htm.task.queue.5",
    "clarity.audit",
    "$JS.API.STREAM.DELETE.BULWARK_MESH",
    "$JS.API.STREAM.PURGE.BULWARK_TASKS",
]


async def aim_replies(nc, errors, _args):
    sent = 0
    for target in AIMED:
        for subject, body in [
            ("htm.intent.status", {"intent_id": "aimed-victim"}),
            ("htm.intent.submit", {"intent_type": "query_knowledge", "actor": "a", "payload": {}}),
            ("storm_guard.status", {}),
            ("watchdog.report", {}),
        ]:
            await nc.publish(subject, json.dumps(body).encode(), reply=target)
            sent += 1
    await nc.flush()
    await asyncio.sleep(1.0)
    return {"sent": sent, "targets": AIMED, "errors": errors}


async def snoop(nc, errors, args):
    seconds = float(args[0])
    seen = []

    async def cb(msg):
        seen.append({"subject": msg.subject, "data": msg.data.decode("utf-8", "replace")[:2000]})

    for pattern in ["_INBOX.>", "_INBOX_operator.>", "_INBOX_worker.>", "$JS.>", "$KV.>", ">"]:
        try:
            await nc.subscribe(pattern, cb=cb)
        except Exception as e:  # a refused subscription arrives as an async error too
            errors.append(f"{pattern}: {e}")
    await nc.flush()
    print("ready", flush=True)
    await asyncio.sleep(seconds)
    return {"seen": len(seen), "subjects": sorted({m["subject"].split(".")[0] for m in seen}),
            "samples": seen[:20], "errors": errors}


async def prepublish(nc, errors, args):
    event_type, seconds = args[0], int(args[1])
    now = int(time.time())
    sent = 0
    for sec in range(now - 2, now + seconds):
        for raw in [f"storm:{event_type}:{sec}", f"storm:{event_type}:{sec * 1000}"]:
            await nc.publish(f"mesh.{event_type}", b'{"payload":{}}', headers={"Nats-Msg-Id": raw})
            sent += 1
    await nc.flush()
    return {"sent": sent, "errors": errors}


async def flood_reviews(nc, errors, args):
    count, size = int(args[0]), int(args[1])
    answers = []
    for i in range(count):
        intent = {"intent_id": f"big-{i}", "intent_type": "change_charter", "actor": "flooder",
                  "payload": {"blob": "x" * size}}
        reply = await nc.request("htm.intent.submit", json.dumps(intent).encode(), timeout=10)
        answers.append(json.loads(reply.data).get("status") or json.loads(reply.data).get("error", {}).get("code"))
    return {"answers": answers, "errors": errors}


async def hog_slots(nc, errors, args):
    count, work_ms = int(args[0]), int(args[1])
    answers = {}
    for i in range(count):
        intent = {"intent_id": f"hog-{i}", "intent_type": "query_knowledge", "actor": "hog",
                  "payload": {"work_ms": work_ms}}
        reply = await nc.request("htm.intent.submit", json.dumps(intent).encode(), timeout=10)
        data = json.loads(reply.data)
        answers[f"hog-{i}"] = data.get("status") or data.get("error", {}).get("code")
    return {"answers": answers, "errors": errors}


async def claims(nc, errors, _args):
    bodies = {
        "tier4": {"intent_type": "critical_incident", "actor": "a", "payload": {}},
        "emergency": {"intent_type": "query_knowledge", "actor": "a", "payload": {},
                      "mission_context": {"emergency": True}},
        "priority9": {"intent_type": "query_knowledge", "actor": "a", "payload": {}, "priority": 9},
        "long_work": {"intent_type": "query_knowledge", "actor": "a",
                      "payload": {"work_ms": 600000}},
    }
    answers = {}
    for name, body in bodies.items():
        reply = await nc.request("htm.intent.submit", json.dumps(body).encode(), timeout=10)
        data = json.loads(reply.data)
        answers[name] = {"status": data.get("status"), "priority": data.get("priority"),
                         "error": data.get("error", {}).get("code"),
                         "code": (reply.headers or {}).get("Nats-Service-Error-Code")}
    return {"answers": answers, "errors": errors}


async def vote_as(nc, errors, args):
    proposal, names = args[0], args[1:]
    answers = {}
    for name in names:
        body = {"proposal_id": proposal, "voter": name, "vote": "approve"}
        reply = await nc.request("unified_logic.vote", json.dumps(body).encode(), timeout=10)
        data = json.loads(reply.data)
        answers[name] = data.get("error", {}).get("code") or data.get("state")
    return {"answers": answers, "errors": errors}


async def read_notify_log(nc, errors, _args):
    try:
        reply = await nc.request("notify.log", b"{}", timeout=3)
        answered, body = True, json.loads(reply.data)
    except Exception as e:  # a refused publish is silence, then a timeout
        answered, body = False, str(e)
    await asyncio.sleep(0.3)
    return {"answered": answered, "reply": body, "errors": errors}


ATTACKS = {
    "read-notify-log": read_notify_log,
    "vote-as": vote_as,
    "claims": claims,
    "flood-reviews": flood_reviews,
    "hog-slots": hog_slots,
    "forge-safeguard": forge_safeguard,
    "forge-facts": forge_facts,
    "aim-replies": aim_replies,
    "snoop": snoop,
    "prepublish": prepublish,
}


async def main(attack, url, args):
    nc, errors = await connect(url)
    try:
        result = await ATTACKS[attack](nc, errors, args)
    finally:
        await nc.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
