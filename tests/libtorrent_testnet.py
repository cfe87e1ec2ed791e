#!/usr/bin/python3
"""A Mainline DHT testnet of libtorrent-rasterbar 2.0 sessions on 127.0.0.1, for
tests/mainline_libtorrent.rs and the bench (Debian's python3-libtorrent; run it with
/usr/bin/python3, the interpreter the package is built for).

Every session listens on 127.0.0.1 only, has no DHT bootstrap routers (libtorrent's default
list names public hosts), UPnP, NAT-PMP and local service discovery off, and the checks that
would refuse many nodes on one loopback address off (see ../shared/docs/test-peers.md). The
sessions are linked to each other with add_dht_node.

Usage: libtorrent_testnet.py [NODES] [ipv6|IPV4] (default 10 nodes on 127.0.0.1; with `ipv6`,
on ::1: the IPv6 DHT of BEP 32; with an IPv4 address, on that address: the NAT lab's public
side, inside a network namespace of a test). It exits when stdin closes, on
{"cmd":"quit"}, or after MM_LT_LIFETIME_S seconds (default 300).

stdout, one JSON object per line:
  {"lt":"ready","version":"2.0.x","nodes":["127.0.0.1:P",...]}
  {"lt":"got","id":ID,"found":true,"seq":N,"value":"<hex of v>","signature":"<hex>",
   "authoritative":B}
    or {"lt":"got","id":ID,"found":false}
  {"lt":"peers","id":ID,"peers":["IP:PORT",...]} (what a get_peers lookup collected)
  {"lt":"announced","id":ID,"peer":"127.0.0.1:PORT"}
  {"lt":"error","id":ID,"error":"..."}
  {"lt":"missing","error":"..."} (libtorrent cannot be imported; exit status 3)
stdin, one JSON command per line:
  {"cmd":"get","id":ID,"key":"<64 hex digits: ed25519 public key>","timeout":S}
    one of the sessions looks the BEP 44 mutable item up with dht_get_mutable_item (no salt).
    libtorrent checks each item's signature against the key before taking it; the answer is
    the item of the highest seq it accepted, reported when its lookup completes.
  {"cmd":"get_peers","id":ID,"info_hash":"<40 hex digits>","timeout":S}
    one of the sessions runs dht_get_peers (BEP 5); the peers of every reply it got until
    the timeout are reported.
  {"cmd":"announce","id":ID,"info_hash":"<40 hex digits>"}
    one of the sessions adds a torrent of that info-hash (no metadata, so nothing is ever
    written), which it announces in the DHT with its listen port as any client does
    (get_peers for tokens, then announce_peer). The binding's dht_announce cannot be called
    (its flags argument has no Python conversion).
  {"cmd":"quit"}
MM_LT_DEBUG=1 writes libtorrent's BEP 44 alerts to stderr.
"""

import json
import os
import select
import sys
import tempfile
import time


def out(v):
    sys.stdout.write(json.dumps(v) + "\n")
    sys.stdout.flush()


try:
    import libtorrent as lt
except Exception as e:  # noqa: BLE001 (any import failure means: not installed here)
    out({"lt": "missing", "error": "%s: %s" % (type(e).__name__, e)})
    sys.exit(3)

# A command's bytes are hostile too: bound what is read.
MAX_LINE = 4096

SETTINGS = {
    "listen_interfaces": "127.0.0.1:0",
    "outgoing_interfaces": "lo",
    "dht_bootstrap_nodes": "",
    "enable_dht": True,
    "enable_upnp": False,
    "enable_natpmp": False,
    "enable_lsd": False,
    "enable_incoming_utp": False,
    "enable_outgoing_utp": False,
    "dht_restrict_routing_ips": False,
    "dht_restrict_search_ips": False,
    "dht_enforce_node_id": False,
    "dht_prefer_verified_node_ids": False,
    "dht_ignore_dark_internet": False,
    # dht_operation_notification: the replies of a dht_get_peers (dht_get_peers_reply_alert).
    "alert_mask": int(lt.alert.category_t.dht_notification)
    | int(lt.alert.category_t.dht_operation_notification)
    | int(lt.alert.category_t.error_notification)
    | int(lt.alert.category_t.status_notification),
}


