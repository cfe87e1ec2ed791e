#!/usr/bin/env node
'use strict'
/*
 * selftest.js: checks peer.js against itself (two processes), JS only, on 127.0.0.1.
 *   node tests/js/selftest.js          (needs `npm ci --ignore-scripts` in tests/js first)
 * Every wait is bounded. Prints what it measured and observed, then "selftest: N passed, N failed".
 *
 *  1. UDP only (--no-tcp on both), then TCP only (--no-udp on both): `ms` both ways (sender boxId,
 *     topic, payload), 1,000 messages each way in order (at once over UDP; over TCP at once only
 *     recorded, then one direction after the other, required), the rate of a 2,000 x 100-byte
 *     flood (timed to the last delivery; also on a fresh pair, connection setup included); on
 *     another fresh pair `bt` of 0 bytes, 1 byte, 1 MiB random bytes, then 1,000 each way again
 *     (required over UDP; over TCP only recorded: the original sometimes breaks there).
 *  2. Tolerance: a Message with an extra field 4, the `mm`/`identify` frame, a bad JSON `ms`
 *     payload, a `bt` payload that is not UTF-8, a frame that is not protobuf.
 *  3. Replies: a node that got a message over an inbound connection but lacks the sender's
 *     nodeInfo; then with it (does it reuse the inbound connection?).
 *  4. Bytes on the wire, through a UDP and a TCP relay, against js-compat.md.
 *  5. --data: identity and ports survive a restart.
 */

const { spawn } = require('child_process')
const path = require('path')
const fs = require('fs')
const os = require('os')
const dgram = require('dgram')
const net = require('net')
const crypto = require('crypto')
const readline = require('readline')
const assert = require('assert')
const ProtoBuf = require('protobufjs')

const PEER = path.join(__dirname, 'peer.js')
let passed = 0
let failed = 0
const report = []
const live = []

function check (name, fn) {
  return Promise.resolve().then(fn).then(() => {
    passed += 1
    console.log('ok   ' + name)
  }, (err) => {
    failed += 1
    console.log('FAIL ' + name + ': ' + (err && err.stack ? err.stack.split('\n').slice(0, 3).join(' | ') : err))
  })
}

class Peer {
  constructor (args, name) {
    this.name = name
    this.events = []
    this.waiters = []
    this.proc = spawn(process.execPath, [PEER, ...args], { stdio: ['pipe', 'pipe', 'pipe'] })
    this.stderr = ''
    this.proc.stderr.on('data', (d) => { this.stderr += d })
    this.exited = null
    this.proc.on('exit', (code) => { this.exited = code })
    readline.createInterface({ input: this.proc.stdout }).on('line', (line) => {
      const event = JSON.parse(line)
      if (event.event === 'fatal') console.log(name + ' FATAL ' + event.error)
      this.events.push(event)
      this.waiters = this.waiters.filter((w) => !(w.pred(event) && (w.resolve(event), true)))
    })
    live.push(this)
  }

  cmd (obj) { this.proc.stdin.write(JSON.stringify(obj) + '\n') }

  // first matching event, past or future; rejects after ms
  wait (pred, ms, what) {
    const seen = this.events.find(pred)
    if (seen) return Promise.resolve(seen)
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(this.name + ': timed out waiting for ' + what)), ms)
      this.waiters.push({ pred, resolve: (e) => { clearTimeout(timer); resolve(e) } })
    })
  }

  count (pred) { return this.events.filter(pred).length }

  async ready () { this.info = (await this.wait((e) => e.event === 'ready', 15000, 'ready')).nodeInfo; return this.info }

  stop () { if (this.exited === null) this.proc.kill() }
}

async function pair (args, names) {
  const a = new Peer(args, names[0])
  const b = new Peer(args, names[1])
  await Promise.all([a.ready(), b.ready()])
  a.cmd({ cmd: 'nodeInfo', nodeInfo: b.info })
  b.cmd({ cmd: 'nodeInfo', nodeInfo: a.info })
  await a.wait((e) => e.event === 'ok', 5000, 'ok')
  await b.wait((e) => e.event === 'ok', 5000, 'ok')
  return [a, b]
}

