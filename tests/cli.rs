//! The `dfs` command line against a real node: results on stdout, one-line
//! errors on stderr, non-zero exit on failure, no partial files.

mod common;

use std::{fs, path::Path, process::Output};

use common::*;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: exit {}, stderr: {}",
        o.status,
        stderr(o)
    );
}

/// A failed command: non-zero exit and exactly one line on stderr.
#[track_caller]
fn assert_one_line_failure(o: &Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what}: succeeded, stdout: {}",
        stdout(o)
    );
    let err = stderr(o);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: stderr is not one line: {err:?}"
    );
    err.trim_end().to_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn put_get_ls_stat_rm_status_work_end_to_end() {
    let node = TestNode::start(&[]).await;
    let addr = node.addr().to_owned();
    let work = tempfile::tempdir().unwrap();
    let data = pseudo_random(400, 3 * CHUNK + 11);
    let input = work.path().join("input.bin");
    fs::write(&input, &data).unwrap();
    let sha = sha1_hex(&data);

    let put = run_dfs(&[
        "put",
        input.to_str().unwrap(),
        "--key",
        "dir/file.bin",
        "--node",
        &addr,
    ])
    .await;
    assert_ok(&put, "put");
    assert_eq!(
        stdout(&put),
        format!("dir/file.bin\t{}\t{sha}\n", data.len())
    );

    // Default key: the file's name.
    let put = run_dfs(&["put", input.to_str().unwrap(), "--node", &addr]).await;
    assert_ok(&put, "put with the default key");
    assert!(stdout(&put).starts_with("input.bin\t"), "{}", stdout(&put));

    let out = work.path().join("out.bin");
    let get = run_dfs(&[
        "get",
        "dir/file.bin",
        "-o",
        out.to_str().unwrap(),
        "--node",
        &addr,
    ])
    .await;
    assert_ok(&get, "get");
    assert!(fs::read(&out).unwrap() == data, "get wrote different bytes");
    assert!(
        !entries(work.path())
            .iter()
            .any(|n| n.starts_with(".dfs-partial")),
        "partial file left behind"
    );

    let get = run_dfs(&["get", "dir/file.bin", "-o", "-", "--node", &addr]).await;
    assert_ok(&get, "get to stdout");
    assert!(get.stdout == data, "get -o - wrote different bytes");

    let ls = run_dfs(&["ls", "--node", &addr]).await;
    assert_ok(&ls, "ls");
    assert_eq!(
        stdout(&ls),
        format!(
            "{n}\t{sha}\tdir/file.bin\n{n}\t{sha}\tinput.bin\n",
            n = data.len()
        )
    );
    let ls = run_dfs(&["ls", "dir/", "--node", &addr]).await;
    assert_ok(&ls, "ls with a prefix");
    assert_eq!(stdout(&ls).lines().count(), 1);
    let ls = run_dfs(&["ls", "--json", "--node", &addr]).await;
    assert_ok(&ls, "ls --json");
    let json: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    let stat = run_dfs(&["stat", "dir/file.bin", "--node", &addr]).await;
    assert_ok(&stat, "stat");
    assert!(stdout(&stat).contains(&sha), "{}", stdout(&stat));
    let stat = run_dfs(&["stat", "dir/file.bin", "--json", "--node", &addr]).await;
    assert_ok(&stat, "stat --json");
    let json: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(json["sha1"], sha.as_str());
    assert_eq!(json["size"], data.len() as u64);
    assert_eq!(json["chunk_count"], 4);

    let status = run_dfs(&["status", "--json", "--node", &addr]).await;
    assert_ok(&status, "status --json");
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["object_count"], 2);
    assert_eq!(json["chunk_count"], 4, "two keys, one set of chunks");
    let status = run_dfs(&["status", "--node", &addr]).await;
    assert_ok(&status, "status");
    assert!(stdout(&status).contains(&addr));

    let rm = run_dfs(&["rm", "dir/file.bin", "--node", &addr]).await;
    assert_ok(&rm, "rm");
    let stat = run_dfs(&["stat", "dir/file.bin", "--node", &addr]).await;
    let err = assert_one_line_failure(&stat, "stat after rm");
    assert!(err.contains("NOT_FOUND"), "{err}");
    let rm = run_dfs(&["rm", "dir/file.bin", "--node", &addr]).await;
    let err = assert_one_line_failure(&rm, "second rm");
    assert!(err.contains("NOT_FOUND"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_of_an_unknown_key_fails_cleanly_and_writes_nothing() {
    let node = TestNode::start(&[]).await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("never.bin");
    let get = run_dfs(&[
        "get",
        "no/such/key",
        "-o",
        out.to_str().unwrap(),
        "--node",
        node.addr(),
    ])
    .await;
    let err = assert_one_line_failure(&get, "get of an unknown key");
    assert!(err.contains("NOT_FOUND"), "{err}");
    assert!(!out.exists(), "a file was left at the -o path");
    assert!(
        entries(work.path()).is_empty(),
        "left: {:?}",
        entries(work.path())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn get_of_a_corrupt_object_leaves_no_partial_file() {
    let mut node = TestNode::new(&[]);
    let key_file = node.use_key_file(401);
    node.launch().await;
    let mut storage = node.storage().await;
    let data = pseudo_random(401, 6 * CHUNK);
    upload(&mut storage, "bad", &data, CHUNK).await.unwrap();
    // Damage the last chunk, so five good chunks stream out (and are
    // written to the partial file) before the failure.
    let last = chunk_path(&node.data_dir(), &chunk_ids(&key_file, &data)[5]);
    damage_file(&last, None, Damage::FlipByte);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("bad.bin");
    let get = run_dfs(&[
        "get",
        "bad",
        "-o",
        out.to_str().unwrap(),
        "--node",
        node.addr(),
    ])
    .await;
    let err = assert_one_line_failure(&get, "get of a corrupt object");
    assert!(err.contains("DATA_LOSS"), "{err}");
    assert!(!out.exists(), "a partial file was left at the -o path");
    assert!(
        entries(work.path()).is_empty(),
        "left: {:?}",
        entries(work.path())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_commands_fail_with_one_line_errors() {
    let node = TestNode::start(&[]).await;
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("missing.bin");
    let put = run_dfs(&["put", missing.to_str().unwrap(), "--node", node.addr()]).await;
    assert_one_line_failure(&put, "put of a missing file");

    let file = work.path().join("f");
    fs::write(&file, b"x").unwrap();
    let put = run_dfs(&[
        "put",
        file.to_str().unwrap(),
        "--key",
        "",
        "--node",
        node.addr(),
    ])
    .await;
    let err = assert_one_line_failure(&put, "put with an empty key");
    assert!(err.contains("INVALID_ARGUMENT"), "{err}");

    // Nothing listens on port 1.
    let ls = run_dfs(&["ls", "--node", "127.0.0.1:1"]).await;
    assert_one_line_failure(&ls, "ls against no node");
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_sends_the_token_from_a_token_file() {
    let mut node = TestNode::new(&[]);
    let token_file = node.use_token("tok-123");
    node.launch().await;
    let ls = run_dfs(&["ls", "--node", node.addr()]).await;
    let err = assert_one_line_failure(&ls, "ls without a token");
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    let ls = run_dfs(&[
        "ls",
        "--node",
        node.addr(),
        "--token-file",
        token_file.to_str().unwrap(),
    ])
    .await;
    assert_ok(&ls, "ls with the token file");
}

#[tokio::test(flavor = "multi_thread")]
async fn keygen_writes_a_key_and_refuses_to_overwrite() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("cluster.key");
    let out = run_dfs(&["keygen", "--out", path.to_str().unwrap()]).await;
    assert_ok(&out, "keygen");
    let key = fs::read_to_string(&path).unwrap();
    let hex = key.trim();
    assert_eq!(hex.len(), 64, "{key:?}");
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file readable by its owner only");

    let again = run_dfs(&["keygen", "--out", path.to_str().unwrap()]).await;
    assert_one_line_failure(&again, "keygen over an existing file");
    assert_eq!(fs::read_to_string(&path).unwrap(), key, "key overwritten");

    // A node accepts the generated key.
    let node = TestNode::start(&["--cluster-key-file", path.to_str().unwrap()]).await;
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_rejects_bad_flag_values_with_a_clear_message() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let data = data.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--chunk-size", "12parsecs"], "12parsecs"),
        (&["--chunk-size", "1KiB"], "chunk size"),
        (&["--gc-grace", "5"], "5"),
        (&["--capacity", "lots"], "lots"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["--data", data];
        args.extend_from_slice(flags);
        let err = refuse_to_start(&args).await;
        assert!(
            err.contains(needle),
            "dfs node {flags:?}: message does not mention {needle:?}: {err}"
        );
    }
    // A missing key file is reported, not replaced by a new key.
    let missing = work.path().join("no-such.key");
    let err = refuse_to_start(&[
        "--data",
        data,
        "--cluster-key-file",
        missing.to_str().unwrap(),
    ])
    .await;
    assert!(err.contains("no-such.key"), "{err}");
    // W cannot exceed R.
    let err = refuse_to_start(&["--data", data, "--replicas", "2", "--write-quorum", "3"]).await;
    assert!(err.contains("--write-quorum"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_into_a_fifo_writes_through_it_and_leaves_it_a_fifo() {
    use std::os::unix::fs::FileTypeExt;
    let node = TestNode::start(&[]).await;
    let data = pseudo_random(77, 3 * CHUNK + 9);
    upload(&mut node.storage().await, "piped", &data, CHUNK)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("pipe");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || fs::read(reader_path).unwrap());
    let get = run_dfs(&[
        "get",
        "piped",
        "-o",
        fifo.to_str().unwrap(),
        "--node",
        node.addr(),
    ])
    .await;
    assert_ok(&get, "get into a fifo");
    // Renaming a temp file over the target would have replaced the FIFO
    // (with /dev/null, the device itself). Checked before joining the
    // reader, which would otherwise wait for a writer forever.
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(reader.join().unwrap() == data, "bytes through the fifo");
    assert_eq!(entries(work.path()).len(), 1, "no partial file left behind");
}

/// `dfs get` re-checks the whole-file SHA-1 of what it received. A node
/// verifies every chunk but not the whole file, so the check can only fire
/// when a record lies about the file: here a peer (a client of the peer
/// protocol holding the cluster key) pushes a newer version of a record
/// whose chunks are right and whose SHA-1 is not.
#[tokio::test(flavor = "multi_thread")]
async fn get_rechecks_the_whole_file_sha1_and_keeps_no_file_on_a_mismatch() {
    use common::peer::{peer_pool, peer_request};
    use dfs::proto::{GetRecord, IndexUpdate, get_record, peer_message::Kind};
    let mut node = TestNode::new(&[]);
    let key_file = node.use_key_file(410);
    node.launch().await;
    let data = pseudo_random(410, 3 * CHUNK + 7);
    upload(&mut node.storage().await, "lie", &data, CHUNK)
        .await
        .unwrap();
    let pool = peer_pool(&key_file, "127.0.0.1:9");
    let p2p = node.p2p_addr().await;
    let reply = peer_request(
        &pool,
        &p2p,
        Kind::GetRecord(GetRecord {
            target: Some(get_record::Target::Key("lie".into())),
        }),
        None,
    )
    .await;
    let Some(Kind::GetRecordReply(r)) = reply.msg.kind else {
        panic!("{:?}", reply.msg);
    };
    let mut record = r.record.expect("the node has the record");
    let mut wrong = record.sha1.to_vec();
    wrong[0] ^= 0xff;
    record.sha1 = wrong.clone().into();
    let version = record.version.as_mut().expect("a version");
    version.hlc += 1;
    let reply = peer_request(
        &pool,
        &p2p,
        Kind::IndexUpdate(IndexUpdate {
            records: vec![record],
        }),
        None,
    )
    .await;
    assert!(
        matches!(reply.msg.kind, Some(Kind::IndexUpdateReply(ref u)) if u.applied == 1),
        "{:?}",
        reply.msg
    );
    let info = stat_key(&mut node.storage().await, "lie").await.unwrap();
    assert_eq!(
        info.sha1,
        hex::encode(&wrong),
        "the lying record is the live one"
    );

    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("lie.bin");
    let get = run_dfs(&[
        "get",
        "lie",
        "-o",
        out.to_str().unwrap(),
        "--node",
        node.addr(),
    ])
    .await;
    let err = assert_one_line_failure(&get, "get of an object whose record lies");
    assert!(err.contains("DATA_LOSS") && err.contains("sha1"), "{err}");
    assert!(
        !out.exists(),
        "a file with unverified content was left at the -o path"
    );
    assert!(
        entries(work.path()).is_empty(),
        "left: {:?}",
        entries(work.path())
    );
    // To stdout the bytes are gone already; the exit status still says no.
    let get = run_dfs(&["get", "lie", "-o", "-", "--node", node.addr()]).await;
    let err = assert_one_line_failure(&get, "get -o - of an object whose record lies");
    assert!(err.contains("DATA_LOSS"), "{err}");
    assert!(get.stdout == data, "the chunks themselves verified");
}
