//! What every client asked and was told: the history the checker judges.
//! Written as JSON lines, one event per completed operation.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use dfs::proto::{ObjectInfo, Version};
use serde_json::{Value, json};

use crate::plan::{PlannedOp, op_json};

/// Wall-clock milliseconds since the Unix epoch: the same clock the nodes
/// stamp versions with (unless the harness skews one of them).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How an operation ended, from the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The node (or the transport) answered with a gRPC status.
    Err {
        code: String,
        msg: String,
    },
    /// The harness gave up waiting (`--op-timeout`).
    Timeout,
    /// The client abandoned the call on purpose (a cancelled upload).
    Cancelled,
}

impl Outcome {
    pub fn from_status(s: &tonic::Status) -> Self {
        Outcome::Err {
            code: code_name(s.code()),
            msg: s.message().chars().take(300).collect(),
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }

    /// The status code name, `OK`, `TIMEOUT` or `CANCELLED_BY_CLIENT`.
    pub fn label(&self) -> String {
        match self {
            Outcome::Ok => "OK".into(),
            Outcome::Err { code, .. } => code.clone(),
            Outcome::Timeout => "TIMEOUT".into(),
            Outcome::Cancelled => "CANCELLED_BY_CLIENT".into(),
        }
    }
}

/// `Code::DataLoss` as `DATA_LOSS`.
pub fn code_name(code: tonic::Code) -> String {
    dfs::cli::code_name(code)
}

/// A version as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ver {
    pub hlc: u64,
    pub node: String,
}

impl Ver {
    pub fn from_proto(v: Option<&Version>) -> Option<Self> {
        v.map(|v| Ver {
            hlc: v.hlc,
            node: v.node_id.clone(),
        })
    }

    /// The wall-clock milliseconds part of the hybrid clock reading.
    pub fn ms(&self) -> u64 {
        self.hlc >> 16
    }
}

/// An object as a read, stat or list reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub key: String,
    pub sha1: String,
    pub size: u64,
    pub version: Option<Ver>,
}

impl Seen {
    pub fn from_info(info: &ObjectInfo) -> Self {
        Seen {
            key: info.key.clone(),
            sha1: info.sha1.clone(),
            size: info.size,
            version: Ver::from_proto(info.version.as_ref()),
        }
    }
}

/// What an upload sent.
#[derive(Debug, Clone, Default)]
pub struct PutDetail {
    pub size: u64,
    /// SHA-1 of the whole data (what the object has if it exists).
    pub sha1: String,
    /// Chunk ids of the whole data under the cluster key, in file order.
    pub chunks: Vec<[u8; 20]>,
    /// Bytes handed to the stream; `sent_all` when the stream was ended
    /// normally, the only way a node can commit the upload.
    pub sent: u64,
    pub sent_all: bool,
}

/// What a read asked for and received.
#[derive(Debug, Clone, Default)]
pub struct ReadDetail {
    pub offset: u64,
    /// Requested length; 0 means to the end.
    pub length: u64,
    pub info: Option<Seen>,
    pub got_len: u64,
    pub got_sha1: String,
    /// A breach of the stream's shape (data before info, two infos).
    pub protocol: Option<String>,
}

/// What the harness saw around an acknowledged upload: the gateway's view
/// of its members just before and just after, and on how many nodes' disks
/// each chunk was at the moment of the acknowledgement.
#[derive(Debug, Clone, Default)]
pub struct AckCheck {
    /// Ids the gateway reported as itself or up (None: it did not answer).
    pub up_before: Option<Vec<String>>,
    pub up_after: Option<Vec<String>>,
    /// Per chunk, in file order: data directories holding a file for it.
    pub copies: Vec<u8>,
    /// When the directories were looked at.
    pub checked_ms: u64,
}

/// One completed operation.
#[derive(Debug, Clone)]
pub struct Event {
    pub op: PlannedOp,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    pub outcome: Outcome,
    pub put: Option<PutDetail>,
    pub read: Option<ReadDetail>,
    pub stat: Option<Seen>,
    pub list: Option<Vec<Seen>>,
    /// The version an acknowledged upload or delete was given.
    pub version: Option<Ver>,
    pub ack: Option<AckCheck>,
}

impl Event {
    pub fn new(op: &PlannedOp, invoke_ms: u64) -> Self {
        Event {
            op: op.clone(),
            invoke_ms,
            complete_ms: invoke_ms,
            outcome: Outcome::Timeout,
            put: None,
            read: None,
            stat: None,
            list: None,
            version: None,
            ack: None,
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = op_json(&self.op);
        v["invoke_ms"] = json!(self.invoke_ms);
        v["complete_ms"] = json!(self.complete_ms);
        v["result"] = json!(self.outcome.label());
        if let Outcome::Err { msg, .. } = &self.outcome {
            v["message"] = json!(msg);
        }
        if let Some(p) = &self.put {
            v["data"] = json!({
                "size": p.size, "sha1": p.sha1, "sent": p.sent, "sent_all": p.sent_all,
                "chunks": p.chunks.iter().map(hex::encode).collect::<Vec<_>>(),
            });
        }
        if let Some(r) = &self.read {
            v["read"] = json!({
                "offset": r.offset, "length": r.length, "info": r.info.as_ref().map(seen_json),
                "got_len": r.got_len, "got_sha1": r.got_sha1, "protocol": r.protocol,
            });
        }
        if let Some(s) = &self.stat {
            v["stat"] = seen_json(s);
        }
        if let Some(l) = &self.list {
            v["listed"] = json!(l.iter().map(seen_json).collect::<Vec<_>>());
        }
        if let Some(a) = &self.ack {
            v["ack_check"] = json!({
                "up_before": a.up_before, "up_after": a.up_after,
                "copies": a.copies, "checked_ms": a.checked_ms,
            });
        }
        if let Some(ver) = &self.version {
            v["version"] = json!({"hlc": ver.hlc, "node": ver.node});
        }
        v
    }
}

pub fn seen_json(s: &Seen) -> Value {
    json!({
        "key": s.key, "sha1": s.sha1, "size": s.size,
        "version": s.version.as_ref().map(|v| json!({"hlc": v.hlc, "node": v.node})),
    })
}

/// The history of a run: kept in memory for the checker and appended to
/// `history.jsonl` as events complete, so a run that dies still leaves it.
pub struct History {
    events: Mutex<Vec<Event>>,
    file: Mutex<BufWriter<File>>,
}

impl History {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let file = File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        Ok(Self {
            events: Mutex::new(Vec::new()),
            file: Mutex::new(BufWriter::new(file)),
        })
    }

    pub fn record(&self, event: Event) {
        {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            // The in-memory copy is what the checker reads; a full disk only
            // costs the file.
            let _ = writeln!(f, "{}", event.to_json());
        }
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    pub fn flush(&self) {
        let _ = self.file.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }

    /// A copy of every event so far, in completion order.
    pub fn snapshot(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
