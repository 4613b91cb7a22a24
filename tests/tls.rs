//! TLS end to end: certificates generated at test time (a CA, a server certificate for
//! 127.0.0.1, client certificates), a nats-server running the repository's `nats.conf` with the
//! `tls` block docs/security.md documents, and bulwark connecting through `[nats] tls_ca`,
//! `tls_cert` and `tls_key`. A plain connection is refused; so is a client that does not trust
//! the server's CA or brings no client certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_common::BulwarkConfig;
use bulwark_common::connect::{self, Role};
use bulwark_common::subjects;
use bulwark_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The PEM files of one test's certificates.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA nobody trusts, for the negative cases.
    stranger_ca: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write PEM");
    path
}

fn pki() -> Pki {
    let dir = tempfile::Builder::new()
        .prefix("bulwark-tls-")
        .tempdir()
        .expect("tmp");
    let authority = ca("bulwark test CA");
    let (server_cert, server_key) = leaf(
        &authority,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        &authority,
        &["bulwark"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let stranger = ca("somebody else's CA");
    Pki {
        ca: write(dir.path(), "ca.pem", &authority.pem()),
        server_cert: write(dir.path(), "server.pem", &server_cert),
        server_key: write(dir.path(), "server-key.pem", &server_key),
        client_cert: write(dir.path(), "client.pem", &client_cert),
        client_key: write(dir.path(), "client-key.pem", &client_key),
        stranger_ca: write(dir.path(), "stranger-ca.pem", &stranger.pem()),
        _dir: dir,
    }
}

/// The repository's nats.conf with the TLS block of docs/security.md (client certificates
/// verified against the CA).
fn tls_server(pki: &Pki) -> NatsServer {
    NatsServer::start_with(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n",
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca.display().to_string(),
    ))
}

fn tls_config(server: &NatsServer, pki: &Pki) -> BulwarkConfig {
    let mut cfg = server.config();
    cfg.nats.tls_ca = pki.ca.display().to_string();
    cfg.nats.tls_cert = pki.client_cert.display().to_string();
    cfg.nats.tls_key = pki.client_key.display().to_string();
    cfg.nats.connect_timeout_ms = 3_000;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulwark_connects_over_tls_and_serves() {
    init_logging();
    let pki = pki();
    let server = tls_server(&pki);
    let cfg = tls_config(&server, &pki);
    let _gov = start_governance(cfg.clone()).await;
    let (cli, _) = connect::connect(&cfg.nats, "tls-cli", Role::Cli)
        .await
        .expect("the CLI connects over TLS");
    let (decision, code) = request_json(
        &cli,
        subjects::INTENT_SUBMIT,
        json!({"intent_type": "query_knowledge", "actor": "tls"}).to_string(),
    )
    .await;
    assert_eq!((code, decision["status"].as_str()), (None, Some("queued")));
    // The server says the connection is TLS.
    let connz: Value = reqwest_connz(&server).await;
    let conns = connz["connections"].as_array().cloned().unwrap_or_default();
    assert!(!conns.is_empty(), "{connz}");
    for conn in &conns {
        assert!(
            conn["tls_version"].as_str().is_some_and(|v| !v.is_empty()),
            "every connection is TLS: {conn}"
        );
    }
}

/// `/connz` of the monitoring port, read with a plain HTTP/1.0 request (no HTTP client needed).
async fn reqwest_connz(server: &NatsServer) -> Value {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.monitor_port()))
        .await
        .expect("monitoring port");
    stream
        .write_all(b"GET /connz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("request");
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut text)
        .await
        .expect("response");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("connz is JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_untrusting_connections_are_refused() {
    init_logging();
    let pki = pki();
    let server = tls_server(&pki);

    // A plain-text client: the server announces TLS as required and never answers it.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .expect("tcp");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let info = lines.next_line().await.expect("INFO line").expect("INFO");
    assert!(info.contains("\"tls_required\":true"), "{info}");
    write
        .write_all(b"CONNECT {\"verbose\":false,\"user\":\"bulwark\",\"pass\":\"bulwark-dev\"}\r\nPING\r\n")
        .await
        .ok();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line);
        }
        seen
    })
    .await
    .expect("the server closes a plain connection");
    assert!(
        !answer.iter().any(|l| l.starts_with("PONG")),
        "a plain connection was served: {answer:?}"
    );

    // bulwark without TLS settings (plain URL, no CA): refused.
    let mut plain = server.config();
    plain.nats.connect_timeout_ms = 3_000;
    let err = connect::connect(&plain.nats, "plain", Role::Cli)
        .await
        .expect_err("no TLS configuration");
    assert!(err.to_string().contains("cannot reach NATS"), "{err}");

    // Trusting another CA: the server's certificate is refused.
    let mut stranger = tls_config(&server, &pki);
    stranger.nats.tls_ca = pki.stranger_ca.display().to_string();
    assert!(
        connect::connect(&stranger.nats, "stranger", Role::Cli)
            .await
            .is_err(),
        "a server certificate from an unknown CA was accepted"
    );

    // The right CA but no client certificate: the server refuses us (verify: true).
    let mut anonymous = tls_config(&server, &pki);
    anonymous.nats.tls_cert.clear();
    anonymous.nats.tls_key.clear();
    assert!(
        connect::connect(&anonymous.nats, "no-client-cert", Role::Cli)
            .await
            .is_err(),
        "a client without a certificate was accepted"
    );

    // And with everything right, it works.
    connect::connect(&tls_config(&server, &pki).nats, "right", Role::Cli)
        .await
        .expect("the configured client connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_refuses_a_plain_server() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.nats.tls_required = true;
    cfg.nats.connect_timeout_ms = 3_000;
    let err = connect::connect(&cfg.nats, "needs-tls", Role::Cli)
        .await
        .expect_err("a server without TLS is refused");
    assert!(err.to_string().contains("cannot reach NATS"), "{err}");
    cfg.nats.tls_required = false;
    connect::connect(&cfg.nats, "plain-ok", Role::Cli)
        .await
        .expect("without tls_required the plain local server is fine");
}
