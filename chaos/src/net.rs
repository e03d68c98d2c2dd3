//! Partitions on the real sockets, with iptables.
//!
//! Every rule lives in one chain, `DFS_CHAOS`, reached from `OUTPUT` only
//! for packets to the harness's own addresses (`<net>.0/24`): traffic to
//! 127.0.0.1, where other tests run, never enters it. A node's outgoing
//! connections leave from 127.0.0.1 whatever address it listens on, so a
//! rule names the sender by the uid its process runs as (the owner match)
//! and the receiver by its address and peer port. "a cannot send to b"
//! drops a's packets to b's peer port: a cannot open or use a connection to
//! b. The chain is flushed and removed at the end of every run, also on
//! error and on Ctrl-C, and on the next start if a run was killed.

use std::process::Command;

/// The chain every rule of the harness lives in.
pub const CHAIN: &str = "DFS_CHAOS";

/// A handle on the chain; removes it when dropped.
pub struct Firewall {
    subnet: String,
    active: bool,
}

impl Firewall {
    /// Creates the chain (removing a stale one first) and hooks it into
    /// OUTPUT for `<net>.0/24` only.
    pub fn install(net: &str) -> anyhow::Result<Self> {
        let subnet = format!("{net}.0/24");
        anyhow::ensure!(
            net.starts_with("127.") && net != "127.0.0",
            "partitions only ever act on loopback addresses other than 127.0.0.x (got {net})"
        );
        remove(&subnet);
        iptables(&["-N", CHAIN])?;
        iptables(&["-I", "OUTPUT", "1", "-d", &subnet, "-j", CHAIN])?;
        Ok(Self {
            subnet,
            active: true,
        })
    }

    /// Replaces the rules with exactly `blocked`: `(uid, address, port)`
    /// triples meaning "the process running as uid cannot send to address:port".
    pub fn set(&self, blocked: &[(u32, String, u16)]) -> anyhow::Result<()> {
        iptables(&["-F", CHAIN])?;
        for (uid, addr, port) in blocked {
            iptables(&[
                "-A",
                CHAIN,
                "-p",
                "tcp",
                "-d",
                &format!("{addr}/32"),
                "--dport",
                &port.to_string(),
                "-m",
                "owner",
                "--uid-owner",
                &uid.to_string(),
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    /// Removes the chain now.
    pub fn remove(&mut self) {
        if self.active {
            remove(&self.subnet);
            self.active = false;
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Unhooks, flushes and deletes the chain; ignores what is not there.
fn remove(subnet: &str) {
    // The hook may have been added more than once by runs that were killed.
    for _ in 0..8 {
        if iptables(&["-D", "OUTPUT", "-d", subnet, "-j", CHAIN]).is_err() {
            break;
        }
    }
    let _ = iptables(&["-F", CHAIN]);
    let _ = iptables(&["-X", CHAIN]);
}

fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run iptables: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "iptables {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
