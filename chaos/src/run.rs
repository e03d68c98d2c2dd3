//! One run from start to verdict: start the cluster, run the workload and
//! the nemesis side by side, heal, check, stop, write everything down.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    caps::Caps,
    check::{self, Violations, acks, final_state, model, reads, replicas},
    config::Config,
    history::{Event, History, now_ms},
    nemesis::{FaultRecord, Nemesis},
    net::Firewall,
    plan::{Plan, PlannedOp},
    procs::{ProcState, Procs},
    workload::Workload,
};

/// What the last line reports.
pub struct Summary {
    pub ops: usize,
    pub acked: usize,
    pub faults: usize,
    pub violations: usize,
}

/// Everything a run shares.
pub struct Run {
    pub cfg: Config,
    pub caps: Caps,
    pub procs: Arc<Procs>,
    pub firewall: Option<Arc<Mutex<Firewall>>>,
    pub run_dir: PathBuf,
    pub violations: Arc<Violations>,
}

impl Run {
    pub async fn execute(&self) -> anyhow::Result<Summary> {
        let plan = Plan::generate(&self.cfg);
        fs::write(self.run_dir.join("plan.json"), plan.to_json().to_string())?;
        self.announce(&plan);
        let history = Arc::new(History::create(&self.run_dir.join("history.jsonl"))?);
        self.start_cluster().await?;
        let run_start_ms = now_ms();
        let start = Instant::now();
        let end = start + self.cfg.duration;
        let workload = Arc::new(Workload::new(
            &self.cfg,
            self.procs.clone(),
            history.clone(),
        )?);
        let nemesis = Arc::new(Nemesis::new(
            &self.cfg,
            &self.caps,
            self.procs.clone(),
            self.firewall.clone(),
            history.clone(),
            workload.clone(),
            self.violations.clone(),
            run_start_ms,
        ));
        let stop_monitor = Arc::new(AtomicBool::new(false));
        let monitor = tokio::spawn(monitor(
            self.procs.clone(),
            self.violations.clone(),
            stop_monitor.clone(),
        ));
        let mut clients = Vec::new();
        for (c, ops) in split_by_client(&plan.ops, self.cfg.clients)
            .into_iter()
            .enumerate()
        {
            let w = workload.clone();
            clients.push(tokio::spawn(async move {
                w.run_client(ops, start, end).await;
                c
            }));
        }
        nemesis.clone().run(plan.faults.clone(), start).await;
        for c in clients {
            let _ = c.await;
        }
        history.flush();
        println!(
            "chaos: faults and operations over after {:.0}s; healing",
            start.elapsed().as_secs_f64()
        );
        let faults = nemesis.records();
        write_faults(&self.run_dir, &faults)?;
        self.heal().await;
        let events = history.snapshot();
        self.check(&events, &faults, run_start_ms).await?;
        stop_monitor.store(true, Ordering::SeqCst);
        let _ = monitor.await;
        self.check_memory();
        self.stop_cluster().await;
        Ok(Summary {
            ops: events.len(),
            acked: events.iter().filter(|e| e.outcome.is_ok()).count(),
            faults: faults.iter().filter(|f| f.executed).count(),
            violations: self.violations.count(),
        })
    }

    pub fn addrs(&self) -> Vec<String> {
        (0..self.cfg.nodes)
            .map(|i| self.procs.grpc_addr(i))
            .collect()
    }

    fn announce(&self, plan: &Plan) {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &plan.faults {
            *kinds.entry(f.kind.name()).or_default() += 1;
        }
        println!(
            "chaos: plan {}: {} operations by {} clients, {} faults {:?}",
            plan.digest(),
            plan.ops.len(),
            self.cfg.clients,
            plan.faults.len(),
            kinds
        );
        for line in self.caps.describe() {
            println!("chaos: binary/machine: {line}");
        }
        for kind in &self.cfg.faults {
            if let Some(why) = self.caps.missing_for_fault(kind) {
                let n = kinds.get(kind.as_str()).copied().unwrap_or(0);
                println!("chaos: SKIPPING fault kind {kind} ({n} planned): {why}");
            }
        }
        if !self.caps.scrub {
            println!(
                "chaos: the binary has no scrubber: a flipped byte is only found when something reads that copy"
            );
        }
    }

