"""A foreign client that floods the trigger mesh, as a misbehaving agent (or another identity) would.

Usage: python3 mesh_flood.py NATS_URL COUNT SUBJECTS SECONDS [TYPE_PREFIX]
Publishes COUNT events spread round-robin over SUBJECTS event types (`mesh.<TYPE_PREFIX>.s<k>`,
prefix `flood` by default) at an even pace over SECONDS. Connects without credentials, so as the
anonymous `agent`, unless USER_NAME and USER_PASSWORD are set in the environment.
Prints one JSON line: {"published", "subjects", "seconds", "errors"}; tests/budgets.rs judges
what bulwark made of it.
"""
import asyncio
import json
import os
import sys
import time

import nats


async def main(url, count, subjects, seconds, prefix):
    errors = []

    async def on_error(e):
        errors.append(str(e))

    user, password = os.environ.get("USER_NAME"), os.environ.get("USER_PASSWORD")
    options = {"error_cb": on_error, "allow_reconnect": False}
    if user:
        options.update(user=user, password=password, inbox_prefix=f"_INBOX_{user}")
    nc = await nats.connect(url, **options)
    start = time.monotonic()
    for i in range(count):
        event_type = f"{prefix}.s{i % subjects}"
        body = {"event_type": event_type, "payload": {"n": i}}
        await nc.publish(f"mesh.{event_type}", json.dumps(body).encode())
        # An even pace: event i goes out at i/count of the way through.
        due = start + seconds * (i + 1) / count
        delay = due - time.monotonic()
        if delay > 0:
            await nc.flush()
            await asyncio.sleep(delay)
    await nc.flush()
    took = time.monotonic() - start
    await nc.close()
    print(json.dumps({"published": count, "subjects": subjects, "seconds": took, "errors": errors}))


if __name__ == "__main__":
    if len(sys.argv) < 5:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    url, count, subjects, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    prefix = sys.argv[5] if len(sys.argv) > 5 else "flood"
    asyncio.run(main(url, count, subjects, seconds, prefix))
