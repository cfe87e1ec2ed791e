#!/usr/bin/env node
'use strict'
/*
 * peer.js: a test peer that behaves on the wire like a genuine mm-platform 0.7.5 node.
 *
 * mm-platform 0.7.5 (GitHub MicroMinion/mm-platform, package.json version 0.7.5; that version was
 * never on the npm registry reachable here) is small glue around four npm libraries. This file
 * re-implements the glue, in its own words, and loads the libraries themselves from npm:
 *
 *   1tp 0.21.0          net.Server({handshake: true}) / net.Socket({parallelConnectionSetup: true})
 *                       with the UDP and TCP transports: session layer, PING/PONG, netstrings.
 *   curvecp 1.2.1       SimpleMessageStream (reliable stream over CurveCP messages) and Message.
 *                       NOT its PacketStream: mm-platform has its own CurveCP packet code
 *                       (src/curvecp-client.js, curvecp-server.js, curvecp-server-stream.js,
 *                       curvecp-util.js), mirrored below by CurveClient / CurveServer / ServerConn.
 *   protobufjs 5.0.1    Message{topic=1, protocol=2, payload=3}, all three `required string`
 *                       (payload is a *string*, not bytes: see "bt" below).
 *   tweetnacl, ed2curve ed25519 identity and its curve25519 box key pair (src/identity.js).
 *   kad-fs 0.0.4        storage with --data DIR (what the MicroMinion apps passed as `storage`);
 *   kad-memstore-thomas 0.2.1 otherwise (the platform's default).
 *
 * Mirrored original files: src/index.js (send queue, connect, receive netstring parser, protobuf),
 * src/transport.js (TransportManager), src/curvecp-*.js, src/directory.js, src/identity.js,
 * src/api.js + src/offline-buffer.js (the `ms` and `bt` APIs; every send is real-time there).
 * Not mirrored: circles (friends/devices stay empty, so every remote message has scope "public"),
 * the local bus beyond what the events below expose, the offline buffer's storage path (the
 * original forces realtime=true, so it is never used).
 *
 * Deviations, all needed to stay on 127.0.0.1 or to run on Node 20, nothing else:
 *  - 1tp is given an explicit transport list [UDP, TCP] (the original let 1tp pick its defaults,
 *    which are the same two unless TURN_ and ONETP_REGISTRAR environment variables are set) and
 *    listening info with address 127.0.0.1 (the original, without stored info, listens on 0.0.0.0
 *    and advertises every non-loopback interface address). --no-udp / --no-tcp drop one of them.
 *  - kad-fs `put` is always given a callback: the original calls storage.put('myConnectionInfo',
 *    ...) without one, which makes fs.writeFile throw on Node >= 10.
 *  - an uncaught exception prints {"event":"fatal"} before exiting 1 (the original just died).
 *
 * stdin, one JSON object a line (lines that arrive before "ready" are held until then):
 *   {"cmd":"nodeInfo","nodeInfo":{...}}       as a `transports.nodeInfo` message on the local bus
 *                                              -> {"event":"ok","cmd":"nodeInfo"}
 *   {"cmd":"send","id":N,"to":BOXID,"topic":T,"protocol":"ms","payload":ANY}
 *   {"cmd":"send","id":N,"to":BOXID,"topic":T,"protocol":"bt","payload":STRING}
 *   {"cmd":"send","id":N,"to":BOXID,"topic":T,"protocol":"bt","payloadBase64":B64}
 *                                              -> {"event":"sent","id":N} once the peer acknowledged
 *                                                 all bytes, or {"event":"error","id":N,"error":E}
 *   {"cmd":"sendFrame","id":N,"to":BOXID,"frameBase64":B64}   one raw frame, wrapped in a netstring
 *                                              and queued like a message -> sent / error as above
 *   {"cmd":"flood","id":N,"to":BOXID,"count":C,"size":S,"topic":T}  C `ms` sends of
 *                                              {"n":i,"pad":"x"*S}, i = 0..C-1, all at once
 *                                              -> {"event":"flooded","id":N,"ms":M,"ok":K,"failed":F}
 *   {"cmd":"stats"} -> {"event":"stats","received":N,"bytes":B,"firstMs":T0,"lastMs":T1}
 *   {"cmd":"quit"}  -> exit 0 (also when stdin closes)
 *   with --kademlia (see "Kademlia" below):
 *   {"cmd":"kadLookup","key":BOXID}            `self.transports.requestNodeInfo` on the local bus
 *                                              -> {"event":"kadLookup","key":K,"found":[nodeInfo...]}
 *                                                 (what the service answered synchronously)
 *   {"cmd":"local","topic":T,"payload":ANY}    any local bus message (`self.` + T), e.g.
 *                                              directory.get / directory.put
 *   {"cmd":"kadContacts"}                      -> {"event":"kadContacts","contacts":[nodeInfo...],
 *                                                 "drops":N}  N: messages kad's transport dropped
 * stdout events:
 *   {"event":"ready","nodeInfo":{"connectionInfo":[...],"boxId":...,"signId":...,"expireTime":...}}
 *   {"event":"message","sender":BOXID,"topic":T,"protocol":"ms","scope":"public","payload":JSON}
 *   {"event":"message","sender":BOXID,"topic":T,"protocol":"bt","scope":"public","payload":STRING,
 *    "payloadBase64":B64 (one byte a char, absent if a char is above U+00FF),"utf8Base64":B64}
 *   {"event":"platformMessage",...same fields, "payload":STRING}  a valid frame of another protocol:
 *                                              the platform emits it, no built-in API takes it
 *   {"event":"dropped","sender":BOXID,"error":E}  the original logs 'invalid message received - dropped'
 *   {"event":"requestNodeInfo","key":BOXID}   the platform published transports.requestNodeInfo
 *   {"event":"connection","peer":BOXID,"direction":"inbound"|"outbound","transport":"udp"|"tcp"}
 *                                              a CurveCP stream was added
 *   {"event":"online","peer":BOXID} / {"event":"offline","peer":BOXID}  transports.online/offline
 *                                              (online only when it changes: the original repeats it)
 *   {"event":"fatal","error":E}
 *   {"event":"local","topic":T,"payload":ANY}  a service sent a local message the platform does not
 *                                              consume itself (e.g. directory.getReply)
 *   {"event":"peer","nodeInfo":{...}}         a service sent transports.nodeInfo (with --kademlia)
 *   {"event":"guarded","destination":D}       the guard below skipped a send
 * --quiet: no message/sent/online/connection events, only the counters (stats) and the rest.
 * Flags: --secret B64 (64-byte ed25519 secret key), --data DIR, --udp-port P, --tcp-port P,
 *        --no-udp, --no-tcp, --quiet, --kademlia SEEDS (a JSON array of nodeInfos, "[]" for none).
 *        Diagnostics on stderr: MM_PEER_LOG=debug|info|warn|error.
 *
 * Kademlia (--kademlia SEEDS): the genuine mm-services-kademlia 0.6.5 (on kad 1.6.5) from the npm
 * registry runs on this peer, given what the original platform gave it: `messaging` (on/send over
 * a local bus: remote `ms` messages arrive as `public.<topic>` with the sender's boxId, local
 * sends of transports.nodeInfo feed the directory, requestMyNodeInfo is answered with our
 * nodeInfo, the directory's lookups are published as self.transports.requestNodeInfo),
 * `identity.sign`, `isReady()`, and kad's in-memory store as `storage`. SEEDS is always passed,
 * so the package's public bootstrap hosts are never contacted.
 * Guard (js-compat.md): the original sometimes wraps a contact twice and then throws
 * "invalid destination" when it sends to it, killing the process; this peer skips such a send
 * (an event "guarded" says so) instead of dying.
 *
 * Findings (tested by selftest.js against this code path, which is the original's):
 *  - A Message with an extra field 4 (bytes, e.g. a 16-byte id) is delivered normally:
 *    protobufjs 5 skips unknown fields, before or after the known ones. The process survives.
 *  - A frame protocol "mm", topic "identify", payload a signId is decoded and emitted as a
 *    platform 'message' (scope public); neither the `ms` nor the `bt` API takes protocol "mm",
 *    so no application subscriber sees it. No crash. (Here: a "platformMessage" event.)
 *  - Replies: a node needs the destination's nodeInfo even to answer a peer that is connected to
 *    it (directory lookup first: requestNodeInfo, then after 10 s every queued send fails with
 *    'Connection could not be established. Message sending failed.'). With the nodeInfo it sends
 *    over ANY live stream for that key, inbound included (the newest one); it opens no new one.
 *  - Transport choice: 1tp dials every endpoint of the nodeInfo it has a transport for, in
 *    parallel (UDP SYN and TCP connect at once), keeps the first that completes and aborts the
 *    others; on loopback TCP wins. --no-udp / --no-tcp leave that transport out on both ends.
 *  - "sent" comes from curvecp 1.2.1's write callback, which fires once the acknowledged range
 *    covers [bytes cut into blocks at write time, + length): for writes queued behind others that
 *    start is too small, so in a burst the callbacks fire as soon as the first block is
 *    acknowledged, long before delivery (flooded.ms is not a delivery time).
 *  - TCP (1tp's netstring reader) loses frames that share a read or are split over two reads.
 *    At a warmed-up rate with traffic both ways this sometimes (not every run) ends in "maximum
 *    retransmissions reached": the stream is dropped, its unsent bytes are lost although reported sent, and the
 *    peer's receive buffer (one per peer key, shared by all its streams) can be left mid-frame,
 *    after which that peer's frames are never parsed again. UDP did not show this.
 *  - "bt": the original's payload is a protobuf string. Its API asserts the payload is a JS string
 *    and protobufjs writes it as UTF-8; received bytes are decoded as UTF-8 with invalid sequences
 *    replaced by U+FFFD. Arbitrary bytes therefore do not cross byte for byte. This peer maps
 *    payloadBase64 to a one-char-per-byte string, so JS<->JS is lossless, but on the wire each byte
 *    >= 0x80 becomes two bytes (C2/C3 xx).
 */