const isMsg = (topic) => (e) => e.event === 'message' && e.topic === topic

async function exchange (label, args) {
  let [a, b] = await pair(args, [label + '-A', label + '-B'])
  try {
    await check(label + ': ms both ways, right sender and topic', async () => {
      a.cmd({ cmd: 'send', id: 1, to: b.info.boxId, topic: 'chat.say', protocol: 'ms', payload: { hi: 'B', n: [1, 2] } })
      const m1 = await b.wait(isMsg('chat.say'), 20000, 'A->B')
      assert.strictEqual(m1.sender, a.info.boxId)
      assert.deepStrictEqual(m1.payload, { hi: 'B', n: [1, 2] })
      assert.strictEqual(m1.scope, 'public')
      await a.wait((e) => e.event === 'sent' && e.id === 1, 20000, 'sent 1')
      b.cmd({ cmd: 'send', id: 2, to: a.info.boxId, topic: 'chat.reply', protocol: 'ms', payload: 'plain string' })
      const m2 = await a.wait(isMsg('chat.reply'), 20000, 'B->A')
      assert.strictEqual(m2.sender, b.info.boxId)
      assert.strictEqual(m2.payload, 'plain string')
      await b.wait((e) => e.event === 'sent' && e.id === 2, 20000, 'sent 2')
      const conns = a.events.concat(b.events).filter((e) => e.event === 'connection')
      report.push(label + ': connections ' + JSON.stringify(conns.map((c) => c.direction + '/' + c.transport)))
    })

    // 1,000 each way. Over UDP both floods at once, required. Over TCP both at once is recorded
    // only (the original's TCP framing sometimes loses the stream then), then one direction at a
    // time, required.
    const seqOk = (p, q, topic) => {
      const ns = p.events.filter(isMsg(topic)).map((e) => e.payload.n)
      assert.deepStrictEqual(ns, Array.from({ length: 1000 }, (_, i) => i))
      assert(p.events.filter(isMsg(topic)).every((e) => e.sender === q.info.boxId))
    }
    const last = (p, topic) => p.wait((e) => e.event === 'message' && e.topic === topic && e.payload.n === 999, label === 'TCP' ? 30000 : 120000, '1000th ' + topic)
    const both = async (topic) => {
      a.cmd({ cmd: 'flood', id: 100, to: b.info.boxId, count: 1000, size: 20, topic })
      b.cmd({ cmd: 'flood', id: 101, to: a.info.boxId, count: 1000, size: 20, topic })
      await Promise.all([last(a, topic), last(b, topic)])
      seqOk(a, b, topic)
      seqOk(b, a, topic)
    }
    if (label === 'TCP') {
      const outcome = await both('seq2').then(() => 'all delivered in order', (e) => e.message)
      report.push(label + ': 1,000 each way at once: ' + outcome + ' (A got ' + a.count(isMsg('seq2')) + ', B got ' + b.count(isMsg('seq2')) + ')')
      await a.stop(); await b.stop()
      ;[a, b] = await pair(args, [label + '-A2', label + '-B2'])
      await check(label + ': 1,000 messages each way, one direction after the other, complete and in order', async () => {
        a.cmd({ cmd: 'flood', id: 100, to: b.info.boxId, count: 1000, size: 20, topic: 'seq' })
        await last(b, 'seq')
        b.cmd({ cmd: 'flood', id: 101, to: a.info.boxId, count: 1000, size: 20, topic: 'seq' })
        await last(a, 'seq')
        seqOk(a, b, 'seq')
        seqOk(b, a, 'seq')
      })
    } else {
      await check(label + ': 1,000 messages each way at once, complete and in order', () => both('seq'))
    }

    await check(label + ': flood 2,000 x 100 bytes', async () => {
      const started = Date.now()
      a.cmd({ cmd: 'flood', id: 200, to: b.info.boxId, count: 2000, size: 100, topic: 'bench' })
      await b.wait((e) => e.event === 'message' && e.topic === 'bench' && e.payload.n === 1999, 120000, 'last bench')
      const elapsed = Date.now() - started
      const flooded = await a.wait((e) => e.event === 'flooded' && e.id === 200, 120000, 'flooded')
      assert.strictEqual(b.count(isMsg('bench')), 2000)
      report.push(label + ': 2,000 x 100-byte ms on the warmed-up connection: last delivered after ' + elapsed + ' ms = ' +
        Math.round(2000000 / elapsed) + ' msg/s; sender callbacks all done after ' + flooded.ms + ' ms')
    })
    await check(label + ': both processes still alive', () => assert(a.exited === null && b.exited === null))
  } finally {
    if (process.env.SELFTEST_DEBUG) {
      for (const p of [a, b]) {
        const kinds = {}
        for (const e of p.events) kinds[e.event + (e.topic ? ':' + e.topic : '')] = (kinds[e.event + (e.topic ? ':' + e.topic : '')] || 0) + 1
        console.log(p.name, JSON.stringify(kinds))
        console.log(p.stderr.split('\n').filter((l) => l && !/eprecat|padLevels|trace-warn/.test(l)).slice(-20).join('\n'))
      }
    }
    a.stop()
    b.stop()
  }
}