    async fn start_cluster(&self) -> anyhow::Result<()> {
        for i in 0..self.cfg.nodes {
            self.procs.start(i, "initial start").await?;
        }
        self.wait_members(Instant::now() + Duration::from_secs(60))
            .await;
        println!(
            "chaos: {} nodes up at {}.1..{}",
            self.cfg.nodes, self.cfg.net, self.cfg.nodes
        );
        Ok(())
    }

    /// Waits until every node sees all the others up (or the deadline).
    async fn wait_members(&self, deadline: Instant) -> bool {
        let want = self.cfg.nodes - 1;
        loop {
            let mut all = true;
            for addr in self.addrs() {
                let up =
                    match tokio::time::timeout(Duration::from_secs(5), crate::procs::status(&addr))
                        .await
                    {
                        Ok(Ok(s)) => s.members.iter().filter(|m| m.state == "up").count(),
                        _ => 0,
                    };
                all &= up >= want;
            }
            if all {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Undoes whatever is left: every node running, no partition.
    async fn heal(&self) {
        if let Some(fw) = &self.firewall {
            let _ = fw.lock().unwrap_or_else(|p| p.into_inner()).set(&[]);
        }
        for i in 0..self.cfg.nodes {
            let state = self.procs.slot(i).state;
            match state {
                ProcState::Stopped => self.procs.pause(i, false),
                // The monitor may have restarted it a moment ago.
                ProcState::Down if self.procs.slot(i).child.is_some() => {}
                ProcState::Down => {
                    if let Err(e) = self.procs.start(i, "heal").await {
                        self.violations
                            .add(6, format!("node n{} did not start for healing: {e}", i + 1));
                    }
                }
                ProcState::Running => {}
            }
        }
        let deadline = Instant::now() + self.cfg.heal_timeout;
        if !self.wait_members(deadline).await {
            println!("chaos: not every node sees every other up after healing");
        }
    }

    async fn check(
        &self,
        events: &[Event],
        faults: &[FaultRecord],
        run_start_ms: u64,
    ) -> anyhow::Result<()> {
        let skewed = faults.iter().any(|f| f.executed && f.kind == "skew");
        let timing = model::Timing {
            spread_ms: if skewed {
                self.cfg.max_skew.as_millis() as u64
            } else {
                0
            },
            margin_ms: 5,
        };
        let model = model::Model::build(events, timing);
        let deadline = Instant::now() + self.cfg.heal_timeout;
        let addrs = self.addrs();
        let listings = final_state::converge(&addrs, deadline).await;
        println!(
            "chaos: listings {} ",
            if listings.converged {
                "converged"
            } else {
                "did NOT converge"
            }
        );
        final_state::judge(&model, &listings, &self.violations);
        if let Some(listing) = listings.first_ok() {
            let secret = dfs::crypto::ClusterSecret::read_file(self.procs.key_file())?;
            let keys = dfs::crypto::Keys::derive(&secret);
            let r = self.cfg.effective_replicas();
            let n = replicas::check(
                &model,
                listing,
                &self.procs,
                &keys,
                r,
                deadline,
                &self.violations,
            )
            .await;
            println!(
                "chaos: checked {n} chunks of {} live objects for {r} verified copies",
                listing.len()
            );
        }
        let n = final_state::read_through(&model, &listings, &addrs, &self.violations).await;
        println!(
            "chaos: read {n} live objects through each of {} nodes",
            addrs.len()
        );
        let settle = self.cfg.timers.settle().as_millis() as u64;
        let windows = reads::Windows::new(faults, settle, run_start_ms, self.cfg.nodes);
        let ctx = reads::Ctx {
            model: &model,
            windows: &windows,
            seed: self.cfg.seed,
            violations: &self.violations,
        };
        reads::check_history(events, &ctx);
        acks::check(
            events,
            faults,
            self.cfg.effective_replicas(),
            &self.violations,
        );
        write_stats(&self.run_dir, events)?;
        Ok(())
    }

    fn check_memory(&self) {
        let peaks: Vec<String> = (0..self.cfg.nodes)
            .map(|i| format!("n{} {} MiB", i + 1, self.procs.slot(i).peak_rss >> 20))
            .collect();
        println!("chaos: peak resident memory: {}", peaks.join(", "));
        for i in 0..self.cfg.nodes {
            let peak = self.procs.slot(i).peak_rss;
            if peak > self.cfg.rss_bound {
                self.violations.add(
                    6,
                    format!(
                        "node n{} peaked at {} MiB resident, over the bound of {} MiB",
                        i + 1,
                        peak >> 20,
                        self.cfg.rss_bound >> 20
                    ),
                );
            }
        }
    }

    /// SIGTERM to every node: each must exit 0 within its shutdown grace.
    async fn stop_cluster(&self) {
        for i in 0..self.cfg.nodes {
            match self.procs.terminate(i).await {
                Ok(s) if s.success() => {}
                Ok(s) => self.violations.add(
                    6,
                    format!("node n{} exited with {s} on the final SIGTERM", i + 1),
                ),
                Err(e) => self
                    .violations
                    .add(6, format!("node n{} on the final SIGTERM: {e}", i + 1)),
            }
        }
    }
}

fn split_by_client(ops: &[PlannedOp], clients: usize) -> Vec<Vec<PlannedOp>> {
    let mut out = vec![Vec::new(); clients];
    for op in ops {
        out[op.client].push(op.clone());
    }
    out
}

/// Watches for nodes that exit on their own (check 6), samples memory, and
/// restarts such a node so the run goes on.
async fn monitor(procs: Arc<Procs>, violations: Arc<Violations>, stop: Arc<AtomicBool>) {
    let mut restarts = vec![0u32; procs.slots.len()];
    while !stop.load(Ordering::SeqCst) {
        for (i, status) in procs.poll() {
            let log = procs.slot(i).log_path();
            violations.add(
                6,
                format!(
                    "node n{} exited by itself ({status}); see {}",
                    i + 1,
                    log.display()
                ),
            );
            if restarts[i] < 3 {
                restarts[i] += 1;
                let _ = procs.start(i, "after an unexpected exit").await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn write_faults(dir: &std::path::Path, faults: &[FaultRecord]) -> anyhow::Result<()> {
    let mut f = fs::File::create(dir.join("faults.jsonl"))?;
    for r in faults {
        writeln!(f, "{}", r.to_json())?;
    }
    Ok(())
}

/// Outcomes per operation kind, for the report.
fn write_stats(dir: &std::path::Path, events: &[Event]) -> anyhow::Result<()> {
    let mut table: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for e in events {
        *table
            .entry(e.op.kind.name())
            .or_default()
            .entry(e.outcome.label())
            .or_default() += 1;
    }
    let mut text = String::new();
    for (kind, outcomes) in &table {
        let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        text.push_str(&format!("{kind}: {}\n", parts.join(", ")));
    }
    print!(
        "{}",
        text.lines()
            .map(|l| format!("chaos: outcomes {l}\n"))
            .collect::<String>()
    );
    fs::write(dir.join("outcomes.txt"), text)?;
    Ok(())
}

/// Writes violations.txt (one per line, with its check).
pub fn write_violations(dir: &std::path::Path, v: &[check::Violation]) -> anyhow::Result<()> {
    let mut f = fs::File::create(dir.join("violations.txt"))?;
    for v in v {
        writeln!(f, "check {}: {}", v.check, v.what)?;
    }
    Ok(())
}