const EventEmitter = require('events').EventEmitter
const readline = require('readline')
const assert = require('assert')
const nacl = require('tweetnacl')
const ed2curve = require('ed2curve')
const onetp = require('1tp')
const curvecp = require('curvecp')
const ProtoBuf = require('protobufjs')

// ---------------------------------------------------------------- command line, output, logging

const argv = process.argv.slice(2)
const flag = (name) => argv.includes(name)
const option = (name) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : undefined }
const QUIET = flag('--quiet')
const USE_UDP = !flag('--no-udp')
const USE_TCP = !flag('--no-tcp')

const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')
const noisy = (event) => { if (!QUIET) emit(event) }

process.on('uncaughtException', (err) => {
  emit({ event: 'fatal', error: String((err && err.stack) || err) })
  process.exit(1)
})
process.on('unhandledRejection', (err) => {
  emit({ event: 'fatal', error: 'unhandled rejection: ' + String((err && err.stack) || err) })
  process.exit(1)
})

const LEVELS = { debug: 0, verbose: 0, info: 1, warn: 2, error: 3 }
const LOG_AT = LEVELS[process.env.MM_PEER_LOG || 'warn']
// A winston-like logger (log(level, msg, meta)); 1tp and curvecp wrap it with winston-meta-wrapper.
const logger = {
  log: function (level, msg, meta) {
    if ((LEVELS[level] === undefined ? 1 : LEVELS[level]) < LOG_AT) return
    let text = typeof msg === 'string' ? msg : (msg && msg.message) || String(msg)
    if (meta && meta.module) text = '[' + meta.module + '] ' + text
    process.stderr.write(level + ': ' + text + '\n')
  }
}
for (const level of Object.keys(LEVELS)) logger[level] = (msg, meta) => logger.log(level, msg, meta)

