"""A foreign client holding the SERVICE credentials (it can use JetStream) that tampers with the
audit chain, as a leaked password or a compromised service would.

Usage: python3 audit_attack.py ATTACK NATS_URL [ARGS...]  (connects as USER_NAME/USER_PASSWORD)
Prints one JSON line of what it did and saw; tests/audit_signing.rs judges the effect.

Attacks:
  delete SEQ     deletes audit record SEQ, then purges the whole audit stream
  rewrite SEQ    reads the chain, deletes the audit stream, recreates it (same subjects and
                 retention) and republishes every record with record SEQ's narrative edited and
                 every SHA-256 from SEQ on recomputed (the signatures copied as they were); then
                 writes the new head into the bulwark_audit_head bucket
  shorten SECS   sets the audit stream's max_age (and duplicate window) to SECS, so the server
                 removes the records as if they had expired
"""
import asyncio
import hashlib
import json
import os
import sys

import nats
from nats.js.api import StreamConfig

STREAM = "BULWARK_AUDIT"
SUBJECT = "clarity.audit"


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(record):
    covered = {k: v for k, v in record.items() if k not in ("hash", "sig")}
    return hashlib.sha256(canonical(covered).encode()).hexdigest()


async def delete(js, args):
    seq = int(args[0])
    out = {}
    try:
        out["deleted"] = await js.delete_msg(STREAM, seq)
    except Exception as e:  # the server's refusal is what the test looks for
        out["delete_error"] = str(e)
    try:
        await js.purge_stream(STREAM)
        out["purged"] = True
    except Exception as e:
        out["purge_error"] = str(e)
    info = await js.stream_info(STREAM)
    out["messages"] = info.state.messages
    return out


async def rewrite(js, args):
    victim = int(args[0])
    info = await js.stream_info(STREAM)
    records = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(STREAM, seq)
        records.append(json.loads(msg.data))
    await js.delete_stream(STREAM)
    await js.add_stream(
        StreamConfig(name=STREAM, subjects=[SUBJECT], duplicate_window=info.config.duplicate_window)
    )
    prev = None
    for record in records:
        if record["seq"] == victim:
            record["narrative"]["what"] = "nothing_happened"
        if prev is not None and record["seq"] > victim:
            record["prev_hash"] = prev["hash"]
        if record["seq"] >= victim:
            record["hash"] = record_hash(record)
        await js.publish(SUBJECT, json.dumps(record).encode())
        prev = record
    kv = await js.key_value("bulwark_audit_head")
    head = {"seq": prev["seq"], "hash": prev["hash"], "stored_at": prev["stored_at"]}
    await kv.put("head", json.dumps(head).encode())
    return {"rewritten": len(records), "head": head}


async def shorten(js, args):
    seconds = float(args[0])
    info = await js.stream_info(STREAM)
    config = info.config
    config.max_age = seconds
    config.duplicate_window = seconds
    await js.update_stream(config)
    return {"max_age": seconds}


async def main():
    attack, url, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    user, password = os.environ.get("USER_NAME"), os.environ.get("USER_PASSWORD")
    nc = await nats.connect(url, user=user, password=password, allow_reconnect=False)
    js = nc.jetstream()
    try:
        out = await {"delete": delete, "rewrite": rewrite, "shorten": shorten}[attack](js, args)
    finally:
        await nc.close()
    print(json.dumps(out))


asyncio.run(main())
