"""Clients without a token sending 64 MiB Generate requests in a loop, in a process of their own so that the
test's timing threads do not share an interpreter with them:

    python tests/flood.py TARGET CLIENTS SECONDS GZIP_CLIENTS

The first GZIP_CLIENTS clients compress their requests (zeros: a few KiB on the wire that inflate to 64 MiB).
Prints how many calls ended with each status code, as JSON."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

import grpc

PAYLOAD_BYTES = 64 << 20


def flood(target: str, seconds: float, compressed: bool, outcomes: Counter) -> None:
    payload = b"\0" * PAYLOAD_BYTES
    compression = grpc.Compression.Gzip if compressed else grpc.Compression.NoCompression
    end = time.monotonic() + seconds
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", PAYLOAD_BYTES + (1 << 20))]) as c:
        call = c.unary_stream("/tuneavideo.v1.VideoGeneration/Generate")
        while time.monotonic() < end:
            try:
                list(call(payload, timeout=30, compression=compression))
                outcomes["OK"] += 1
            except grpc.RpcError as e:
                outcomes[e.code().name] += 1


def main() -> None:
    target, clients, seconds, gzip_clients = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    outcomes: Counter = Counter()
    threads = [threading.Thread(target=flood, args=(target, seconds, i < gzip_clients, outcomes))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
