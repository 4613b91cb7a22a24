"""A foreign client: submits an intent to bulwark with nats-py and reads its status.

Usage: python3 submit_intent.py NATS_URL
Prints one JSON line: {"decision": ..., "status": ..., "error": ..., "error_header": ...}.
Connects without credentials, so the server treats it as the least-privileged agent.
"""
import asyncio
import json
import sys

import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)
    intent = {
        "intent_id": "py-client-1",
        "intent_type": "query_knowledge",
        "actor": "python_agent",
        "payload": {"question": "what is layer 2?"},
        "priority": 5,
        "mission_context": {"learning_impact": True},
    }
    reply = await nc.request("htm.intent.submit", json.dumps(intent).encode(), timeout=10)
    decision = json.loads(reply.data)
    reply = await nc.request("htm.intent.status", json.dumps({"intent_id": "py-client-1"}).encode(), timeout=10)
    status = json.loads(reply.data)
    bad = await nc.request("htm.intent.submit", b'{"intent_type": "query_knowledge"}', timeout=10)
    error = json.loads(bad.data)
    header = (bad.headers or {}).get("Nats-Service-Error-Code")
    await nc.close()
    print(json.dumps({"decision": decision, "status": status, "error": error, "error_header": header}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