// bt payloads on a fresh pair (over TCP a connection warmed up by the floods loses the 1 MiB
// transfer now and then: see peer.js on 1tp's TCP framing)
async function bulk (label, args) {
  const [a, b] = await pair(args, [label + '-bt-A', label + '-bt-B'])
  try {
    for (const size of [0, 1, 1024 * 1024]) {
      await check(label + ': bt of ' + size + ' random bytes arrives intact', async () => {
        const bytes = crypto.randomBytes(size)
        const started = Date.now()
        a.cmd({ cmd: 'send', id: 10 + size, to: b.info.boxId, topic: 'bt.' + size, protocol: 'bt', payloadBase64: bytes.toString('base64') })
        const m = await b.wait(isMsg('bt.' + size), 180000, 'bt ' + size)
        assert.strictEqual(m.sender, a.info.boxId)
        assert.strictEqual(m.payloadBase64, bytes.toString('base64'))
        if (size > 1) report.push(label + ': bt 1 MiB delivered in ' + (Date.now() - started) + ' ms (' + Buffer.from(m.utf8Base64, 'base64').length + ' bytes of UTF-8 in the frame)')
      })
    }

    // After the 1 MiB transfer the stream runs fast; a burst both ways then sometimes breaks the
    // original's TCP path (its netstring reader drops glued or split frames until CurveCP gives up).
    // Recorded for TCP, required for UDP.
    const burst = async () => {
      a.cmd({ cmd: 'flood', id: 300, to: b.info.boxId, count: 1000, size: 20, topic: 'burst' })
      b.cmd({ cmd: 'flood', id: 301, to: a.info.boxId, count: 1000, size: 20, topic: 'burst' })
      const done = (p) => p.wait((e) => e.event === 'message' && e.topic === 'burst' && e.payload.n === 999, 30000, '1000th burst')
      const outcome = await Promise.all([done(a), done(b)]).then(() => 'all delivered', (e) => e.message)
      const got = [a, b].map((p) => p.count(isMsg('burst')))
      const dropped = a.count((e) => e.event === 'dropped') + b.count((e) => e.event === 'dropped')
      const offline = a.count((e) => e.event === 'offline') + b.count((e) => e.event === 'offline')
      report.push(label + ': 1,000 each way right after the 1 MiB bt: ' + outcome + ' (A got ' + got[0] + ', B got ' + got[1] +
        '; offline events ' + offline + ', dropped frames ' + dropped + ')')
      return got
    }
    if (label === 'TCP') await burst()
    else await check(label + ': 1,000 each way right after the 1 MiB bt', async () => assert.deepStrictEqual(await burst(), [1000, 1000]))
  } finally {
    a.stop()
    b.stop()
  }
}

async function coldFlood (label, args) { // fresh pair, no connection yet: setup and slow start included
  const [a, b] = await pair(args, [label + '-cold-A', label + '-cold-B'])
  try {
    await check(label + ': flood 2,000 x 100 bytes on a fresh pair', async () => {
      const started = Date.now()
      a.cmd({ cmd: 'flood', id: 1, to: b.info.boxId, count: 2000, size: 100, topic: 'bench' })
      await b.wait((e) => e.event === 'message' && e.topic === 'bench' && e.payload.n === 1999, 120000, 'last bench')
      const elapsed = Date.now() - started
      assert.strictEqual(b.count(isMsg('bench')), 2000)
      report.push(label + ': 2,000 x 100-byte ms from a cold start (connection setup included): last delivered after ' +
        elapsed + ' ms = ' + Math.round(2000000 / elapsed) + ' msg/s')
    })
  } finally {
    a.stop()
    b.stop()
  }
}