// Node 20 shim: netstring-stream 0.1.2 (1tp's TCP framing) calls buf.toString(null, start, end).
// Node before 8 read a null encoding as utf8; Node 20 throws ERR_UNKNOWN_ENCODING, which kills the
// process on the first TCP packet. Restore the old reading, nothing more.
const bufferToString = Buffer.prototype.toString
Buffer.prototype.toString = function (encoding, start, end) {
  if (encoding === null) return bufferToString.call(this, 'utf8', start, end)
  return bufferToString.apply(this, arguments)
}

const b64 = (bytes) => Buffer.from(bytes).toString('base64')
const unb64 = (text) => new Uint8Array(Buffer.from(text, 'base64'))
const validKey = (key) => typeof key === 'string' && Buffer.from(key, 'base64').length === 32
const same = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0

// ---------------------------------------------------------------- CurveCP packets (mm-platform's own)

const HELLO = Buffer.from('QvnQ5XlH')
const COOKIE = Buffer.from('RL3aNMXK')
const INITIATE = Buffer.from('QvnQ5XlI')
const SERVER_MSG = Buffer.from('RL3aNMXM')
const CLIENT_MSG = Buffer.from('QvnQ5XlM')
const EXTENSION = Buffer.alloc(16) // both sides use 16 zero bytes
const SERVER_NAME = Buffer.alloc(256) // the original's default: 256 zero bytes
const HELLO_WAIT_NS = [1e9, 1.5e9, 2.25e9, 3.375e9, 5.0625e9, 7.59375e9, 11.390625e9, 17.0859375e9]
const INITIATE_WAIT = 10 * 1000
const COOKIE_KEY_LIFETIME = 2 * 60 * 1000

// nonce = 16- or 8-byte ASCII prefix followed by the rest
const nonceOf = (prefix, rest) => Buffer.concat([Buffer.from(prefix), Buffer.from(rest)])
// counter nonces: 16-byte prefix + 8-byte little-endian counter
const counterNonce = (prefix, counter) => {
  const tail = Buffer.alloc(8)
  tail.writeBigUInt64LE(BigInt(counter))
  return nonceOf(prefix, tail)
}
// "short nonce || box", the layout of every encrypted part; null when it does not open
const sealed = (tail, box) => Buffer.concat([Buffer.from(tail), Buffer.from(box)])
const openBox = (bytes, prefix, theirPk, mySk) => {
  const n = 24 - prefix.length
  if (bytes.length < n + 16) return null
  return nacl.box.open(new Uint8Array(bytes.subarray(n)), new Uint8Array(nonceOf(prefix, bytes.subarray(0, n))), theirPk, mySk)
}
const openShared = (bytes, prefix, key) => {
  const n = 24 - prefix.length
  if (bytes.length < n + 16) return null
  return nacl.box.open.after(new Uint8Array(bytes.subarray(n)), new Uint8Array(nonceOf(prefix, bytes.subarray(0, n))), key)
}
// the original waits wait + (random below wait) nanoseconds between Hellos
const jitter = (ns) => (ns + Math.floor(Math.random() * ns)) / 1e6
// The original checks nonces with message.subarray(offset, 8), an empty slice for every offset it
// uses, which reads as 0: the check always passes. Reproduced by not checking.

// Client side of one connection (src/curvecp-client.js). Events: connect, data, error, close.
class CurveClient extends EventEmitter {
  constructor (identity) {
    super()
    this.long = identity.box
    this.short = nacl.box.keyPair()
    this.counter = 0
    this.heardBack = false
    this.cookie = null
  }

  get remoteAddress () { return b64(this.serverLongPk) }

  connect (destination, connectionInfo) {
    this.serverLongPk = unb64(destination)
    if (connectionInfo.length === 0) {
      this.emit('error', new Error('No connectionInfo specified'))
      return
    }
    const socket = new onetp.net.Socket(makeTransports(), { parallelConnectionSetup: true })
    socket.setLogger(logger)
    socket.once('error', (err) => {
      logger.debug(String(err))
      this.emit('error', new Error('Connection failed'))
    })
    socket.once('connect', () => this.sendHello(socket, 0))
    socket.once('data', (data) => { // only the very first packet; later ones are wired in onCookie
      if (!this.heardBack) {
        this.heardBack = true
        this.onPacket(data, socket)
      }
    })
    socket.connect(connectionInfo)
  }

  nextNonce (prefix) { this.counter += 1; return counterNonce(prefix, this.counter) }

  header (magic) { return Buffer.concat([magic, EXTENSION /* server's */, EXTENSION /* client's */]) }

  sendHello (socket, attempt) {
    const nonce = this.nextNonce('CurveCP-client-H')
    const box = nacl.box(new Uint8Array(64), new Uint8Array(nonce), this.serverLongPk, this.short.secretKey)
    socket.write(Buffer.concat([this.header(HELLO), Buffer.from(this.short.publicKey), Buffer.alloc(64), sealed(nonce.subarray(16), box)]))
    if (attempt >= HELLO_WAIT_NS.length) {
      socket.emit('error', new Error('No response received'))
      return
    }
    setTimeout(() => { if (!this.heardBack) this.sendHello(socket, attempt + 1) }, jitter(HELLO_WAIT_NS[attempt]))
  }

