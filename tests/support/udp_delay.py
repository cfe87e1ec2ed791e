#!/usr/bin/env python3
"""A UDP forwarder that delays every datagram, for the NAT lab of tests/relay_dht.rs (the
lab's kernel may lack the netem qdisc): datagrams to LISTEN are sent on to TARGET, and the
answers back, each DELAY_MS milliseconds after it arrived. Each client address gets its own
upstream socket (the target sees one source per client, as behind a NAT); at most 64.

Usage: udp_delay.py LISTEN_IP:PORT TARGET_IP:PORT DELAY_MS. Prints {"event":"ready"} once
bound; exits when its stdin closes (the test ended) or after 10 minutes without traffic.
"""
import heapq
import json
import select
import socket
import sys
import time


def addr(text):
    host, port = text.rsplit(":", 1)
    return (host, int(port))


listen, target, delay = addr(sys.argv[1]), addr(sys.argv[2]), int(sys.argv[3]) / 1000.0
front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
front.bind(listen)
upstream = {}  # client address -> socket towards the target
client_of = {}  # upstream socket -> client address
due = []  # (time, sequence, socket, bytes, destination)
seq = 0
print(json.dumps({"event": "ready"}), flush=True)
idle_until = time.monotonic() + 600
while time.monotonic() < idle_until:
    now = time.monotonic()
    timeout = max(0.0, due[0][0] - now) if due else 1.0
    ready, _, _ = select.select([front, sys.stdin] + list(client_of), [], [], timeout)
    for s in ready:
        if s is sys.stdin:
            if not sys.stdin.readline():
                sys.exit(0)
            continue
        data, src = s.recvfrom(65536)
        idle_until = time.monotonic() + 600
        if s is front:
            up = upstream.get(src)
            if up is None:
                if len(upstream) >= 64:
                    continue
                up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.bind((listen[0], 0))
                upstream[src] = up
                client_of[up] = src
            seq += 1
            heapq.heappush(due, (time.monotonic() + delay, seq, up, data, target))
        elif src == target:
            seq += 1
            heapq.heappush(due, (time.monotonic() + delay, seq, front, data, client_of[s]))
    now = time.monotonic()
    while due and due[0][0] <= now:
        _, _, s, data, dst = heapq.heappop(due)
        try:
            s.sendto(data, dst)
        except OSError:
            pass
