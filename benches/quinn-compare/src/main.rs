//! quinn 0.11 bulk transfer over 127.0.0.1, for the `compare_quinn` figures of mm-platform's
//! bench (`benches/figures.rs`): a sink endpoint and a sender endpoint in one tokio runtime
//! with two worker threads; the sender opens a fresh connection and one unidirectional stream,
//! writes `BYTES` (default 100 MiB) in 64 KiB writes and finishes; the time runs from the
//! connect call until the sink has read the end of the stream.
//!
//! Usage: `quinn-compare [BYTES]`. Prints one line: `{"name":"quinn_bulk","value":MB/s,"bytes":N}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let bytes: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("BYTES is a number"))
        .unwrap_or(100 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mbps = rt.block_on(run(bytes));
    println!("{{\"name\":\"quinn_bulk\",\"value\":{mbps:.1},\"bytes\":{bytes}}}");
}

async fn run(bytes: u64) -> f64 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let cert_der = rustls::pki_types::CertificateDer::from(cert.cert.der().to_vec());
    let key_der = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
    let server_config =
        quinn::ServerConfig::with_single_cert(vec![cert_der.clone()], key_der.into())
            .expect("server config");
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let server = quinn::Endpoint::server(server_config, loopback).expect("server endpoint");
    let server_addr = server.local_addr().expect("addr");

    let sink = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake");
        let mut recv = conn.accept_uni().await.expect("stream");
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        while let Some(n) = recv.read(&mut buf).await.expect("read") {
            got += n as u64;
        }
        let end = Instant::now();
        conn.close(0u32.into(), b"done");
        server.wait_idle().await;
        (got, end)
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).expect("root");
    let client_config = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).expect("tls");
    let mut client = quinn::Endpoint::client(loopback).expect("client endpoint");
    client.set_default_client_config(client_config);
    let data = vec![0x5au8; 64 * 1024];

    let start = Instant::now();
    let conn = client
        .connect(server_addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let mut send = conn.open_uni().await.expect("open");
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(data.len() as u64) as usize;
        send.write_all(&data[..n]).await.expect("write");
        sent += n as u64;
    }
    send.finish().expect("finish");
    let (got, end) = sink.await.expect("sink");
    assert_eq!(got, bytes, "every byte arrived");
    drop(conn);
    client.wait_idle().await;
    bytes as f64 / (end - start).as_secs_f64() / 1e6
}