  onPacket (packet, socket) { // socket: given with the first packet only, the one the cookie came on
    if (packet.length < 64 || packet.length > 1152) return
    const magic = packet.subarray(0, 8)
    if (same(magic, SERVER_MSG) && this.cookie) {
      if (this.initiateTimer) { // never reset: 'connect' fires on every server message
        clearTimeout(this.initiateTimer)
        this.emit('connect')
      }
      this.onServerMessage(packet)
    } else if (same(magic, COOKIE) && !this.cookie) {
      this.onCookie(packet, socket)
    } else {
      logger.warn('invalid packet received')
    }
  }

  extensionsOk (packet) { return same(packet.subarray(8, 24), EXTENSION) && same(packet.subarray(24, 40), EXTENSION) }

  onCookie (packet, socket) {
    if (packet.length !== 200 || !this.extensionsOk(packet)) return
    const inside = openBox(packet.subarray(40), 'CurveCPK', this.serverLongPk, this.short.secretKey)
    if (!inside) return
    this.serverShortPk = inside.subarray(0, 32)
    this.sharedKey = nacl.box.before(this.serverShortPk, this.short.secretKey)
    this.cookie = inside.subarray(32)
    this.socket = socket
    this.socket.on('data', (data) => this.onPacket(data))
    this.socket.on('error', (err) => this.emit('error', err))
    this.sendInitiate(new curvecp.Message().toBuffer()) // 64 zero bytes
  }

  sendInitiate (message) {
    const vouchNonce = nonceOf('CurveCPV', nacl.randomBytes(16))
    const vouch = sealed(vouchNonce.subarray(8), nacl.box(this.short.publicKey, new Uint8Array(vouchNonce), this.serverLongPk, this.long.secretKey))
    const inner = Buffer.concat([Buffer.from(this.long.publicKey), vouch, SERVER_NAME, message])
    const nonce = this.nextNonce('CurveCP-client-I')
    const box = nacl.box.after(new Uint8Array(inner), new Uint8Array(nonce), this.sharedKey)
    const packet = Buffer.concat([this.header(INITIATE), Buffer.from(this.short.publicKey), Buffer.from(this.cookie), sealed(nonce.subarray(16), box)])
    this.socket.write(packet, (err) => {
      if (err) return this.emit('error', new Error('CurveCP handshake failed - can not send INITIATE'))
      this.initiateTimer = setTimeout(() => this.emit('error', new Error('CurveCP handshake failed - no reply to INITIATE')), INITIATE_WAIT)
    })
  }

  write (chunk, done) {
    const nonce = this.nextNonce('CurveCP-client-M')
    const box = nacl.box.after(new Uint8Array(chunk), new Uint8Array(nonce), this.sharedKey)
    this.socket.write(Buffer.concat([this.header(CLIENT_MSG), Buffer.from(this.short.publicKey), sealed(nonce.subarray(16), box)]), done)
  }

  onServerMessage (packet) {
    if (!this.extensionsOk(packet)) return
    const data = openShared(packet.subarray(40), 'CurveCP-server-M', this.sharedKey)
    if (data) this.emit('data', Buffer.from(data))
  }

  destroy () {
    if (this.socket) {
      this.socket.destroy()
      setImmediate(() => this.emit('close'))
    }
  }
}
// Server side of one accepted connection (src/curvecp-server-stream.js). Replies go out on the
// 1tp socket the client's latest packet came in on. Events: data, close.
class ServerConn extends EventEmitter {
  constructor (fields) {
    super()
    Object.assign(this, fields)
    this.counter = 0
  }

  get remoteAddress () { return b64(this.clientLongPk) }

  process (packet, socket) {
    this.socket = socket
    if (!same(packet.subarray(8, 24), EXTENSION) || !same(packet.subarray(24, 40), this.clientExtension)) return
    if (!same(packet.subarray(40, 72), this.clientShortPk)) return
    const data = openShared(packet.subarray(72), 'CurveCP-client-M', this.sharedKey)
    if (data) this.emit('data', Buffer.from(data))
  }

  write (chunk, done) {
    this.counter += 1
    const nonce = counterNonce('CurveCP-server-M', this.counter)
    const box = nacl.box.after(new Uint8Array(chunk), new Uint8Array(nonce), this.sharedKey)
    this.socket.write(Buffer.concat([SERVER_MSG, this.clientExtension, EXTENSION, sealed(nonce.subarray(16), box)]), done)
  }

  destroy () { setImmediate(() => this.emit('close')) } // leaves the 1tp socket alone
}

// One server for all accepted 1tp sockets (src/curvecp-server.js). Event: connection.
class CurveServer extends EventEmitter {
  constructor (identity) {
    super()
    this.long = identity.box
    this.conns = {} // by base64 client short-term key
    this.cookieKey = nacl.randomBytes(32)
    setInterval(() => { this.cookieKey = nacl.randomBytes(32) }, COOKIE_KEY_LIFETIME)
  }

  process (packet, socket) {
    if (packet.length < 96 || packet.length > 1184) return
    const magic = packet.subarray(0, 8)
    if (same(magic, HELLO)) this.onHello(packet, socket)
    else if (same(magic, INITIATE)) this.onInitiate(packet, socket)
    else if (same(magic, CLIENT_MSG)) {
      const conn = this.conns[b64(packet.subarray(40, 72))]
      if (conn) conn.process(packet, socket)
    } else logger.warn('invalid packet received')
  }

