//! dfs-chaos: a seeded fault harness for dfs. It runs a real cluster of
//! `dfs node` processes on loopback, throws a seeded schedule of client
//! operations and faults at it, heals it, and checks every promise dfs
//! makes against what the clients were told. See docs/TESTING.md.

mod caps;
mod check;
mod config;
mod conn;
mod history;
mod nemesis;
mod net;
mod plan;
mod plan_ops;
mod procs;
mod rng;
mod run;
mod workload;

use std::{
    fs,
    os::fd::AsRawFd,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser;

use crate::config::{Config, FAULT_KINDS, OP_KINDS, Timers, parse_kinds};

#[derive(Parser, Debug)]
#[command(
    name = "dfs-chaos",
    about = "Seeded fault injection against a real dfs cluster, with a checker"
)]
struct Args {
    /// Seed of the schedule (default: random, printed first)
    #[arg(long)]
    seed: Option<u64>,
    /// How long operations and faults run; healing and checking follow
    #[arg(long, default_value = "30m", value_parser = dfs::units::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Replication factor given to every node
    #[arg(long = "replicas", default_value_t = 3)]
    replicas: usize,
    /// Concurrent clients (default: nodes + 1)
    #[arg(long)]
    clients: Option<usize>,
    /// Fault kinds, comma-separated, or all / none
    #[arg(long, default_value = "all")]
    faults: String,
    /// Operation kinds, comma-separated, or all
    #[arg(long, default_value = "all")]
    ops: String,
    /// Largest upload
    #[arg(long, default_value = "4MiB", value_parser = dfs::units::parse_size)]
    max_size: u64,
    /// Largest clock difference between two nodes the harness creates
    #[arg(long, default_value = "4s", value_parser = dfs::units::parse_duration)]
    max_skew: Duration,
    /// Most nodes under a process fault at once (default: (nodes - 1) / 2, at least 1)
    #[arg(long)]
    max_down: Option<usize>,
    /// Least time between two faults that destroy data
    #[arg(long, default_value = "30s", value_parser = dfs::units::parse_duration)]
    destroy_gap: Duration,
    /// How long the healed cluster may take to converge and repair
    #[arg(long, default_value = "120s", value_parser = dfs::units::parse_duration)]
    heal_timeout: Duration,
    /// Peak resident memory a node may reach
    #[arg(long, default_value = "512MiB", value_parser = dfs::units::parse_size)]
    rss_bound: u64,
    /// How long one operation may take before the client gives up
    #[arg(long, default_value = "30s", value_parser = dfs::units::parse_duration)]
    op_timeout: Duration,
    /// The dfs binary to run (default: target/release/dfs, else target/debug/dfs)
    #[arg(long)]
    dfs_bin: Option<PathBuf>,
    /// Where run directories go
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// Name of the run directory (default: seed-<seed>-<unix time>)
    #[arg(long)]
    run_name: Option<String>,
    /// First three octets of the node addresses (node i is <net>.<i+1>)
    #[arg(long, default_value = "127.77.0")]
    net: String,
    /// Print the schedule of faults (and the plan's fingerprint) and exit
    #[arg(long)]
    plan_only: bool,
    /// Every node's --dead-after
    #[arg(long, default_value = "3s", value_parser = dfs::units::parse_duration)]
    dead_after: Duration,
    /// Every node's --sync-interval
    #[arg(long, default_value = "2s", value_parser = dfs::units::parse_duration)]
    sync_interval: Duration,
    /// Every node's --repair-interval
    #[arg(long, default_value = "2s", value_parser = dfs::units::parse_duration)]
    repair_interval: Duration,
    /// Every node's --gc-grace (paused uploads pause longer than this)
    #[arg(long, default_value = "6s", value_parser = dfs::units::parse_duration)]
    gc_grace: Duration,
    /// Every node's --gc-interval
    #[arg(long, default_value = "1s", value_parser = dfs::units::parse_duration)]
    gc_interval: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(random_seed);
    // The seed comes first, whatever happens next.
    println!("chaos: seed {seed}");
    let cfg = match config_from(&args, seed) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    if args.plan_only {
        let plan = plan::Plan::generate(&cfg);
        println!(
            "chaos: plan {}: {} operations",
            plan.digest(),
            plan.ops.len()
        );
        for f in &plan.faults {
            println!("{}", plan::fault_json(f));
        }
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(run_main(cfg, args.run_name));
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn run_main(cfg: Config, run_name: Option<String>) -> ExitCode {
    let _lock = match lock_machine() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let caps = caps::Caps::probe(&cfg.dfs_bin);
    let name =
        run_name.unwrap_or_else(|| format!("seed-{}-{}", cfg.seed, history::now_ms() / 1000));
    let run_dir = cfg.out_dir.join(name);
    if let Err(e) = fs::create_dir_all(&run_dir) {
        eprintln!("chaos: cannot create {}: {e}", run_dir.display());
        return ExitCode::from(2);
    }
    let mut run_dir = fs::canonicalize(&run_dir).unwrap_or(run_dir);
    if caps.root && !reachable_by_others(&run_dir) {
        // Nodes run as their own uids: they must be able to walk to their
        // data directories (a checkout under /root is not).
        let name = run_dir
            .file_name()
            .map(|n| n.to_owned())
            .unwrap_or_default();
        let elsewhere = PathBuf::from("/tmp/dfs-chaos-runs").join(name);
        println!(
            "chaos: {} is not reachable by other uids; using {} instead",
            run_dir.display(),
            elsewhere.display()
        );
        let _ = fs::remove_dir(&run_dir);
        if let Err(e) = fs::create_dir_all(&elsewhere) {
            eprintln!("chaos: cannot create {}: {e}", elsewhere.display());
            return ExitCode::from(2);
        }
        run_dir = elsewhere;
    }
    println!("chaos: run directory {}", run_dir.display());
    println!("chaos: replay with: {}", replay_command(&cfg));
    let violations = Arc::new(check::Violations::default());
    let run = match setup(&cfg, &caps, &run_dir, violations.clone()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: setup failed: {e:#}");
            return ExitCode::from(2);
        }
    };
    let outcome = tokio::select! {
        r = run.execute() => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    // Whatever happened: no node left running, no rule left behind.
    run.procs.kill_all();
    if let Some(fw) = &run.firewall {
        fw.lock().unwrap_or_else(|p| p.into_inner()).remove();
    }
    finish(&cfg, &run_dir, &violations, outcome)
}

fn setup(
    cfg: &Config,
    caps: &caps::Caps,
    run_dir: &std::path::Path,
    violations: Arc<check::Violations>,
) -> anyhow::Result<run::Run> {
    let procs = procs::Procs::new(cfg, caps, run_dir)?;
    let firewall =
        if cfg.fault_enabled("partition") && caps.missing_for_fault("partition").is_none() {
            Some(Arc::new(Mutex::new(net::Firewall::install(&cfg.net)?)))
        } else {
            None
        };
    Ok(run::Run {
        cfg: cfg.clone(),
        caps: caps.clone(),
        procs,
        firewall,
        run_dir: run_dir.to_owned(),
        violations,
    })
}

fn finish(
    cfg: &Config,
    run_dir: &std::path::Path,
    violations: &check::Violations,
    outcome: anyhow::Result<run::Summary>,
) -> ExitCode {
    let all = violations.all();
    if let Err(e) = run::write_violations(run_dir, &all) {
        eprintln!("chaos: cannot write violations.txt: {e}");
    }
    let summary = match outcome {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chaos: the run did not complete: {e:#}");
            println!("chaos: leaving {}", run_dir.display());
            println!(
                "chaos: seed {}, run incomplete, {} violations",
                cfg.seed,
                all.len()
            );
            return ExitCode::from(2);
        }
    };
    let mut per_check = std::collections::BTreeMap::new();
    for v in &all {
        *per_check.entry(v.check).or_insert(0) += 1;
    }
    let line = format!(
        "chaos: seed {}, {} ops ({} acknowledged), {} faults, {} violations",
        cfg.seed, summary.ops, summary.acked, summary.faults, summary.violations
    );
    let _ = fs::write(
        run_dir.join("summary.txt"),
        format!("{line}\nviolations per check: {per_check:?}\n"),
    );
    println!(
        "chaos: violations per check: {per_check:?}; history, node logs and data in {}",
        run_dir.display()
    );
    if summary.violations > 0 {
        println!("chaos: replay with: {}", replay_command(cfg));
    }
    println!("{line}");
    if summary.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn config_from(args: &Args, seed: u64) -> Result<Config, String> {
    if !(1..=50).contains(&args.nodes) {
        return Err("--nodes must be 1..=50".into());
    }
    let dfs_bin = match &args.dfs_bin {
        Some(p) => p.clone(),
        None => ["target/release/dfs", "target/debug/dfs"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("no dfs binary under target/: build one or pass --dfs-bin")?,
    };
    let dfs_bin = fs::canonicalize(&dfs_bin).map_err(|e| format!("{}: {e}", dfs_bin.display()))?;
    Ok(Config {
        seed,
        duration: args.duration,
        nodes: args.nodes,
        replicas: args.replicas,
        clients: args.clients.unwrap_or(args.nodes + 1).max(1),
        faults: parse_kinds(&args.faults, FAULT_KINDS)?,
        ops: parse_kinds(&args.ops, OP_KINDS)?,
        chunk_size: 64 << 10,
        max_size: args.max_size,
        timers: Timers {
            dead_after: args.dead_after,
            sync_interval: args.sync_interval,
            repair_interval: args.repair_interval,
            gc_grace: args.gc_grace,
            gc_interval: args.gc_interval,
            ..Timers::default()
        },
        max_skew: args.max_skew,
        max_down: args
            .max_down
            .unwrap_or(((args.nodes.saturating_sub(1)) / 2).max(1)),
        destroy_gap: args.destroy_gap,
        heal_timeout: args.heal_timeout,
        rss_bound: args.rss_bound,
        op_timeout: args.op_timeout,
        dfs_bin,
        out_dir: args.out.clone(),
        net: args.net.clone(),
        uid_base: 47700,
        grpc_port: 7100,
        p2p_port: 7200,
    })
}

fn replay_command(cfg: &Config) -> String {
    let t = &cfg.timers;
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    format!(
        "dfs-chaos --seed {} --duration {}s --nodes {} --replicas {} --clients {} --faults {} --ops {} --max-size {} --max-skew {}ms --max-down {} --destroy-gap {}s --dead-after {} --sync-interval {} --repair-interval {} --gc-grace {} --gc-interval {}",
        cfg.seed,
        cfg.duration.as_secs(),
        cfg.nodes,
        cfg.replicas,
        cfg.clients,
        if cfg.faults.is_empty() {
            "none".into()
        } else {
            cfg.faults.join(",")
        },
        cfg.ops.join(","),
        cfg.max_size,
        cfg.max_skew.as_millis(),
        cfg.max_down,
        cfg.destroy_gap.as_secs(),
        ms(t.dead_after),
        ms(t.sync_interval),
        ms(t.repair_interval),
        ms(t.gc_grace),
        ms(t.gc_interval),
    )
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        return history::now_ms();
    }
    u64::from_le_bytes(b) % 1_000_000_000
}

/// Whether every directory above `dir` lets other users through (o+x).
fn reachable_by_others(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors()
        .skip(1)
        .all(|d| fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// One run at a time per machine: runs share the addresses, ports, uids
/// and the iptables chain. A second run waits for the first.
fn lock_machine() -> anyhow::Result<fs::File> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/dfs-chaos.lock")?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        println!("chaos: another dfs-chaos run holds /tmp/dfs-chaos.lock; waiting for it");
        // SAFETY: as above, blocking this time.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            anyhow::bail!("cannot lock /tmp/dfs-chaos.lock");
        }
    }
    Ok(file)
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_under_a_private_one_is_not_reachable() {
        let root = std::env::temp_dir().join(format!("dfs-chaos-reach-{}", std::process::id()));
        let private = root.join("private");
        let inside = private.join("run");
        fs::create_dir_all(&inside).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(reachable_by_others(&private));
        assert!(!reachable_by_others(&inside));
        fs::set_permissions(&private, fs::Permissions::from_mode(0o711)).unwrap();
        assert!(reachable_by_others(&inside));
        fs::remove_dir_all(&root).unwrap();
    }
}