const Message = (() => {
  const builder = ProtoBuf.newBuilder()
  builder.create({
    name: 'Message',
    fields: ['topic', 'protocol', 'payload'].map((name, i) => ({ rule: 'required', type: 'string', name, id: i + 1 }))
  })
  return builder.build('Message')
})()
const encode = (topic, protocol, payload) => Buffer.from(new Message({ topic, protocol, payload }).toBuffer())
const field4 = (id) => Buffer.concat([Buffer.from([0x22, id.length]), id])

async function tolerance () {
  const [a, b] = await pair([], ['tol-A', 'tol-B'])
  let n = 0
  const frame = (bytes) => a.cmd({ cmd: 'sendFrame', id: ++n, to: b.info.boxId, frameBase64: bytes.toString('base64') })
  const alive = async (topic) => { // a normal message after the odd one still arrives
    a.cmd({ cmd: 'send', id: ++n, to: b.info.boxId, topic, protocol: 'ms', payload: { after: topic } })
    await b.wait(isMsg(topic), 20000, topic)
    assert.strictEqual(b.exited, null)
  }
  try {
    await check('tolerance: Message with field 4 (16-byte id) after the payload is delivered', async () => {
      frame(Buffer.concat([encode('tol.f4', 'ms', '{"k":1}'), field4(crypto.randomBytes(16))]))
      const m = await b.wait(isMsg('tol.f4'), 20000, 'tol.f4')
      assert.deepStrictEqual(m.payload, { k: 1 })
      assert.strictEqual(m.sender, a.info.boxId)
      await alive('tol.after-f4')
    })
    await check('tolerance: Message with field 4 before field 1 is delivered', async () => {
      frame(Buffer.concat([field4(crypto.randomBytes(16)), encode('tol.f4first', 'ms', '{"k":2}')]))
      const m = await b.wait(isMsg('tol.f4first'), 20000, 'tol.f4first')
      assert.deepStrictEqual(m.payload, { k: 2 })
    })
    await check('tolerance: mm/identify frame: no crash, emitted by the platform, taken by no API', async () => {
      frame(encode('identify', 'mm', a.info.signId))
      const m = await b.wait((e) => e.event === 'platformMessage' && e.topic === 'identify', 20000, 'identify')
      assert.strictEqual(m.protocol, 'mm')
      assert.strictEqual(m.payload, a.info.signId)
      assert.strictEqual(m.sender, a.info.boxId)
      await alive('tol.after-mm')
      assert.strictEqual(b.count((e) => e.event === 'message' && e.topic === 'identify'), 0)
    })
    await check('tolerance: ms payload that is not JSON is dropped, process survives', async () => {
      frame(encode('tol.badjson', 'ms', '{not json'))
      const d = await b.wait((e) => e.event === 'dropped', 20000, 'dropped')
      report.push('tolerance: bad JSON -> dropped: ' + d.error)
      await alive('tol.after-badjson')
    })
    await check('tolerance: bt payload that is not UTF-8 arrives with U+FFFD replacements', async () => {
      const raw = Buffer.concat([Buffer.from('0a0574' + '6f2e6274' + '1202' + '6274' + '1a04', 'hex'), Buffer.from([0xff, 0xfe, 0x80, 0x41])])
      // topic "to.bt", protocol "bt", payload bytes ff fe 80 41
      frame(raw)
      const m = await b.wait(isMsg('to.bt'), 20000, 'to.bt')
      assert.strictEqual(m.payload, '\ufffd\ufffd\ufffdA')
      report.push('tolerance: bt bytes ff fe 80 41 arrive as the string ' + JSON.stringify(m.payload) + ' (UTF-8 ' + Buffer.from(m.utf8Base64, 'base64').toString('hex') + ')')
    })
    await check('tolerance: a frame that is not protobuf is dropped, process survives', async () => {
      const before = b.count((e) => e.event === 'dropped')
      frame(Buffer.from('this is not protobuf'))
      await b.wait((e) => e.event === 'dropped' && b.count((x) => x.event === 'dropped') > before, 20000, 'second dropped')
      await alive('tol.after-garbage')
    })
  } finally {
    a.stop()
    b.stop()
  }
}