  onHello (packet, socket) {
    if (packet.length !== 224 || !same(packet.subarray(8, 24), EXTENSION)) return
    const clientExtension = Buffer.from(packet.subarray(24, 40))
    const clientShortPk = new Uint8Array(packet.subarray(40, 72))
    const zeros = openBox(packet.subarray(136), 'CurveCP-client-H', clientShortPk, this.long.secretKey)
    if (!zeros || !same(zeros, Buffer.alloc(64))) return
    // Cookie: our fresh short-term key + (client short-term key, our short-term secret) under the minute key
    const short = nacl.box.keyPair()
    const cookieNonce = nonceOf('minute-k', nacl.randomBytes(16))
    const cookie = sealed(cookieNonce.subarray(8), nacl.secretbox(new Uint8Array(Buffer.concat([clientShortPk, short.secretKey])), new Uint8Array(cookieNonce), this.cookieKey))
    const nonce = nonceOf('CurveCPK', nacl.randomBytes(16))
    const box = nacl.box(new Uint8Array(Buffer.concat([short.publicKey, cookie])), new Uint8Array(nonce), clientShortPk, this.long.secretKey)
    socket.write(Buffer.concat([COOKIE, clientExtension, EXTENSION, sealed(nonce.subarray(8), box)]))
  }

  onInitiate (packet, socket) {
    if (packet.length < 544 || !same(packet.subarray(8, 24), EXTENSION)) return
    const clientShortPk = Buffer.from(packet.subarray(40, 72))
    const cookie = packet.subarray(72, 168)
    const cookieData = nacl.secretbox.open(new Uint8Array(cookie.subarray(16)), new Uint8Array(nonceOf('minute-k', cookie.subarray(0, 16))), this.cookieKey)
    if (!cookieData) return // only the current minute key is tried
    const sharedKey = nacl.box.before(cookieData.subarray(0, 32), cookieData.subarray(32)) // client short pk, our short sk
    const inner = openShared(packet.subarray(168), 'CurveCP-client-I', sharedKey)
    if (!inner) return
    const clientLongPk = inner.subarray(0, 32)
    const vouched = openBox(Buffer.from(inner.subarray(32, 96)), 'CurveCPV', clientLongPk, this.long.secretKey)
    if (!vouched || !same(vouched, clientShortPk) || !same(vouched, cookieData.subarray(0, 32))) return
    if (!same(inner.subarray(96, 352), SERVER_NAME)) return
    // no check for a repeated Initiate: each valid one makes a new connection, as in the original
    const conn = new ServerConn({
      clientExtension: Buffer.from(packet.subarray(24, 40)),
      clientShortPk,
      clientLongPk: new Uint8Array(clientLongPk),
      sharedKey,
      socket
    })
    const key = b64(clientShortPk)
    conn.on('close', () => { delete this.conns[key] })
    this.conns[key] = conn
    this.emit('connection', conn)
    const message = Buffer.from(inner.subarray(352))
    setImmediate(() => conn.emit('data', message))
  }
}

// ---------------------------------------------------------------- transport manager (src/transport.js)

const MAX_ONGOING_CONNECTIONS = 2

function makeTransports () {
  const list = []
  if (USE_UDP) list.push(new onetp.transports.udp())
  if (USE_TCP) list.push(new onetp.transports.tcp())
  return list
}

class Transports extends EventEmitter {
  constructor (identity) {
    super()
    this.identity = identity
    this.streams = [] // SimpleMessageStreams, newest last
    this.inProgress = {}
    this.waiting = {}
    this.server = new onetp.net.Server(makeTransports(), { handshake: true })
    this.server.setLogger(logger)
    this.server.on('close', () => logger.warn('transport closed'))
    this.server.on('connection', (socket) => {
      socket.setLogger(logger)
      socket.on('data', (data) => this.curveServer.process(data, socket)) // no 'error' listener, as the original
    })
    this.server.on('error', (err) => logger.error('error in transport: ' + err))
    this.server.on('listening', () => this.emit('listening'))
    this.curveServer = new CurveServer(identity)
    this.curveServer.on('connection', (conn) => this.add(conn, true))
  }

  listen (info) { this.server.listen(info) }
  address () { return this.server.address() }

  add (conn, inbound) {
    const peer = conn.remoteAddress
    const stream = new curvecp.SimpleMessageStream({ logger, stream: conn })
    this.streams.push(stream)
    const via = conn.socket && conn.socket.remoteAddress // 1tp's peer connection info
    noisy({ event: 'connection', peer, direction: inbound ? 'inbound' : 'outbound', transport: via && via.transportType })
    stream.on('error', (err) => { logger.warn(err.message); stream.destroy() })
    stream.on('close', () => {
      stream.removeAllListeners()
      stream.on('error', (err) => logger.warn(err.message))
      this.streams.splice(this.streams.indexOf(stream), 1)
      if (!this.has(peer)) this.emit('disconnected', peer)
    })
    stream.on('drain', () => this.emit('connected', peer))
    stream.on('data', (data) => this.emit('data', peer, data))
    if (inbound) { // the accepting side speaks first: one all-zero 64-byte message
      conn.write(new curvecp.Message().toBuffer(), (err) => {
        if (err) stream.emit('error', err)
        else this.emit('connected', peer)
      })
    } else {
      this.emit('connected', peer)
    }
  }

  get (peer) { // any stream with that key, inbound or outbound; the newest wins
    for (let i = this.streams.length - 1; i >= 0; i--) if (this.streams[i].remoteAddress === peer) return this.streams[i]
  }

  has (peer) { return this.get(peer) !== undefined }

  send (bytes, peer, callback) {
    assert(this.has(peer))
    return this.get(peer).write(bytes, callback)
  }

  connect (peer, connectionInfo) {
    if (this.has(peer)) {
      setImmediate(() => { this.emit('connected', peer); this.nextWaiting() })
      return
    }
    if (peer in this.inProgress) return
    if (Object.keys(this.inProgress).length > MAX_ONGOING_CONNECTIONS) {
      this.waiting[peer] = connectionInfo
      return
    }
    const client = new CurveClient(this.identity)
    this.inProgress[peer] = client
    const failed = (err) => {
      logger.warn(String(err && err.message))
      this.doneTrying(peer)
      if (!this.has(peer)) this.emit('disconnected', peer)
      client.destroy()
    }
    client.once('error', failed)
    client.once('connect', () => {
      this.add(client, false)
      client.removeListener('error', failed)
      this.doneTrying(peer)
    })
    client.connect(peer, connectionInfo)
  }

