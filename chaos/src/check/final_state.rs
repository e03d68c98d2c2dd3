//! Checks 1, 3 and 4 on the healed cluster: every node lists the same
//! objects, each key's final state is one the history allows, and every
//! live object reads back byte-exact through every node.

use std::time::Duration;

use dfs::client::Client;
use tokio::time::Instant;

use super::{
    Violations,
    model::{Identity, Model},
};
use crate::history::Seen;

/// Every node's listing of every object.
pub struct Listings {
    pub per_node: Vec<Result<Vec<Seen>, String>>,
    pub converged: bool,
}

impl Listings {
    /// The listing to judge the cluster by: the first node's when all agree.
    pub fn first_ok(&self) -> Option<&Vec<Seen>> {
        self.per_node.iter().find_map(|l| l.as_ref().ok())
    }
}

/// Lists every node until all listings are equal or `deadline` passes (check 4).
pub async fn converge(addrs: &[String], deadline: Instant) -> Listings {
    loop {
        let mut per_node = Vec::new();
        for addr in addrs {
            per_node.push(list_node(addr).await);
        }
        let first = per_node[0].as_ref().ok();
        let converged = first.is_some() && per_node.iter().all(|l| l.as_ref().ok() == first);
        if converged || Instant::now() >= deadline {
            return Listings {
                per_node,
                converged,
            };
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn list_node(addr: &str) -> Result<Vec<Seen>, String> {
    let call = async {
        let mut client = Client::connect(addr, None)
            .await
            .map_err(|e| e.to_string())?;
        let all = client
            .list_all("")
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Ok(all.iter().map(Seen::from_info).collect::<Vec<_>>())
    };
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap_or_else(|_| Err("list timed out".into()))
}

/// Reports check 4 (listings differ) and checks 1 and 3 on every node's
/// listing against the history.
pub fn judge(model: &Model, listings: &Listings, violations: &Violations) {
    if !listings.converged {
        violations.add(4, describe_divergence(listings));
    }
    for (check, what) in model.order_violations() {
        violations.add(check, what);
    }
    for (i, listing) in listings.per_node.iter().enumerate() {
        let Ok(listing) = listing else { continue };
        // When all nodes agree, judging one is judging all.
        if listings.converged && i > 0 {
            break;
        }
        let whom = if listings.converged {
            "every node".to_owned()
        } else {
            format!("n{}", i + 1)
        };
        let mut keys: Vec<&str> = model.keys.keys().copied().collect();
        keys.extend(listing.iter().map(|s| s.key.as_str()));
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let seen = listing.iter().find(|s| s.key == key);
            if let Err((check, what)) = model.judge_final(key, seen) {
                violations.add(check, format!("{what} (final state on {whom})"));
            }
        }
    }
}

fn describe_divergence(listings: &Listings) -> String {
    let mut parts = Vec::new();
    let first = listings.first_ok();
    for (i, l) in listings.per_node.iter().enumerate() {
        match (l, first) {
            (Err(e), _) => parts.push(format!("n{}: cannot list: {e}", i + 1)),
            (Ok(l), Some(f)) if l != f => {
                let missing = f.iter().filter(|s| !l.contains(s)).count();
                let extra = l.iter().filter(|s| !f.contains(s)).count();
                let example = f
                    .iter()
                    .find(|s| !l.contains(s))
                    .or_else(|| l.iter().find(|s| !f.contains(s)))
                    .map(|s| format!(", e.g. {:?} {:?}", s.key, s.version))
                    .unwrap_or_default();
                parts.push(format!(
                    "n{} differs from the first listing: {missing} missing, {extra} extra{example}",
                    i + 1
                ));
            }
            _ => {}
        }
    }
    format!("nodes did not converge after healing: {}", parts.join("; "))
}

/// Reads every live object through every node (check 1): each must come
/// back whole and byte-exact. A read is retried a few times, since a node
/// may still be fetching or repairing.
pub async fn read_through(
    model: &Model<'_>,
    listings: &Listings,
    addrs: &[String],
    violations: &Violations,
) -> usize {
    let Some(listing) = listings.first_ok() else {
        violations.add(1, "no node could list its objects after healing");
        return 0;
    };
    let objects: Vec<&Seen> = listing
        .iter()
        .filter(|s| matches!(model.identify(s, None), Identity::Upload(_)))
        .collect();
    let mut tasks = Vec::new();
    for (n, addr) in addrs.iter().enumerate() {
        let objects: Vec<Seen> = objects.iter().map(|s| (*s).clone()).collect();
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut bad = Vec::new();
            for o in &objects {
                if let Err((check, e)) = read_one(&addr, o).await {
                    bad.push((
                        check,
                        format!(
                            "{:?} (sha1 {}, {} bytes) through n{}: {e}",
                            o.key,
                            o.sha1,
                            o.size,
                            n + 1
                        ),
                    ));
                }
            }
            bad
        }));
    }
    for t in tasks {
        for (check, what) in t.await.unwrap_or_default() {
            violations.add(check, what);
        }
    }
    objects.len()
}

/// Err carries the check broken: 2 for wrong bytes, 1 for no bytes.
async fn read_one(addr: &str, o: &Seen) -> Result<(), (u8, String)> {
    let mut last = String::new();
    for attempt in 0..4 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let call = async {
            let mut client = Client::connect(addr, None)
                .await
                .map_err(|e| e.to_string())?;
            client
                .download(Client::key_request(&o.key), std::io::sink(), |_| {})
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        };
        match tokio::time::timeout(Duration::from_secs(60), call).await {
            Ok(Ok((info, sha1, len, _))) => {
                let got = hex::encode(sha1);
                if got == o.sha1 && len == o.size && info.sha1 == o.sha1 {
                    return Ok(());
                }
                // Wrong bytes are never retried away: that is the finding.
                return Err((
                    2,
                    format!(
                        "returned {len} bytes with sha1 {got} (info says {})",
                        info.sha1
                    ),
                ));
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = "timed out".into(),
        }
    }
    Err((1, format!("unreadable: {last}")))
}
