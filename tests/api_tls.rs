//! TLS and mutual TLS on the gRPC API port, against real node processes,
//! with certificates made at test time: the right CA works, a wrong CA, an
//! expired certificate or one for another host is refused; a node that
//! requires client certificates refuses clients without one or with one
//! from another CA; bad certificate files stop the node at start-up.

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::*;
use dfs::client::{Client, ConnectOptions};
use dfs::grpc::tls::ClientTlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

/// A certificate authority made for one test.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self { params, key, pem }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses) and its
    /// key, as PEM.
    fn issue(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "dfs test");
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The files of one test's PKI, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes `<name>.crt` and `<name>.key`.
    fn pair(&self, name: &str, (cert, key): (String, String)) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.crt"), &cert),
            self.write(&format!("{name}.key"), &key),
        )
    }
}

const LOCAL: &[&str] = &["127.0.0.1", "localhost"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn tls_node(cert: &Path, key: &Path, extra: &[&str]) -> TestNode {
    let mut node = TestNode::new(&["--tls-cert-file", s(cert), "--tls-key-file", s(key)]);
    node.add_args(extra);
    node.launch().await;
    node
}

fn tls(ca: &Path) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: Some(ca.to_owned()),
        ..Default::default()
    }
}

/// Connects and asks for Cluster.Status: the first call proves the whole
/// handshake (a TLS 1.3 server checks a client certificate after the
/// client thinks it is done).
async fn status_with(addr: &str, tls: ClientTlsFiles) -> Result<(), String> {
    let opts = ConnectOptions { token: None, tls };
    let mut client = Client::connect_with(addr, &opts)
        .await
        .map_err(|e| format!("{e:#}"))?;
    client
        .status()
        .await
        .map(|_| ())
        .map_err(|s| format!("{s}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_node_serves_clients_that_trust_its_ca() {
    let pki = Pki::new();
    let ca = Ca::new("dfs test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let (cert, key) = pki.pair(
        "server",
        ca.issue(LOCAL, ExtendedKeyUsagePurpose::ServerAuth, false),
    );
    let node = tls_node(&cert, &key, &[]).await;

    let opts = ConnectOptions {
        token: None,
        tls: tls(&ca_file),
    };
    let mut client = Client::connect_with(node.addr(), &opts).await.unwrap();
    let data = pseudo_random(3, 3 * CHUNK + 17);
    let header = dfs::proto::UploadHeader {
        key: "over-tls".into(),
        ..Default::default()
    };
    let info = client
        .upload(header, std::io::Cursor::new(data.clone()), |_| {})
        .await
        .unwrap();
    assert_eq!(info.sha1, sha1_hex(&data));
    let (_, _, _, back) = client
        .download(Client::key_request("over-tls"), Vec::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(back, data);
    let health = client.health("").await.unwrap();
    assert_eq!(health.as_str_name(), "SERVING");

    // The same name by DNS, and the address given as https://.
    let port = node.addr().rsplit(':').next().unwrap();
    status_with(&format!("localhost:{port}"), tls(&ca_file))
        .await
        .unwrap();
    status_with(&format!("https://127.0.0.1:{port}"), tls(&ca_file))
        .await
        .unwrap();

    // A plaintext client gets nowhere on the TLS port.
    let plain = async {
        let mut c = Client::connect(node.addr(), None).await?;
        Ok::<_, anyhow::Error>(c.status().await?)
    };
    let plain = tokio::time::timeout(Duration::from_secs(20), plain).await;
    assert!(
        matches!(plain, Ok(Err(_))),
        "plaintext call on the TLS port: {plain:?}"
    );
    // Loopback: no warning about plaintext exposure.
    assert!(
        !node.log().contains("plaintext and reachable"),
        "{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_refuse_a_wrong_ca_an_expired_certificate_and_another_hosts() {
    let pki = Pki::new();
    let ca = Ca::new("dfs test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let other_ca_file = pki.write("other-ca.pem", &Ca::new("some other CA").pem);
    let server = ExtendedKeyUsagePurpose::ServerAuth;

    let (cert, key) = pki.pair("good", ca.issue(LOCAL, server.clone(), false));
    let good = tls_node(&cert, &key, &[]).await;
    status_with(good.addr(), tls(&ca_file)).await.unwrap();
    let err = status_with(good.addr(), tls(&other_ca_file))
        .await
        .unwrap_err();
    assert!(err.to_lowercase().contains("issuer"), "wrong CA: {err}");

    let (cert, key) = pki.pair("expired", ca.issue(LOCAL, server.clone(), true));
    let expired = tls_node(&cert, &key, &[]).await;
    let err = status_with(expired.addr(), tls(&ca_file))
        .await
        .unwrap_err();
    assert!(
        err.contains("certificate expired"),
        "expired certificate: {err}"
    );

    let (cert, key) = pki.pair("elsewhere", ca.issue(&["db.example"], server, false));
    let elsewhere = tls_node(&cert, &key, &[]).await;
    let err = status_with(elsewhere.addr(), tls(&ca_file))
        .await
        .unwrap_err();
    assert!(
        err.contains("not valid for name"),
        "certificate for another host: {err}"
    );
    // The refusal was about the name: naming the host the certificate holds works.
    let named = ClientTlsFiles {
        server_name: Some("db.example".into()),
        ..tls(&ca_file)
    };
    status_with(elsewhere.addr(), named).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_node_requires_a_client_certificate_from_its_client_ca() {
    let pki = Pki::new();
    let ca = Ca::new("dfs test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let client_ca = Ca::new("dfs client CA");
    let client_ca_file = pki.write("client-ca.pem", &client_ca.pem);
    let stranger_ca = Ca::new("stranger CA");
    let (cert, key) = pki.pair(
        "server",
        ca.issue(LOCAL, ExtendedKeyUsagePurpose::ServerAuth, false),
    );
    let node = tls_node(&cert, &key, &["--tls-client-ca-file", s(&client_ca_file)]).await;

    let client_usage = ExtendedKeyUsagePurpose::ClientAuth;
    let (good_cert, good_key) = pki.pair(
        "client",
        client_ca.issue(&["app"], client_usage.clone(), false),
    );
    let with = |cert: &PathBuf, key: &PathBuf| ClientTlsFiles {
        cert: Some(cert.clone()),
        key: Some(key.clone()),
        ..tls(&ca_file)
    };
    status_with(node.addr(), with(&good_cert, &good_key))
        .await
        .unwrap();

    let err = status_with(node.addr(), tls(&ca_file)).await.unwrap_err();
    eprintln!("without a client certificate: {err}");
    let (cert, key) = pki.pair(
        "stranger",
        stranger_ca.issue(&["app"], client_usage.clone(), false),
    );
    let err = status_with(node.addr(), with(&cert, &key))
        .await
        .unwrap_err();
    eprintln!("with a certificate from another CA: {err}");
    let (cert, key) = pki.pair(
        "expired-client",
        client_ca.issue(&["app"], client_usage, true),
    );
    let err = status_with(node.addr(), with(&cert, &key))
        .await
        .unwrap_err();
    eprintln!("with an expired client certificate: {err}");

    // The refused handshakes cost the node nothing.
    status_with(node.addr(), with(&good_cert, &good_key))
        .await
        .unwrap();
}

/// Runs `dfs node` with `flags`, which must make it exit, and returns stderr.
async fn start_failure(flags: &[&str]) -> String {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let mut args = vec![
        "node",
        "--data",
        s(&data),
        "--grpc-addr",
        "127.0.0.1:0",
        "--p2p-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(flags);
    let out = tokio::time::timeout(Duration::from_secs(20), run_dfs(&args))
        .await
        .unwrap_or_else(|_| panic!("dfs node {flags:?} did not exit"));
    assert!(!out.status.success(), "dfs node {flags:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tls_files_stop_the_node_with_a_clear_error() {
    let pki = Pki::new();
    let ca = Ca::new("dfs test CA");
    let usage = ExtendedKeyUsagePurpose::ServerAuth;
    let (cert, key) = pki.pair("server", ca.issue(LOCAL, usage.clone(), false));
    let (_, other_key) = pki.pair("other", ca.issue(LOCAL, usage, false));
    let missing = pki.dir.path().join("missing.pem");
    let garbage = pki.write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--tls-cert-file", s(&missing), "--tls-key-file", s(&key)],
            &["cannot read TLS certificate", "missing.pem"],
        ),
        (
            &["--tls-cert-file", s(&cert), "--tls-key-file", s(&other_key)],
            &["other.key does not belong to certificate", "server.crt"],
        ),
        (
            &["--tls-cert-file", s(&key), "--tls-key-file", s(&key)],
            &["server.key holds no PEM certificate"],
        ),
        (
            &["--tls-cert-file", s(&cert), "--tls-key-file", s(&cert)],
            &["server.crt holds no PEM private key"],
        ),
        (
            &["--tls-cert-file", s(&garbage), "--tls-key-file", s(&key)],
            &["garbage.pem is not PEM"],
        ),
        (
            &[
                "--tls-cert-file",
                s(&cert),
                "--tls-key-file",
                s(&key),
                "--tls-client-ca-file",
                s(&key),
            ],
            &["client CA file", "server.key holds no PEM certificate"],
        ),
        (&["--tls-cert-file", s(&cert)], &["--tls-key-file"]),
        (&["--tls-client-ca-file", s(&cert)], &["--tls-cert-file"]),
    ];
    for (flags, needles) in cases {
        let err = start_failure(flags).await;
        for needle in *needles {
            assert!(err.contains(needle), "{flags:?}: no {needle:?} in: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_commands_take_tls_flags_and_their_env_twins() {
    let pki = Pki::new();
    let ca = Ca::new("dfs test CA");
    let ca_file = pki.write("ca.pem", &ca.pem);
    let client_ca = Ca::new("dfs client CA");
    let client_ca_file = pki.write("client-ca.pem", &client_ca.pem);
    let (cert, key) = pki.pair(
        "server",
        ca.issue(LOCAL, ExtendedKeyUsagePurpose::ServerAuth, false),
    );
    let (ccert, ckey) = pki.pair(
        "client",
        client_ca.issue(&["cli"], ExtendedKeyUsagePurpose::ClientAuth, false),
    );
    let node = tls_node(&cert, &key, &["--tls-client-ca-file", s(&client_ca_file)]).await;
    let file = pki.write("hello.txt", "hello over mutual TLS\n");
    let addr = node.addr();

    let tls_flags = [
        "--ca-file",
        s(&ca_file),
        "--cert-file",
        s(&ccert),
        "--key-file",
        s(&ckey),
    ];
    let mut put = vec!["put", s(&file), "--key", "hello", "--node", addr];
    put.extend_from_slice(&tls_flags);
    let out = run_dfs(&put).await;
    assert!(out.status.success(), "put: {out:?}");

    // The same through the environment twins.
    let out = tokio::process::Command::new(dfs_bin())
        .args(["ls", "--node", addr])
        .env("DFS_CA_FILE", &ca_file)
        .env("DFS_CERT_FILE", &ccert)
        .env("DFS_KEY_FILE", &ckey)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "ls: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello"),
        "{out:?}"
    );

    let mut health = vec!["health", "--node", addr, "--service", "liveness"];
    health.extend_from_slice(&tls_flags);
    let out = run_dfs(&health).await;
    assert!(out.status.success(), "health: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    // Without a client certificate, or without TLS: one line, non-zero.
    for args in [
        vec!["ls", "--node", addr, "--ca-file", s(&ca_file)],
        vec!["ls", "--node", addr],
    ] {
        let out = tokio::time::timeout(Duration::from_secs(30), run_dfs(&args))
            .await
            .expect("dfs ls exits");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    let out = run_dfs(&[
        "ls",
        "--node",
        &format!("http://{addr}"),
        "--ca-file",
        s(&ca_file),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("http://"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_command_exits_zero_only_for_serving() {
    let node = TestNode::start(&[]).await;
    let out = run_dfs(&["health", "--node", node.addr()]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    let out = run_dfs(&[
        "health",
        "--node",
        node.addr(),
        "--service",
        "no.such.Service",
    ])
    .await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"),
        "{out:?}"
    );

    // Nobody listening: a failure within the timeout, not a hang.
    let port = free_port();
    let args = [
        "health",
        "--node",
        &format!("127.0.0.1:{port}"),
        "--timeout",
        "2s",
    ];
    let out = tokio::time::timeout(Duration::from_secs(30), run_dfs(&args))
        .await
        .expect("dfs health gives up by itself");
    assert!(!out.status.success(), "{out:?}");
}