  doneTrying (peer) {
    delete this.inProgress[peer]
    this.nextWaiting()
  }

  nextWaiting () {
    const peers = Object.keys(this.waiting)
    if (peers.length === 0) return
    const peer = peers[Math.floor(Math.random() * peers.length)]
    const info = this.waiting[peer]
    delete this.waiting[peer]
    this.connect(peer, info)
  }
}

// ---------------------------------------------------------------- directory (src/directory.js)

const LOOKUP_TIMEOUT = 10 * 1000
const CACHE_REFRESH_INTERVAL = 5 * 60 * 1000

class Directory {
  constructor (onRefresh) {
    this.pending = {}
    this.cache = {}
    setInterval(() => {
      onRefresh()
      this.cache = {} // the original's expiry test is true for every entry
    }, CACHE_REFRESH_INTERVAL)
  }

  get (boxId, callback) {
    assert(validKey(boxId))
    if (boxId in this.cache) {
      const result = this.cache[boxId]
      setTimeout(() => callback(null, result), 0)
      return
    }
    if (boxId in this.pending) {
      this.pending[boxId].push(callback)
      return
    }
    this.pending[boxId] = [callback]
    process.nextTick(() => { // a local bus message
      emit({ event: 'requestNodeInfo', key: boxId })
      bus.deliver('self.transports.requestNodeInfo', 'local', boxId)
    })
    setTimeout(() => {
      const waiting = this.pending[boxId]
      if (!waiting) return
      delete this.pending[boxId]
      for (const cb of waiting) cb(new Error('key lookup timeout'), null)
    }, LOOKUP_TIMEOUT)
  }

  nodeInfo (info) { // transports.nodeInfo
    assert(info !== null && typeof info === 'object' && !Array.isArray(info))
    const waiting = this.pending[info.boxId]
    delete this.pending[info.boxId]
    for (const cb of waiting || []) cb(null, info)
    this.cache[info.boxId] = info
  }
}

// ---------------------------------------------------------------- platform (src/index.js, api.js)

const MessageType = (() => {
  const builder = ProtoBuf.newBuilder()
  builder.create({
    name: 'Message',
    fields: [
      { rule: 'required', type: 'string', name: 'topic', id: 1 },
      { rule: 'required', type: 'string', name: 'protocol', id: 2 },
      { rule: 'required', type: 'string', name: 'payload', id: 3 }
    ]
  })
  return builder.build('Message')
})()

const netstring = (bytes) => Buffer.concat([Buffer.from(bytes.length + ':'), bytes, Buffer.from(',')])
const CONNECT_RANDOMIZATION = 100
const MAX_CONNECTION_ATTEMPTS = 5
const SEND_FAILED = 'Connection could not be established. Message sending failed.'

class Platform {
  constructor (storage) {
    this.storage = storage
    this.queues = {}
    this.received = {} // per peer key, shared by all its connections
    this.attempts = {}
    this.online = {}
    this.stats = { received: 0, bytes: 0, firstMs: null, lastMs: null }
    this.directory = new Directory(() => { if (this.nodeInfo) this.publishMyNodeInfo() })
  }

  start () {
    this.loadIdentity(() => {
      this.listeningInfo((info) => {
        this.transports = new Transports(this.identity)
        this.transports.on('connected', (peer) => this.onConnected(peer))
        this.transports.on('disconnected', (peer) => this.onDisconnected(peer))
        this.transports.on('data', (peer, data) => this.onData(peer, Buffer.from(data)))
        this.transports.on('listening', () => {
          const connectionInfo = this.transports.address()
          this.storage.put('myConnectionInfo', JSON.stringify(connectionInfo), () => {})
          this.connectionInfo = connectionInfo
          this.publishMyNodeInfo()
          emit({ event: 'ready', nodeInfo: this.nodeInfo })
          if (option('--kademlia') !== undefined) startKademlia(JSON.parse(option('--kademlia')))
          const waiting = early || []
          early = null
          waiting.forEach(handle)
        })
        this.transports.listen(info)
      })
    })
  }

  loadIdentity (done) {
    const given = option('--secret')
    this.storage.get('identity', (err, stored) => {
      let secret = given || (!err && stored) || null
      const save = !secret || (given && given !== stored)
      if (!secret) secret = b64(nacl.sign.keyPair().secretKey)
      assert(Buffer.from(secret, 'base64').length === 64, 'invalid secret key')
      const sign = nacl.sign.keyPair.fromSecretKey(unb64(secret))
      this.identity = { sign, box: ed2curve.convertKeyPair(sign) }
      this.signId = b64(sign.publicKey)
      this.boxId = b64(this.identity.box.publicKey)
      if (save) this.storage.put('identity', secret, (e) => { if (e) logger.warn('unable to save identity') })
      done()
    })
  }

  // explicit ports first (options.connectionInfo in the original), then the stored info, else port 0;
  // always 127.0.0.1 (see the deviations at the top)
  listeningInfo (done) {
    const explicit = option('--udp-port') !== undefined || option('--tcp-port') !== undefined
    const fresh = [
      { transportType: 'udp', transportInfo: { address: '127.0.0.1', port: Number(option('--udp-port') || 0) } },
      { transportType: 'tcp', transportInfo: { address: '127.0.0.1', port: Number(option('--tcp-port') || 0) } }
    ]
    if (explicit) return done(fresh)
    this.storage.get('myConnectionInfo', (err, stored) => {
      if (!err && stored) {
        const parsed = JSON.parse(stored)
        if (parsed.every((c) => c.transportInfo && c.transportInfo.address === '127.0.0.1')) return done(parsed)
      }
      done(fresh)
    })
  }