async function replies () {
  const a = new Peer(['--no-tcp'], 'rep-A')
  const b = new Peer(['--no-tcp'], 'rep-B')
  await Promise.all([a.ready(), b.ready()])
  try {
    a.cmd({ cmd: 'nodeInfo', nodeInfo: b.info }) // B does not learn A
    await check('replies: without the sender\'s nodeInfo, B asks for it and fails after 10 s', async () => {
      a.cmd({ cmd: 'send', id: 1, to: b.info.boxId, topic: 'r.ping', protocol: 'ms', payload: 1 })
      await b.wait(isMsg('r.ping'), 20000, 'r.ping')
      const started = Date.now()
      b.cmd({ cmd: 'send', id: 2, to: a.info.boxId, topic: 'r.pong', protocol: 'ms', payload: 2 })
      const req = await b.wait((e) => e.event === 'requestNodeInfo', 5000, 'requestNodeInfo')
      assert.strictEqual(req.key, a.info.boxId)
      const err = await b.wait((e) => e.event === 'error' && e.id === 2, 15000, 'error 2')
      report.push('replies: B, holding an inbound connection from A but not its nodeInfo: requestNodeInfo, then after ' +
        (Date.now() - started) + ' ms: ' + err.error)
    })
    await check('replies: with the nodeInfo, B replies over the inbound connection (no new one)', async () => {
      b.cmd({ cmd: 'nodeInfo', nodeInfo: a.info })
      b.cmd({ cmd: 'send', id: 3, to: a.info.boxId, topic: 'r.pong2', protocol: 'ms', payload: 3 })
      await a.wait(isMsg('r.pong2'), 20000, 'r.pong2')
      const bConns = b.events.filter((e) => e.event === 'connection').map((e) => e.direction)
      const aConns = a.events.filter((e) => e.event === 'connection').map((e) => e.direction)
      assert.deepStrictEqual(bConns, ['inbound'])
      assert.deepStrictEqual(aConns, ['outbound'])
    })
  } finally {
    a.stop()
    b.stop()
  }
}

// ---- wire capture

function readNs (buf, off) { // -> [bytes, next offset]; throws unless it is a well-formed netstring
  const colon = buf.indexOf(0x3a, off)
  assert(colon > off, 'netstring without length at ' + off)
  const digits = buf.toString('latin1', off, colon)
  assert(/^(0|[1-9][0-9]*)$/.test(digits), 'bad netstring length ' + JSON.stringify(digits))
  const len = Number(digits)
  assert.strictEqual(buf[colon + 1 + len], 0x2c, 'netstring not closed by a comma')
  return [buf.subarray(colon + 1, colon + 1 + len), colon + 2 + len]
}

function parseDatagram (d) {
  const type = d[0]
  let off = 1
  const parts = []
  while (off < d.length) { const [x, next] = readNs(d, off); parts.push(x); off = next }
  assert.strictEqual(parts.length, 3, 'a 1tp datagram has 3 netstrings')
  return { type, version: parts[0].toString(), session: parts[1].toString(), payload: parts[2] }
}

function socketPacket (p) { // PING / PONG / DATA(curvecp)
  if (p.length === 1 && p[0] === 8) return 'PING'
  if (p.length === 1 && p[0] === 9) return 'PONG'
  assert.strictEqual(p[0], 2, 'socket packet type')
  const [cp, end] = readNs(p, 1)
  assert.strictEqual(end, p.length)
  return cp.subarray(0, 8).toString('latin1') + '/' + cp.length
}

const TYPES = ['SYN', 'SYN_ACK', 'DATA', 'FIN', 'RST', 'ACK']

