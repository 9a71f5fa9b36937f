"""Print every frame of one fixture, once and in order, across reconnects (trio).

python clients/python/examples/consumer.py ws://127.0.0.1:8765/v1/stream tracking/FIXTURE [N]
"""

import sys

import trio
from dde_gateway_client import Client, Frame, Loss


async def main(url: str, topic: str, count: int) -> None:
    feed, fixture = topic.split("/", 1)
    async with Client(url) as client:
        async for event in client.subscribe(feed, fixture, backfill=0):
            if isinstance(event, Frame):
                print(event.seq, event.text, flush=True)
                count -= 1
                if count == 0:
                    break
            elif isinstance(event, Loss):
                print("LOST", event.from_seq, event.to_seq, event.reason, flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else -1)
