//! What the dfs binary under test can do, found by reading its `--help`.
//! Faults and flags that depend on a feature are used as soon as the binary
//! has it, and the run says plainly which ones it skipped.

use std::{path::Path, process::Command};

/// Where Debian's libfaketime lives (package `libfaketime`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Features of the binary and of the machine.
#[derive(Debug, Clone, Default)]
pub struct Caps {
    /// `dfs members forget ID`.
    pub members_forget: bool,
    /// `dfs node --max-clock-skew`.
    pub max_clock_skew: bool,
    /// `dfs node --idle-timeout`.
    pub idle_timeout: bool,
    /// `dfs node --scrub-interval` (the scrubber).
    pub scrub: bool,
    /// `dfs node --scrub-rate`.
    pub scrub_rate: bool,
    /// iptables with the owner match, usable by this process (root).
    pub iptables: bool,
    /// libfaketime is installed.
    pub faketime: bool,
    /// The harness runs as root: nodes can run as their own uids.
    pub root: bool,
}

impl Caps {
    pub fn probe(dfs: &Path) -> Self {
        let node_help = help(dfs, &["node", "--help"]);
        let members_help = help(dfs, &["members", "--help"]);
        let root = unsafe { libc::geteuid() } == 0;
        Caps {
            members_forget: members_help.contains("forget"),
            max_clock_skew: node_help.contains("--max-clock-skew"),
            idle_timeout: node_help.contains("--idle-timeout"),
            scrub: node_help.contains("--scrub-interval"),
            scrub_rate: node_help.contains("--scrub-rate"),
            iptables: root
                && Command::new("iptables")
                    .args(["-m", "owner", "--help"])
                    .output()
                    .is_ok_and(|o| o.status.success()),
            faketime: Path::new(LIBFAKETIME).exists(),
            root,
        }
    }

    /// Why a fault kind cannot run here, if it cannot.
    pub fn missing_for_fault(&self, kind: &str) -> Option<&'static str> {
        match kind {
            "partition" if !self.iptables => {
                Some("needs iptables with the owner match and root (apt-get install iptables)")
            }
            "partition" if !self.root => Some("needs root to run nodes as their own uids"),
            "forget" if !self.members_forget => Some("the binary has no `dfs members forget`"),
            "skew" if !self.faketime => Some("needs libfaketime (apt-get install faketime)"),
            _ => None,
        }
    }

    /// One line per feature, for the run's log.
    pub fn describe(&self) -> Vec<String> {
        let yes = |b: bool| if b { "yes" } else { "no" };
        vec![
            format!("members forget: {}", yes(self.members_forget)),
            format!("--max-clock-skew: {}", yes(self.max_clock_skew)),
            format!("--idle-timeout: {}", yes(self.idle_timeout)),
            format!("scrubber (--scrub-interval): {}", yes(self.scrub)),
            format!("iptables owner match: {}", yes(self.iptables)),
            format!("libfaketime: {}", yes(self.faketime)),
        ]
    }
}

fn help(dfs: &Path, args: &[&str]) -> String {
    match Command::new(dfs).args(args).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            if o.status.success() { s } else { String::new() }
        }
        Err(_) => String::new(),
    }
}
