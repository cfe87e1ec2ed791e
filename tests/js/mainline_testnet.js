'use strict'
// A BitTorrent Mainline DHT testnet on 127.0.0.1 for tests/mainline_js.rs and the bench: N
// nodes of the `bittorrent-dht` package (BEP 44 with tweetnacl as the verify function), none
// bootstrapping from the public routers (`bootstrap: false`), each listening on 127.0.0.1 and
// linked to the others with addNode. Clients made per command read and write BEP 44 items.
//
// Arguments: [--nodes N] (default 20). It exits when stdin closes, or after MM_JS_LIFETIME_MS
// (default 180 s).
//
// stdout, one JSON object per line:
//   {"js":"ready","nodes":[{"host":"127.0.0.1","port":P},...]}
//   {"js":"got","id":ID,"found":true,"seq":N,"value":"<v as UTF-8>","verified":true|false}
//     or {"js":"got","id":ID,"found":false}
//   {"js":"put","id":ID,"ok":true,"nodes":N,"signId":"...","nodeInfo":{...},"ms":T}
//   {"js":"error","id":ID,"error":"..."}, {"js":"fatal","error":"..."}
// stdin, one JSON command per line:
//   {"cmd":"get","id":ID,"signId":"<base64 ed25519 public key>"}
//     a fresh client looks the mutable item up (target SHA-1 of the key, no salt), checks the
//     signature itself with tweetnacl, and reports it
//   {"cmd":"put","id":ID,"connectionInfo":[...],"seq":N,"forge":"otherSignId"?}
//     a fresh client makes a key pair, and puts the nodeInfo {signId, boxId, connectionInfo}
//     of that key as a mutable item signed with it (with "forge", the nodeInfo names another
//     key than the one signing it)
//   {"cmd":"quit"}

const crypto = require('crypto')
const readline = require('readline')
const nacl = require('tweetnacl')
const ed2curve = require('ed2curve')

function out (v) {
  process.stdout.write(JSON.stringify(v) + '\n')
}

process.on('uncaughtException', function (e) {
  out({ js: 'fatal', error: String(e && e.stack || e) })
  process.exit(1)
})

const lifetime = parseInt(process.env.MM_JS_LIFETIME_MS || '180000', 10)
setTimeout(function () { process.exit(0) }, lifetime).unref()

let count = 20
const args = process.argv.slice(2)
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--nodes') count = parseInt(args[++i], 10)
}

function verify (sig, msg, pk) {
  return nacl.sign.detached.verify(new Uint8Array(msg), new Uint8Array(sig), new Uint8Array(pk))
}

// BEP 44: the signed bytes for a byte-string value without salt.
function sigData (seq, v) {
  return Buffer.concat([Buffer.from('3:seqi' + seq + 'e1:v' + v.length + ':'), v])
}

function sha1 (buf) {
  return crypto.createHash('sha1').update(buf).digest()
}

async function main () {
  const { default: DHT } = await import('bittorrent-dht')
  const opts = () => ({ bootstrap: false, host: '127.0.0.1', verify })
  const listen = (dht) => new Promise((resolve) => dht.listen(0, '127.0.0.1', resolve))

  const nodes = []
  for (let i = 0; i < count; i++) {
    const dht = new DHT(opts())
    dht.on('error', (e) => out({ js: 'error', error: String(e) }))
    dht.on('warning', () => {})
    await listen(dht)
    nodes.push(dht)
  }
  const addrs = nodes.map((d) => ({ host: '127.0.0.1', port: d.address().port }))
  for (const d of nodes) {
    for (const other of nodes) {
      if (other !== d) d.addNode({ host: '127.0.0.1', port: other.address().port, id: other.nodeId })
    }
  }

  // A client joined to a few testnet nodes, for one command.
  async function client () {
    const c = new DHT(opts())
    c.on('error', () => {})
    c.on('warning', () => {})
    await listen(c)
    for (let i = 0; i < 4; i++) {
      const n = nodes[(Math.random() * nodes.length) | 0]
      c.addNode({ host: '127.0.0.1', port: n.address().port, id: n.nodeId })
    }
    return c
  }

  async function get (cmd) {
    const k = Buffer.from(cmd.signId, 'base64')
    const c = await client()
    c.get(sha1(k), function (err, res) {
      c.destroy()
      if (err) return out({ js: 'error', id: cmd.id, error: String(err) })
      if (!res || !res.v) return out({ js: 'got', id: cmd.id, found: false })
      const verified = Buffer.isBuffer(res.k) && res.k.equals(k) &&
        verify(res.sig, sigData(res.seq, res.v), res.k)
      out({ js: 'got', id: cmd.id, found: true, seq: res.seq, value: res.v.toString('utf8'), verified })
    })
  }

  async function put (cmd) {
    const keys = nacl.sign.keyPair()
    const named = cmd.forge ? nacl.sign.keyPair().publicKey : keys.publicKey
    const nodeInfo = {
      signId: Buffer.from(named).toString('base64'),
      boxId: Buffer.from(ed2curve.convertPublicKey(named)).toString('base64'),
      connectionInfo: cmd.connectionInfo || []
    }
    const v = Buffer.from(JSON.stringify(nodeInfo))
    const c = await client()
    const started = Date.now()
    c.put({
      k: Buffer.from(keys.publicKey),
      v,
      seq: cmd.seq || 1,
      sign: (buf) => Buffer.from(nacl.sign.detached(new Uint8Array(buf), keys.secretKey))
    }, function (err, hash, n) {
      c.destroy()
      if (err) return out({ js: 'error', id: cmd.id, error: String(err) })
      out({
        js: 'put',
        id: cmd.id,
        ok: true,
        nodes: n,
        signId: Buffer.from(keys.publicKey).toString('base64'),
        nodeInfo,
        ms: Date.now() - started
      })
    })
  }

  const rl = readline.createInterface({ input: process.stdin })
  rl.on('line', function (line) {
    let cmd
    try {
      cmd = JSON.parse(line)
    } catch (e) {
      return out({ js: 'error', error: 'not JSON' })
    }
    if (cmd.cmd === 'get') get(cmd)
    else if (cmd.cmd === 'put') put(cmd)
    else if (cmd.cmd === 'quit') process.exit(0)
    else out({ js: 'error', id: cmd.id, error: 'unknown command' })
  })
  rl.on('close', function () { process.exit(0) })
  out({ js: 'ready', nodes: addrs })
}

main().catch(function (e) {
  out({ js: 'fatal', error: String(e && e.stack || e) })
  process.exit(1)
})
