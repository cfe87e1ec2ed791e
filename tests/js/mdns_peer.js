'use strict'
// A JS node's discovery for tests/mdns_js.rs: the genuine mm-services-mdns 0.6.8 from
// node_modules, given a minimal stand-in for the platform's `messaging` object (`on` and
// `send`, nothing else the service uses). The stand-in feeds it what mm-platform would
// (`self.transports.myNodeInfo`, then `self.transports.requestBootstrapNodeInfo`) and prints
// every message the service sends as one JSON line on stdout:
//   {"js":"ready","nodeInfo":{...}}
//   {"js":"send","topic":"transports.nodeInfo","destination":"local","payload":{...}}
// Run it inside a private network namespace only: the service joins 224.0.0.251 on the default
// interface. It exits by itself after MM_JS_LIFETIME_MS (default 60 s).

var MdnsService = require('mm-services-mdns')
var nacl = require('tweetnacl')
var ed2curve = require('ed2curve')

function out (v) {
  process.stdout.write(JSON.stringify(v) + '\n')
}

var keys = nacl.sign.keyPair()
var nodeInfo = {
  signId: Buffer.from(keys.publicKey).toString('base64'),
  boxId: Buffer.from(ed2curve.convertPublicKey(keys.publicKey)).toString('base64'),
  connectionInfo: [{transportType: 'udp', transportInfo: {address: '127.0.0.1', port: 9}}]
}

var handlers = {}
var messaging = {
  on: function (topic, callback) {
    (handlers[topic] = handlers[topic] || []).push(callback)
  },
  send: function (topic, destination, payload) {
    out({js: 'send', topic: topic, destination: destination, payload: payload})
  }
}

function deliverLocal (topic, payload) {
  (handlers['self.' + topic] || []).forEach(function (callback) {
    callback('self.' + topic, 'local', payload)
  })
}

var logger = {
  log: function (level, message) {
    if (process.env.MM_JS_DEBUG) process.stderr.write(level + ' ' + message + '\n')
  }
}

// eslint-disable-next-line no-new
new MdnsService({platform: {messaging: messaging}, logger: logger})
deliverLocal('transports.myNodeInfo', nodeInfo)
deliverLocal('transports.requestBootstrapNodeInfo', {})
out({js: 'ready', nodeInfo: nodeInfo})

setTimeout(function () {
  process.exit(0)
}, Number(process.env.MM_JS_LIFETIME_MS || 60000))
