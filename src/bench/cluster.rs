//! `dfs bench --nodes N`: a local cluster on one machine. Upload and download
//! through the first node, CPU seconds per GiB stored summed over every
//! node, each node's peak RSS, and the time to restore R copies after a
//! node is killed, with client throughput measured while repair runs.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use super::{MB, MachineLimits, RandomReader, proc_cpu_seconds, start_node};
use crate::{client::Client, proto::UploadHeader, units::format_size};

struct BenchNode {
    child: Option<tokio::process::Child>,
    pid: u32,
    addr: String,
    data: std::path::PathBuf,
}

impl BenchNode {
    fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid).unwrap_or(0.0)
    }
    fn peak_rss(&self) -> u64 {
        crate::grpc::peak_rss_of(&self.pid.to_string()).unwrap_or(0)
    }
}

pub(super) async fn run(
    args: &super::BenchArgs,
    limits: &MachineLimits,
    dir: &Path,
) -> anyhow::Result<()> {
    let r = args.replicas.clamp(1, args.nodes);
    // A key the bench knows, so it can compute chunk ids and watch copies.
    let secret = crate::crypto::ClusterSecret::generate();
    let key_file = dir.join("cluster.key");
    secret.write_new_file(&key_file)?;
    let keys = crate::crypto::Keys::derive(&secret);
    let flags = format!(
        "--replicas {r} --dead-after 2s --repair-interval 1s --sync-interval 5s \
         --cluster-key-file {} {}",
        key_file.display(),
        args.node_args
    );
    let mut nodes: Vec<BenchNode> = Vec::new();
    let mut seed = String::new();
    for i in 0..args.nodes {
        let extra = if i == 0 {
            flags.clone()
        } else {
            format!("{flags} --peer {seed}")
        };
        let data = dir.join(format!("node{i}"));
        let (child, addr) = start_node(&data, &extra).await?;
        let pid = child.id().unwrap_or(0);
        if i == 0 {
            seed = Client::connect(&addr, None)
                .await?
                .status()
                .await?
                .p2p_address;
        }
        nodes.push(BenchNode {
            child: Some(child),
            pid,
            addr,
            data,
        });
    }
    let result = measure(args, limits, r, &keys, &mut nodes).await;
    for n in &mut nodes {
        if let Some(mut c) = n.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
    result
}

async fn wait_members(nodes: &[BenchNode]) -> anyhow::Result<()> {
    for n in nodes.iter().filter(|n| n.child.is_some()) {
        let mut c = Client::connect(&n.addr, None).await?;
        c.wait_for_peers_up(nodes.len() - 1, Duration::from_secs(30))
            .await?;
    }
    Ok(())
}

async fn measure(
    args: &super::BenchArgs,
    limits: &MachineLimits,
    r: usize,
    keys: &crate::crypto::Keys,
    nodes: &mut [BenchNode],
) -> anyhow::Result<()> {
    wait_members(nodes).await?;
    let mut client = Client::connect(&nodes[0].addr, None).await?;
    println!(
        "cluster: {} nodes, R={r}, client and every node on this machine",
        nodes.len()
    );

    let cpu_before: Vec<f64> = nodes.iter().map(BenchNode::cpu_seconds).collect();
    let header = UploadHeader {
        key: "bench/cluster".into(),
        ..Default::default()
    };
    let started = Instant::now();
    let info = client
        .upload(header, RandomReader::new(args.size, 0xc1u64), |_| {})
        .await?;
    let up_secs = started.elapsed().as_secs_f64();
    let cpu_up: Vec<f64> = nodes
        .iter()
        .zip(&cpu_before)
        .map(|(n, before)| n.cpu_seconds() - before)
        .collect();

    let cpu_before: f64 = nodes.iter().map(BenchNode::cpu_seconds).sum();
    let started = Instant::now();
    let (_, got) = client
        .download_discard(Client::key_request("bench/cluster"))
        .await?;
    let down_secs = started.elapsed().as_secs_f64();
    let cpu_down: f64 = nodes.iter().map(BenchNode::cpu_seconds).sum::<f64>() - cpu_before;
    anyhow::ensure!(got == info.size, "downloaded {got} of {} bytes", info.size);

    let gib = args.size as f64 / (1u64 << 30) as f64;
    println!(
        "  upload    {:>8.0} MB/s  ({:.2} s)",
        args.size as f64 / up_secs / MB,
        up_secs
    );
    println!(
        "  download  {:>8.0} MB/s  ({:.2} s)",
        args.size as f64 / down_secs / MB,
        down_secs
    );
    print_stored_cpu(limits, r, &cpu_up, gib);
    println!(
        "  CPU per GiB downloaded, all nodes: {:.2} s",
        cpu_down / gib
    );
    for (i, n) in nodes.iter().enumerate() {
        println!(
            "  node{} peak RSS (VmHWM): {}",
            i + 1,
            format_size(n.peak_rss())
        );
    }
    client.delete("bench/cluster").await?;

    if args.small_objects > 0 {
        // Through node1, which writes each object's chunk and record to
        // R nodes (W of them before it answers).
        super::small_objects(client.clone(), args.small_objects, args.concurrency).await?;
    }
    if args.repair_size > 0 && nodes.len() > r.max(1) - 1 && nodes.len() >= 3 {
        repair(args, r, keys, nodes).await?;
    }
    Ok(())
}

/// Stores `repair_size`, kills the last node, and times how long the
/// survivors take to hold R copies of every chunk again, while a client
/// uploads through a survivor.
async fn repair(
    args: &super::BenchArgs,
    r: usize,
    keys: &crate::crypto::Keys,
    nodes: &mut [BenchNode],
) -> anyhow::Result<()> {
    const SEED: u64 = 0xbeef;
    let mut client = Client::connect(&nodes[0].addr, None).await?;
    let header = UploadHeader {
        key: "bench/repair".into(),
        ..Default::default()
    };
    let info = client
        .upload(header, RandomReader::new(args.repair_size, SEED), |_| {})
        .await?;
    // The object's chunk ids, from the same pseudo-random bytes.
    let ids = tokio::task::block_in_place(|| {
        let mut reader = RandomReader::new(0, SEED);
        let mut buf = vec![0u8; info.chunk_size as usize];
        let mut left = info.size;
        let mut ids = Vec::new();
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            reader.fill(&mut buf[..n]);
            ids.push(keys.chunk_id(&buf[..n]));
            left -= n as u64;
        }
        ids
    });
    let victim = nodes.len() - 1;
    let want = r.min(victim);
    let copies = |nodes: &[BenchNode]| -> (usize, usize) {
        let mut short = 0;
        let mut lost_with_victim = 0;
        for id in &ids {
            let on = |n: &BenchNode| chunk_path(&n.data, id).is_file();
            if nodes[..victim].iter().filter(|n| on(n)).count() < want {
                short += 1;
            }
            if on(&nodes[victim]) {
                lost_with_victim += 1;
            }
        }
        (short, lost_with_victim)
    };
    let (_, lost) = copies(nodes);
    if let Some(mut c) = nodes[victim].child.take() {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    let killed = Instant::now();
    // Client traffic during repair: one upload through a survivor.
    let load = {
        let mut c = Client::connect(&nodes[0].addr, None).await?;
        let size = args.size.min(256 << 20);
        tokio::spawn(async move {
            let h = UploadHeader {
                key: "bench/during-repair".into(),
                ..Default::default()
            };
            let t = Instant::now();
            let result = c.upload(h, RandomReader::new(size, 0xfeed), |_| {}).await;
            (result.map(|_| size), t.elapsed())
        })
    };
    let mut first_move = None;
    let mut last_short = None;
    loop {
        let (short, _) = copies(nodes);
        if last_short.is_some_and(|s| s != short) && first_move.is_none() {
            first_move = Some(Instant::now());
        }
        last_short = Some(short);
        if short == 0 {
            break;
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(600),
            "repair did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total_secs = killed.elapsed().as_secs_f64();
    let moved = lost as f64 * info.chunk_size as f64;
    let repair_secs = first_move
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(total_secs)
        .max(0.001);
    println!(
        "  repair of {} ({lost} chunk copies lost with node{}): done {:.1} s after the kill \
         (dead-after 2s included); {:.1} s of copying = {:.0} MB/s",
        format_size(args.repair_size),
        victim + 1,
        total_secs,
        repair_secs,
        moved / repair_secs / MB
    );
    let (result, took) = load.await?;
    if let Ok(bytes) = result {
        println!(
            "  client upload during repair: {:.0} MB/s ({} through node1)",
            bytes as f64 / took.as_secs_f64() / MB,
            format_size(bytes)
        );
    }
    Ok(())
}

fn chunk_path(data: &Path, id: &crate::crypto::ChunkId) -> std::path::PathBuf {
    data.join("chunks").join(crate::store::shard_path(id))
}

/// CPU per GiB stored against the crypto it needs: the gateway's seal (file
/// SHA-1, id, encryption, tag) and one tag check per remote copy; the peer
/// channel's AES-GCM (sealed by the sender, opened by the receiver of each
/// remote copy) is shown apart. Then each node's share: a receiving replica
/// checks the tag (no decryption) and writes the bytes.
fn print_stored_cpu(limits: &MachineLimits, r: usize, cpu_up: &[f64], gib: f64) {
    let remote = r.saturating_sub(1) as f64;
    let seal = MachineLimits::secs_per_gib(limits.seal);
    let verify = MachineLimits::secs_per_gib(limits.verify);
    let channel = 2.0 * remote * MachineLimits::secs_per_gib(limits.channel);
    let needed = seal + remote * verify;
    let per_gib = cpu_up.iter().sum::<f64>() / gib;
    println!(
        "  CPU per GiB stored, all nodes: {per_gib:.2} s; crypto it needs: {needed:.2} s \
         (seal {seal:.2} + {remote} x tag check {verify:.2}) -> {:.2} x; \
         with the peer channel's AES-GCM ({channel:.2} s): {:.2} x",
        per_gib / needed,
        per_gib / (needed + channel)
    );
    // The gateway receives every byte from the client and sends it to each
    // remote owner, which receives it.
    let floor = limits.floor(needed + channel, remote, 1.0 + remote);
    println!(
        "  floor over loopback (that crypto, the peer channel, the upload received by the \
         gateway and {remote} copies sent and received): {floor:.2} s = {:.2} x the crypto it needs",
        floor / needed
    );
    let shares: Vec<String> = cpu_up
        .iter()
        .enumerate()
        .map(|(i, cpu)| format!("node{} {:.2} s", i + 1, cpu / gib))
        .collect();
    println!(
        "  CPU per GiB stored by node (node1 is the gateway): {}",
        shares.join(", ")
    );
}
