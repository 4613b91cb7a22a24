"""A foreign client attacking operator actions: as the anonymous agent (nats-py), it submits
intents whose payload an action does not allow, and one it does.

Usage: python3 action_attack.py NATS_URL
Expects the actions of tests/actions.rs: `notify_webhook` (http, url .../hook/{channel}, params
channel and message) and `list_dir` (exec, ["/bin/ls", "{path}"], params path).
Prints one JSON line: for each attack {"code", "header", "message"}, and "allowed" (the decision
of an allowed intent).
"""
import asyncio
import json
import sys

import nats


ATTACKS = {
    # A key the action does not list: the agent tries to choose the URL itself.
    "unlisted_param": ("notify_webhook", {"channel": "ops", "message": "m", "url": "http://evil.example/"}),
    # A value that would move the request to another host.
    "host_change": ("notify_webhook", {"channel": "@evil.example", "message": "m"}),
    # A value that would climb out of the operator's path.
    "path_escape": ("notify_webhook", {"channel": "../admin", "message": "m"}),
    # A value that would become a command-line flag.
    "exec_flag": ("list_dir", {"path": "--hyperlink=always"}),
    # A value that is not one argument.
    "not_a_scalar": ("list_dir", {"path": ["/", "-R"]}),
}


async def submit(nc, intent_id, kind, payload):
    intent = {"intent_id": intent_id, "intent_type": kind, "actor": "python_agent",
              "payload": payload, "mission_context": {"resilience_impact": True}}
    reply = await nc.request("htm.intent.submit", json.dumps(intent).encode(), timeout=10)
    body = json.loads(reply.data)
    header = (reply.headers or {}).get("Nats-Service-Error-Code")
    return body, header


async def main(url: str) -> None:
    nc = await nats.connect(url)
    out = {}
    for name, (kind, payload) in ATTACKS.items():
        body, header = await submit(nc, f"attack-{name}", kind, payload)
        error = body.get("error", {})
        out[name] = {"code": error.get("code"), "header": header, "message": error.get("message")}
    body, _ = await submit(nc, "attack-allowed", "notify_webhook", {"channel": "ops", "message": "fine"})
    out["allowed"] = body
    await nc.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
