//! Scoped bearer tokens on the gRPC API, against real node processes: each
//! role's allowed and refused calls, the one-token file of old, start-up
//! failures for bad token files, and revocation by SIGHUP.

mod common;

use std::{fs, path::Path, time::Duration};

use common::*;
use dfs::client::Client;
use dfs::proto::UploadHeader;
use tonic::Code;

const READ: &str = "read-token-0123456789";
const WRITE: &str = "write-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

fn token_file(dir: &Path, text: &str) -> String {
    let path = dir.join("tokens");
    // Replaced by rename, as an operator's tooling would: the node never
    // reads a half-written file.
    let tmp = dir.join("tokens.tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, &path).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn node_with_tokens(text: &str) -> TestNode {
    let mut node = TestNode::new(&[]);
    let path = token_file(node.root(), text);
    node.add_args(&["--auth-token-file", &path]);
    node.launch().await;
    node
}

fn header(key: &str) -> UploadHeader {
    UploadHeader {
        key: key.to_owned(),
        ..Default::default()
    }
}

async fn put(client: &mut Client, key: &str, data: &[u8]) -> Result<(), Code> {
    client
        .upload(header(key), std::io::Cursor::new(data.to_vec()), |_| {})
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

/// Every call a client can make, each reduced to Ok or its status code.
struct Outcomes {
    download: Result<(), Code>,
    stat: Result<(), Code>,
    list: Result<(), Code>,
    status: Result<(), Code>,
    upload: Result<(), Code>,
    delete: Result<(), Code>,
    forget: Result<(), Code>,
}

async fn try_every_call(
    node: &TestNode,
    token: Option<&str>,
    existing: &str,
    delete: &str,
) -> Outcomes {
    let mut c = node.client(token).await;
    let download = c
        .download(Client::key_request(existing), std::io::sink(), |_| {})
        .await
        .map(|_| ());
    Outcomes {
        download: download.map_err(|s| s.code()),
        stat: c.stat(existing).await.map(|_| ()).map_err(|s| s.code()),
        list: c.list_all("").await.map(|_| ()).map_err(|s| s.code()),
        status: c.status().await.map(|_| ()).map_err(|s| s.code()),
        upload: put(&mut c, &format!("by-{}", token.unwrap_or("none")), b"new").await,
        delete: c.delete(delete).await.map_err(|s| s.code()),
        // An unknown id: an admin gets past auth to NOT_FOUND.
        forget: c.forget_member("no-such-node").await.map_err(|s| s.code()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_gets_its_calls_and_is_refused_the_rest() {
    let node = node_with_tokens(&format!(
        "# dfs tokens\n\nread {READ}   # dashboards\nwrite\t{WRITE}\nadmin {ADMIN}\n"
    ))
    .await;
    let mut admin = node.client(Some(ADMIN)).await;
    let data = pseudo_random(1, 2 * CHUNK + 5);
    put(&mut admin, "existing", &data).await.unwrap();

    let denied = Err(Code::PermissionDenied);
    // The read token tries to delete what exists; the others a key that
    // was never stored, which a call past auth finds NOT_FOUND.
    let r = try_every_call(&node, Some(READ), "existing", "existing").await;
    assert_eq!(
        [r.download, r.stat, r.list, r.status],
        [Ok(()), Ok(()), Ok(()), Ok(())],
        "read calls with a read token"
    );
    assert_eq!([r.upload, r.delete, r.forget], [denied, denied, denied]);

    let w = try_every_call(&node, Some(WRITE), "existing", "never-stored").await;
    assert_eq!(
        [w.download, w.stat, w.list, w.status, w.upload],
        [Ok(()), Ok(()), Ok(()), Ok(()), Ok(())],
        "read and write calls with a write token"
    );
    assert_eq!(w.delete, Err(Code::NotFound), "write reaches Delete");
    assert_eq!(w.forget, denied);

    let a = try_every_call(&node, Some(ADMIN), "existing", "never-stored").await;
    assert_eq!(
        [a.download, a.stat, a.list, a.status, a.upload],
        [Ok(()), Ok(()), Ok(()), Ok(()), Ok(())],
        "every call with an admin token"
    );
    assert_eq!(a.delete, Err(Code::NotFound), "admin reaches Delete");
    assert_eq!(a.forget, Err(Code::NotFound), "admin reaches ForgetMember");

    // The refused delete deleted nothing, the refused upload stored
    // nothing; the allowed ones did.
    assert_eq!(
        admin.stat("existing").await.unwrap().size,
        data.len() as u64
    );
    let keys: Vec<String> = admin
        .list_all("by-")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, [format!("by-{ADMIN}"), format!("by-{WRITE}")]);

    // The refusal says which role the call needs.
    let mut reader = node.client(Some(READ)).await;
    let err = reader
        .upload(header("x"), std::io::Cursor::new(vec![1u8]), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("role write") && err.message().contains("has role read"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_or_missing_tokens_are_unauthenticated_and_health_stays_open() {
    let node = node_with_tokens(&format!("read {READ}\n")).await;
    let none = try_every_call(&node, None, "k", "k").await;
    let wrong = try_every_call(&node, Some("read-token-0123456788"), "k", "k").await;
    for o in [none, wrong] {
        let unauth = Err(Code::Unauthenticated);
        assert_eq!(
            [
                o.download, o.stat, o.list, o.status, o.upload, o.delete, o.forget
            ],
            [unauth; 7]
        );
    }
    assert!(node.is_serving().await, "health answers without a token");
    // So does the probe command.
    let out = run_dfs(&["health", "--node", node.addr(), "--service", "liveness"]).await;
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_with_one_bare_token_grants_everything() {
    let node = node_with_tokens("  old-style-token \n").await;
    let a = try_every_call(&node, Some("old-style-token"), "missing", "missing").await;
    assert_eq!(a.upload, Ok(()));
    assert_eq!(a.delete, Err(Code::NotFound));
    assert_eq!(a.status, Ok(()));
    assert_eq!(a.forget, Err(Code::NotFound), "the bare token is admin");
    assert_eq!(a.stat, Err(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_token_file_fails_start_up_naming_the_line() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let cases: &[(&str, &str)] = &[
        (
            "read ok-token\nsuperuser tok2\n",
            "line 2: the role is not one of read, write, admin",
        ),
        ("read a b\n", "line 1: expected `ROLE TOKEN`"),
        ("tok1\ntok2\n", "line 2"),
        ("# nothing but a comment\n", "holds no token"),
    ];
    for (text, needle) in cases {
        let path = token_file(work.path(), text);
        let args = [
            "node",
            "--data",
            data.to_str().unwrap(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--p2p-addr",
            "127.0.0.1:0",
            "--auth-token-file",
            &path,
        ];
        let out = tokio::time::timeout(Duration::from_secs(20), run_dfs(&args))
            .await
            .unwrap_or_else(|_| panic!("dfs node with token file {text:?} did not exit"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {text:?}");
        assert!(err.contains(needle), "{text:?}: {err}");
        assert!(!err.contains("tok2") && !err.contains("ok-token"), "{err}");
    }
    let missing = work.path().join("no-such-tokens");
    let out = run_dfs(&[
        "node",
        "--data",
        data.to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--p2p-addr",
        "127.0.0.1:0",
        "--auth-token-file",
        missing.to_str().unwrap(),
    ])
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read auth token file") && err.contains("no-such-tokens"),
        "{err}"
    );
}

/// The role a token has right now, as the node answers a Status call.
async fn status_code(node: &TestNode, token: &str) -> Result<(), Code> {
    node.client(Some(token))
        .await
        .status()
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rereads_the_token_file_and_a_broken_one_changes_nothing() {
    let mut node = TestNode::new(&[]);
    let path = token_file(node.root(), &format!("admin {ADMIN}\nread {READ}\n"));
    node.add_args(&["--auth-token-file", &path]);
    node.launch().await;
    assert_eq!(status_code(&node, READ).await, Ok(()));
    assert_eq!(status_code(&node, WRITE).await, Err(Code::Unauthenticated));

    // Revoke READ, add WRITE, then SIGHUP: no restart.
    let pid = node.pid();
    token_file(node.root(), &format!("admin {ADMIN}\nwrite {WRITE}\n"));
    node.signal(libc::SIGHUP);
    let reloaded = wait_until_async(Duration::from_secs(20), || async {
        status_code(&node, READ).await == Err(Code::Unauthenticated)
    })
    .await;
    assert!(
        reloaded,
        "READ still accepted after SIGHUP; log:\n{}",
        node.log()
    );
    assert_eq!(status_code(&node, WRITE).await, Ok(()));
    assert_eq!(status_code(&node, ADMIN).await, Ok(()));
    assert_eq!(node.pid(), pid);

    // A file that does not parse: the node says so and keeps the old set.
    token_file(
        node.root(),
        &format!("admin {ADMIN}\nwrite {WRITE} extra\n"),
    );
    node.signal(libc::SIGHUP);
    let complained = wait_until(Duration::from_secs(20), || {
        node.log().contains("auth token file reload failed")
    })
    .await;
    assert!(complained, "no reload error logged:\n{}", node.log());
    assert_eq!(status_code(&node, WRITE).await, Ok(()));
    assert_eq!(status_code(&node, ADMIN).await, Ok(()));
    assert_eq!(status_code(&node, READ).await, Err(Code::Unauthenticated));
    assert!(node.is_running());
}