  publishMyNodeInfo () {
    this.nodeInfo = {
      connectionInfo: this.connectionInfo,
      boxId: this.boxId,
      signId: this.signId,
      expireTime: Date.now() + CACHE_REFRESH_INTERVAL * 2
    }
  }

  // --- sending

  // api.js + offline-buffer.js: check like the API does, then platform.send
  apiSend (protocol, topic, destination, payload, callback) {
    assert(typeof topic === 'string' && topic.length > 0)
    assert(destination === 'local' || validKey(destination), 'invalid destination')
    const text = protocol === 'ms' ? JSON.stringify(payload) : payload
    assert(typeof text === 'string')
    if (destination === 'local' || destination === this.signId) {
      process.nextTick(() => {
        noisy({ event: 'message', sender: 'local', topic, protocol, scope: 'self', payload })
        callback()
      })
      return
    }
    this.send({ topic, protocol, destination, payload: text }, callback)
  }

  send (item, callback) { // item: {destination, topic, protocol, payload} or {destination, frame}
    const queue = this.queues[item.destination] || (this.queues[item.destination] = [])
    queue.push({ item, callback })
    setTimeout(() => this.connect(item.destination), Math.floor(Math.random() * (CONNECT_RANDOMIZATION + 1)))
  }

  connect (destination) {
    this.directory.get(destination, (err, info) => {
      if (err) return this.failQueue(destination)
      assert(validKey(info.signId) && validKey(info.boxId) && 'connectionInfo' in info)
      assert(destination === info.boxId)
      this.transports.connect(info.boxId, info.connectionInfo)
    })
  }

  flush (destination) {
    const queue = this.queues[destination] || []
    let more = true
    while (more && queue.length > 0 && this.transports.has(destination)) {
      const { item, callback } = queue.shift()
      const frame = item.frame || Buffer.from(new MessageType({ topic: item.topic, protocol: item.protocol, payload: item.payload }).toBuffer())
      more = this.transports.send(netstring(frame), destination, callback)
    }
  }

  failQueue (destination) {
    const queue = this.queues[destination] || []
    while (queue.length > 0) queue.shift().callback(new Error(SEND_FAILED))
  }

  onConnected (peer) {
    if (!this.online[peer]) noisy({ event: 'online', peer })
    this.online[peer] = true
    this.attempts[peer] = 0
    this.flush(peer)
  }

  onDisconnected (peer) {
    // undefined + 1 is NaN, never above the limit: a peer that never connected is retried forever
    this.attempts[peer] = this.attempts[peer] + 1
    if (this.attempts[peer] > MAX_CONNECTION_ATTEMPTS) this.failQueue(peer)
    else this.connect(peer)
    this.online[peer] = false
    emit({ event: 'offline', peer })
  }

  // --- receiving

  onData (peer, data) {
    const before = this.received[peer]
    this.received[peer] = before ? Buffer.concat([before, data]) : data
    // The original's netstring reader: length = everything before the first ':' (parseInt, so a
    // garbage length stalls this peer's buffer for good), the byte after the payload is not checked,
    // and after each frame the scan resumes at index 1 of the rest.
    let buf = this.received[peer]
    const frames = []
    for (let i = 0; i < buf.length; i++) {
      if (buf[i] !== 0x3a) continue
      const length = Number.parseInt(buf.toString('utf-8', 0, i))
      const start = i + 1
      if (buf.length >= start + length + 1) {
        frames.push(buf.slice(start, start + length))
        buf = buf.slice(start + length + 1)
        i = 0
      } else {
        i = buf.length
      }
    }
    this.received[peer] = buf
    for (const frame of frames) this.onFrame(peer, frame)
  }

  onFrame (sender, frame) {
    try {
      const decoded = MessageType.decode(frame)
      const m = { topic: decoded.topic, protocol: decoded.protocol, payload: decoded.payload, sender, scope: 'public' }
      assert(typeof m.topic === 'string' && typeof m.protocol === 'string' && typeof m.payload === 'string')
      if (m.protocol === 'ms') {
        const payload = JSON.parse(m.payload) // throws inside the original's try as well
        this.count(m.payload)
        if (m.topic !== 'kademlia') noisy({ event: 'message', sender, topic: m.topic, protocol: 'ms', scope: m.scope, payload })
        bus.deliver(m.scope + '.' + m.topic, sender, payload)
      } else if (m.protocol === 'bt') {
        this.count(m.payload)
        const event = { event: 'message', sender, topic: m.topic, protocol: 'bt', scope: m.scope, payload: m.payload }
        if (!/[^\u0000-\u00ff]/.test(m.payload)) event.payloadBase64 = Buffer.from(m.payload, 'latin1').toString('base64')
        event.utf8Base64 = Buffer.from(m.payload, 'utf8').toString('base64')
        noisy(event)
      } else {
        emit({ event: 'platformMessage', sender, topic: m.topic, protocol: m.protocol, scope: m.scope, payload: m.payload })
      }
    } catch (err) {
      logger.warn('invalid message received - dropped: ' + err.message)
      emit({ event: 'dropped', sender, error: String(err.message) })
    }
  }

  count (payload) {
    const now = Date.now()
    this.stats.received += 1
    this.stats.bytes += Buffer.byteLength(payload)
    if (this.stats.firstMs === null) this.stats.firstMs = now
    this.stats.lastMs = now
  }
}

// ---------------------------------------------------------------- local bus, messaging (--kademlia)

