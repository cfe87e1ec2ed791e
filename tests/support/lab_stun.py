#!/usr/bin/env python3
"""A STUN responder (RFC 5389 binding, RFC 3489 CHANGE-REQUEST) for the NAT lab of
tests/portmap.rs, run inside the lab's public namespace on two addresses and two ports.

miniupnpd refuses to map ports while its external address is a reserved one (the lab uses
the documentation ranges, which it counts as reserved) unless a STUN check shows the router
is not itself behind a restrictive NAT; this answers that check truthfully: the mapped
address is the requester's source address as seen here, and a CHANGE-REQUEST is answered
from the other address and/or port, as a full STUN server does.

Usage: lab_stun.py IP1 IP2 (ports 3478 and 3479 on each). Prints "ready" once bound; exits
after 10 minutes without a request, or when its stdin closes (the test ended).
"""
import select
import socket
import struct
import sys

COOKIE = 0x2112A442
ips = sys.argv[1:3]
ports = [3478, 3479]
socks = {}
for ip in ips:
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, port))
        socks[(ip, port)] = s
print("ready", flush=True)
while True:
    ready, _, _ = select.select(list(socks.values()) + [sys.stdin], [], [], 600)
    if not ready or sys.stdin in ready:
        break
    for s in ready:
        data, peer = s.recvfrom(2048)
        if len(data) < 20:
            continue
        kind, length, cookie = struct.unpack("!HHI", data[:8])
        if kind != 0x0001 or 20 + length > len(data):
            continue
        txid = data[8:20]
        change = 0
        i = 20
        while i + 4 <= 20 + length:
            attr, alen = struct.unpack("!HH", data[i:i + 4])
            if attr == 0x0003 and alen == 4 and i + 8 <= len(data):
                change = struct.unpack("!I", data[i + 4:i + 8])[0]
            i += 4 + (alen + 3) // 4 * 4
        ip, port = s.getsockname()
        if change & 4:
            ip = ips[1 - ips.index(ip)]
        if change & 2:
            port = ports[1 - ports.index(port)]
        addr = socket.inet_aton(peer[0])
        xport = peer[1] ^ (COOKIE >> 16)
        xaddr = struct.unpack("!I", addr)[0] ^ COOKIE
        attrs = struct.pack("!HHBBHI", 0x0020, 8, 0, 1, xport, xaddr)
        attrs += struct.pack("!HHBBH4s", 0x0001, 8, 0, 1, peer[1], addr)
        socks[(ip, port)].sendto(struct.pack("!HHI", 0x0101, len(attrs), cookie) + txid + attrs, peer)