def port_of(s, limit=10.0):
    end = time.time() + limit
    while time.time() < end:
        p = s.listen_port()
        if p and s.is_dht_running():
            return p
        time.sleep(0.02)
    raise RuntimeError("a session did not start listening")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    n = max(2, min(n, 64))
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    ipv6 = mode == "ipv6"
    host = "::1" if ipv6 else "127.0.0.1"
    if ipv6:
        SETTINGS["listen_interfaces"] = "[::1]:0"
    elif mode:
        # One address of a lab namespace (the test made it; nothing routes off the machine).
        host = mode
        SETTINGS["listen_interfaces"] = "%s:0" % host
        del SETTINGS["outgoing_interfaces"]
    lifetime = float(os.environ.get("MM_LT_LIFETIME_S", "300"))
    deadline = time.time() + lifetime
    debug = os.environ.get("MM_LT_DEBUG") == "1"
    sessions = [lt.session(SETTINGS) for _ in range(n)]
    ports = [port_of(s) for s in sessions]
    for i, s in enumerate(sessions):
        for j, p in enumerate(ports):
            if i != j:
                s.add_dht_node((host, p))
    fmt = "[::1]:%d" if ipv6 else host + ":%d"
    out({
        "lt": "ready",
        "version": lt.__version__,
        "nodes": [fmt % p for p in ports],
    })

    pending = {}  # (session index, key bytes) -> [ids, best item or None, end time]
    peer_lookups = {}  # (session index, info-hash bytes) -> [id, set of peers, end time]
    turn = 0
    buf = b""
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    while time.time() < deadline:
        r, _, _ = select.select([stdin], [], [], 0.05)
        if r:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                return
            buf += chunk
            if len(buf) > 16 * MAX_LINE and b"\n" not in buf:
                buf = b""
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if len(line) > MAX_LINE:
                    out({"lt": "error", "error": "line too long"})
                    continue
                try:
                    cmd = json.loads(line)
                except ValueError:
                    out({"lt": "error", "error": "not JSON"})
                    continue
                if not isinstance(cmd, dict):
                    out({"lt": "error", "error": "not an object"})
                    continue
                c = cmd.get("cmd")
                if c == "quit":
                    return
                if c in ("get_peers", "announce"):
                    try:
                        ih = bytes.fromhex(cmd.get("info_hash", ""))
                    except (TypeError, ValueError):
                        ih = b""
                    if len(ih) != 20:
                        out({"lt": "error", "id": cmd.get("id"), "error": "info_hash"})
                        continue
                    idx = turn % n
                    turn += 1
                    if c == "announce":
                        atp = lt.add_torrent_params()
                        atp.info_hashes = lt.info_hash_t(lt.sha1_hash(ih))
                        atp.save_path = tempfile.gettempdir()
                        atp.name = "mm-platform-test"
                        sessions[idx].add_torrent(atp)
                        out({"lt": "announced", "id": cmd.get("id"),
                             "peer": fmt % ports[idx]})
                    else:
                        timeout = min(float(cmd.get("timeout", 10)), 120.0)
                        peer_lookups[(idx, ih)] = [cmd.get("id"), set(), time.time() + timeout]
                        sessions[idx].dht_get_peers(lt.sha1_hash(ih))
                    continue
                if c != "get":
                    out({"lt": "error", "id": cmd.get("id"), "error": "unknown command"})
                    continue
                try:
                    key = bytes.fromhex(cmd.get("key", ""))
                except (TypeError, ValueError):
                    key = b""
                if len(key) != 32:
                    out({"lt": "error", "id": cmd.get("id"), "error": "key: 64 hex digits"})
                    continue
                timeout = min(float(cmd.get("timeout", 20)), 120.0)
                # Round robin over the sessions, so that every get starts somewhere else.
                idx = turn % n
                turn += 1
                slot = pending.get((idx, key))
                if slot is None:
                    pending[(idx, key)] = [[cmd.get("id")], None, time.time() + timeout]
                    sessions[idx].dht_get_mutable_item(key, b"")
                else:
                    slot[0].append(cmd.get("id"))

        for idx, s in enumerate(sessions):
            for a in s.pop_alerts():
                if isinstance(a, lt.dht_get_peers_reply_alert):
                    slot = peer_lookups.get((idx, bytes(a.info_hash.to_bytes())))
                    if slot is not None:
                        for ip, port in a.peers():
                            slot[1].add(("[%s]:%d" if ":" in ip else "%s:%d") % (ip, port))
                    continue
                if not isinstance(a, lt.dht_mutable_item_alert):
                    continue
                if debug:
                    sys.stderr.write("libtorrent_testnet: %s\n" % a.message()[:200])
                slot = pending.get((idx, bytes(a.key)))
                if slot is None:
                    continue
                # The binding gives the item as a dict (key, value, signature, seq, salt,
                # authoritative); an empty lookup gives an undefined entry that does not
                # convert.
                try:
                    item = a.item
                except RuntimeError:
                    item = None
                v = item.get("value") if isinstance(item, dict) else None
                if isinstance(v, (bytes, bytearray)) and len(v) > 0 and a.seq >= 0:
                    if slot[1] is None or a.seq >= slot[1]["seq"]:
                        slot[1] = {"seq": a.seq, "value": bytes(v).hex(),
                                   "signature": bytes(item.get("signature", b"")).hex(),
                                   "authoritative": bool(a.authoritative)}
                if a.authoritative:
                    slot[2] = 0
        now = time.time()
        for k in [k for k, slot in peer_lookups.items() if slot[2] <= now]:
            i, peers, _ = peer_lookups.pop(k)
            out({"lt": "peers", "id": i, "peers": sorted(peers)})
        for k in [k for k, slot in pending.items() if slot[2] <= now]:
            ids, item, _ = pending.pop(k)
            for i in ids:
                if item is None:
                    out({"lt": "got", "id": i, "found": False})
                else:
                    out(dict({"lt": "got", "id": i, "found": True}, **item))


if __name__ == "__main__":
    main()