// The original's messaging.on(topic, handler(topic, sender, payload)) with exact scoped topics
// (all a service here subscribes to), and deliveries on the next tick as the original's bus.
const bus = {
  handlers: {},
  on (topic, handler) { (this.handlers[topic] = this.handlers[topic] || []).push(handler) },
  deliver (topic, sender, payload) {
    for (const h of this.handlers[topic] || []) h(topic, sender, payload)
  }
}

let capture = null // nodeInfos a service publishes during a synchronous call (kadLookup)

const messaging = {
  on: (topic, handler) => bus.on(topic, handler),
  send (topic, destination, payload, options) {
    if (destination === 'local') {
      switch (topic) {
        case 'transports.nodeInfo':
          if (capture) capture.push(payload)
          if (payload && typeof payload === 'object' && validKey(payload.boxId)) {
            platform.directory.nodeInfo(payload)
            noisy({ event: 'peer', nodeInfo: payload })
          }
          return
        case 'transports.requestMyNodeInfo':
          process.nextTick(() => bus.deliver('self.transports.myNodeInfo', 'local', platform.nodeInfo))
          return
        case 'transports.requestBootstrapNodeInfo':
          return
        default:
          emit({ event: 'local', topic, payload })
          process.nextTick(() => bus.deliver('self.' + topic, 'local', payload))
          return
      }
    }
    if (!validKey(destination)) {
      emit({ event: 'guarded', destination: JSON.stringify(destination === undefined ? null : destination) })
      return
    }
    platform.apiSend('ms', topic, destination, payload, () => {})
  }
}

let kademlia = null

function startKademlia (seeds) {
  const KademliaService = require('mm-services-kademlia')
  const MemStore = require('kad').storage.MemStore
  const facade = new EventEmitter()
  facade.messaging = messaging
  facade.identity = { sign: platform.identity.sign }
  facade.isReady = () => true
  kademlia = new KademliaService({ platform: facade, storage: new MemStore(), seeds, logger })
  // The service builds its kad node once it has our nodeInfo (next tick); count the messages its
  // transport drops (failed signature or nonce checks, unknown methods, late responses).
  const watch = () => {
    if (!kademlia.dht) return setTimeout(watch, 10)
    kademlia.dht._rpc.on('MESSAGE_DROP', () => { kadDrops += 1 })
  }
  watch()
}

let kadDrops = 0

// ---------------------------------------------------------------- stdin commands

function openStorage () {
  const dir = option('--data')
  if (dir) {
    const kadfs = require('kad-fs')
    require('fs').mkdirSync(dir, { recursive: true })
    return kadfs(dir)
  }
  const MemStore = require('kad-memstore-thomas')
  return new MemStore()
}

const platform = new Platform(openStorage())

function handle (cmd) {
  const id = cmd.id
  const report = (err) => {
    if (err) emit({ event: 'error', id, error: String(err.message || err) })
    else noisy({ event: 'sent', id })
  }
  const guarded = (fn) => {
    try { fn() } catch (err) { emit({ event: 'error', id, error: 'throws: ' + String(err.message || err) }) }
  }
  switch (cmd.cmd) {
    case 'nodeInfo':
      platform.directory.nodeInfo(cmd.nodeInfo)
      emit({ event: 'ok', cmd: 'nodeInfo' })
      break
    case 'send':
      guarded(() => {
        let payload = cmd.payload
        if (cmd.protocol === 'bt' && cmd.payloadBase64 !== undefined) payload = Buffer.from(cmd.payloadBase64, 'base64').toString('latin1')
        platform.apiSend(cmd.protocol, cmd.topic, cmd.to, payload, report)
      })
      break
    case 'sendFrame':
      guarded(() => {
        assert(validKey(cmd.to), 'invalid destination')
        platform.send({ destination: cmd.to, frame: Buffer.from(cmd.frameBase64, 'base64') }, report)
      })
      break
    case 'flood': {
      const started = Date.now()
      const pad = 'x'.repeat(cmd.size || 0)
      let ok = 0
      let failed = 0
      const one = (err) => {
        if (err) failed += 1
        else ok += 1
        if (ok + failed === cmd.count) emit({ event: 'flooded', id, ms: Date.now() - started, ok, failed })
      }
      guarded(() => {
        for (let n = 0; n < cmd.count; n++) platform.apiSend('ms', cmd.topic || 'bench', cmd.to, { n, pad }, one)
      })
      break
    }
    case 'stats':
      emit(Object.assign({ event: 'stats' }, platform.stats))
      break
    case 'kadLookup':
      capture = []
      bus.deliver('self.transports.requestNodeInfo', 'local', cmd.key)
      emit({ event: 'kadLookup', key: cmd.key, found: capture })
      capture = null
      break
    case 'local':
      bus.deliver('self.' + cmd.topic, 'local', cmd.payload)
      emit({ event: 'ok', cmd: 'local' })
      break
    case 'kadContacts': {
      const contacts = []
      const buckets = kademlia && kademlia.dht ? kademlia.dht._router._buckets : {}
      for (const k in buckets) for (const c of buckets[k]._contacts) contacts.push(c.nodeInfo)
      emit({ event: 'kadContacts', contacts, drops: kadDrops })
      break
    }
    case 'quit':
      process.exit(0)
      break
    default:
      emit({ event: 'error', id, error: 'unknown command ' + cmd.cmd })
  }
}

// commands that arrive before "ready" wait for it (the original has no transport before then)
let early = []
const lines = readline.createInterface({ input: process.stdin })
lines.on('line', (line) => {
  if (!line.trim()) return
  let cmd
  try { cmd = JSON.parse(line) } catch (err) { return emit({ event: 'error', error: 'bad JSON: ' + err.message }) }
  if (early) early.push(cmd)
  else handle(cmd)
})
lines.on('close', () => process.exit(0))

platform.start()