async function udpWire () {
  const [a, b] = await pair(['--no-tcp'], ['udpwire-A', 'udpwire-B'])
  const front = dgram.createSocket('udp4')
  const log = []
  const ups = new Map()
  front.on('message', (msg, rinfo) => {
    let up = ups.get(rinfo.port)
    if (!up) {
      up = dgram.createSocket('udp4')
      up.bind(0, '127.0.0.1')
      up.on('message', (back) => { log.push(['<', back]); front.send(back, rinfo.port, '127.0.0.1') })
      ups.set(rinfo.port, up)
    }
    log.push(['>', msg])
    up.send(msg, b.info.connectionInfo[0].transportInfo.port, '127.0.0.1')
  })
  await new Promise((resolve) => front.bind(0, '127.0.0.1', resolve))
  try {
    await check('wire/UDP: handshake and first packets match js-compat.md', async () => {
      const relayed = Object.assign({}, b.info, { connectionInfo: [{ transportType: 'udp', transportInfo: { address: '127.0.0.1', port: front.address().port } }] })
      a.cmd({ cmd: 'nodeInfo', nodeInfo: relayed })
      a.cmd({ cmd: 'send', id: 1, to: b.info.boxId, topic: 'test.hello', protocol: 'ms', payload: { hello: 'world', n: 42 } })
      await b.wait(isMsg('test.hello'), 20000, 'relayed message')
      await a.wait((e) => e.event === 'sent', 20000, 'sent')
      const seen = log.map(([dir, d]) => {
        const p = parseDatagram(d)
        assert.strictEqual(p.version, '0.21.0')
        assert(/^[0-9a-f]{8}$/.test(p.session), 'session id ' + p.session)
        const what = TYPES[p.type] === 'DATA' ? 'DATA(' + socketPacket(p.payload) + ')' : TYPES[p.type] + '(' + p.payload.toString() + ')'
        return { dir, what, session: p.session, type: TYPES[p.type], raw: d }
      })
      assert(seen.every((s) => s.session === seen[0].session), 'one session id both ways')
      const first = seen.slice(0, 9).map((s) => s.dir + ' ' + s.what.replace(/\((..)\)$/, '(tid)'))
      report.push('wire/UDP first datagrams: ' + first.join(', '))
      report.push('wire/UDP SYN bytes: ' + JSON.stringify(seen[0].raw.toString('latin1')) + '; DATA(PING) bytes: ' + JSON.stringify(seen[3].raw.toString('latin1')))
      assert.deepStrictEqual(first, [
        '> SYN(tid)', '< SYN_ACK(tid)', '> ACK(tid)', '> DATA(PING)', '< DATA(PONG)',
        '> DATA(QvnQ5XlH/224)', '< DATA(RL3aNMXK/200)', '> DATA(QvnQ5XlI/608)', '< DATA(RL3aNMXM/128)'])
      const tid = seen[0].what.slice(4, 6)
      assert(/^[0-9a-f]{2}$/.test(tid))
      assert.strictEqual(seen[1].what, 'SYN_ACK(' + tid + ')')
      assert.strictEqual(seen[2].what, 'ACK(' + tid + ')')
    })
  } finally {
    front.close()
    for (const up of ups.values()) up.close()
    a.stop()
    b.stop()
  }
}

async function tcpWire () {
  const [a, b] = await pair(['--no-udp'], ['tcpwire-A', 'tcpwire-B'])
  const chunks = []
  const relay = net.createServer((down) => {
    down.setNoDelay(true)
    const up = net.connect(b.info.connectionInfo[0].transportInfo.port, '127.0.0.1')
    up.setNoDelay(true)
    down.on('data', (d) => { chunks.push(['>', d]); up.write(d) })
    up.on('data', (d) => { chunks.push(['<', d]); down.write(d) })
    down.on('error', () => {}); up.on('error', () => {})
    down.on('close', () => up.destroy()); up.on('close', () => down.destroy())
  })
  await new Promise((resolve) => relay.listen(0, '127.0.0.1', resolve))
  try {
    await check('wire/TCP: PING, PONG, then netstring-wrapped DATA packets', async () => {
      const relayed = Object.assign({}, b.info, { connectionInfo: [{ transportType: 'tcp', transportInfo: { address: '127.0.0.1', port: relay.address().port } }] })
      a.cmd({ cmd: 'nodeInfo', nodeInfo: relayed })
      a.cmd({ cmd: 'send', id: 1, to: b.info.boxId, topic: 'test.hello', protocol: 'ms', payload: { hello: 'world', n: 42 } })
      await b.wait(isMsg('test.hello'), 20000, 'relayed message')
      const stream = { '>': Buffer.concat(chunks.filter((c) => c[0] === '>').map((c) => c[1])), '<': Buffer.concat(chunks.filter((c) => c[0] === '<').map((c) => c[1])) }
      const frames = {}
      for (const dir of ['>', '<']) {
        frames[dir] = []
        let off = 0
        while (off < stream[dir].length) { const [x, next] = readNs(stream[dir], off); frames[dir].push(socketPacket(x)); off = next }
      }
      report.push('wire/TCP A->B: ' + frames['>'].slice(0, 4).join(', ') + '; B->A: ' + frames['<'].slice(0, 3).join(', '))
      report.push('wire/TCP first bytes A->B: ' + JSON.stringify(stream['>'].subarray(0, 16).toString('latin1')) + ', B->A: ' + JSON.stringify(stream['<'].subarray(0, 4).toString('latin1')))
      assert.deepStrictEqual(frames['>'].slice(0, 3), ['PING', 'QvnQ5XlH/224', 'QvnQ5XlI/608'])
      assert.deepStrictEqual(frames['<'].slice(0, 3), ['PONG', 'RL3aNMXK/200', 'RL3aNMXM/128'])
      assert.strictEqual(stream['>'].subarray(0, 4).toString('latin1'), '1:\x08,')
      assert.strictEqual(stream['>'].subarray(4, 14).toString('latin1'), '230:\x02224:Q')
    })
  } finally {
    relay.close()
    a.stop()
    b.stop()
  }
}

async function persistence () {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mm-peer-'))
  try {
    await check('--data: identity and listening ports survive a restart', async () => {
      const first = new Peer(['--data', dir], 'data-1')
      const one = await first.ready()
      first.cmd({ cmd: 'quit' })
      await new Promise((resolve) => { const t = setInterval(() => { if (first.exited !== null) { clearInterval(t); resolve() } }, 50) })
      assert.strictEqual(first.exited, 0)
      const stored = fs.readFileSync(path.join(dir, 'identity'), 'utf8')
      assert.strictEqual(Buffer.from(stored, 'base64').length, 64)
      const second = new Peer(['--data', dir], 'data-2')
      const two = await second.ready()
      second.stop()
      assert.strictEqual(two.signId, one.signId)
      assert.strictEqual(two.boxId, one.boxId)
      assert.deepStrictEqual(two.connectionInfo, one.connectionInfo)
    })
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
  }
}

async function main () {
  const hardStop = setTimeout(() => { console.log('selftest: overall timeout'); finish(1) }, 15 * 60 * 1000)
  const only = process.env.SELFTEST_ONLY // e.g. TCP, UDP, tolerance, replies, wire, data
  const want = (name) => !only || only.split(',').includes(name)
  if (want('UDP')) await exchange('UDP', ['--no-tcp'])
  if (want('UDP')) await bulk('UDP', ['--no-tcp'])
  if (want('UDP')) await coldFlood('UDP', ['--no-tcp'])
  if (want('TCP')) await exchange('TCP', ['--no-udp'])
  if (want('TCP')) await bulk('TCP', ['--no-udp'])
  if (want('TCP')) await coldFlood('TCP', ['--no-udp'])
  if (want('tolerance')) await tolerance()
  if (want('replies')) await replies()
  if (want('wire')) await udpWire()
  if (want('wire')) await tcpWire()
  if (want('data')) await persistence()
  clearTimeout(hardStop)
  finish(failed === 0 ? 0 : 1)
}

function finish (code) {
  for (const p of live) p.stop()
  for (const line of report) console.log('  ' + line)
  console.log('selftest: ' + passed + ' passed, ' + failed + ' failed')
  process.exit(code)
}

main().catch((err) => { console.log('selftest crashed: ' + err.stack); failed += 1; finish(1) })
