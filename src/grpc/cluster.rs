//! `dfs.v1.Cluster`: what this node knows about itself (and, later, its peers).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::node_status;
use crate::{
    node::{Node, now_ms},
    proto::{
        ForgetMemberRequest, ForgetMemberResponse, MemberStatus, ScrubStatus, StatusRequest,
        StatusResponse, cluster_server::Cluster,
    },
};

/// The Cluster service over one node.
pub struct ClusterService {
    node: Arc<Node>,
    grpc_address: String,
    p2p_address: String,
}

impl ClusterService {
    pub fn new(node: Arc<Node>, grpc_address: String, p2p_address: String) -> Self {
        Self {
            node,
            grpc_address,
            p2p_address,
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let (chunk_count, bytes_stored) = self.node.store().usage();
        // redb reads may wait for the disk: keep them off the async threads.
        let node = self.node.clone();
        let (object_count, repair_backlog) = tokio::task::spawn_blocking(move || {
            node.index()
                .live_objects()
                .map(|objects| (objects, node.cluster().repair_backlog()))
        })
        .await
        .map_err(|e| Status::internal(format!("status stopped: {e}")))?
        .map_err(|e| node_status(e.into()))?;
        let me = MemberStatus {
            node_id: self.node.id().to_owned(),
            address: self.p2p_address.clone(),
            state: "self".into(),
            last_seen_unix_ms: now_ms(),
            chunk_count,
            bytes_stored,
        };
        let cluster = self.node.cluster();
        let mut members = vec![me];
        members.extend(cluster.peers().into_iter().map(|m| MemberStatus {
            node_id: m.node_id,
            address: m.addr,
            state: m.state.as_str().into(),
            last_seen_unix_ms: m.last_seen_unix_ms,
            chunk_count: m.chunk_count,
            bytes_stored: m.bytes_stored,
        }));
        let scrub = self.node.chunks().scrub_progress();
        let writable = cluster.writable();
        Ok(Response::new(StatusResponse {
            node_id: self.node.id().to_owned(),
            grpc_address: self.grpc_address.clone(),
            p2p_address: self.p2p_address.clone(),
            object_count,
            chunk_count,
            bytes_stored,
            members,
            repair_backlog,
            peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").into(),
            scrub: Some(ScrubStatus {
                passes: scrub.passes,
                checked_this_pass: scrub.checked_this_pass,
                checked_total: scrub.checked_total,
                corrupt_found: scrub.corrupt_found,
                last_pass_end_unix_ms: scrub.last_pass_end_unix_ms,
            }),
            writable: writable.is_ok(),
            not_ready_reason: writable.err().unwrap_or_default(),
        }))
    }

    async fn forget_member(
        &self,
        request: Request<ForgetMemberRequest>,
    ) -> Result<Response<ForgetMemberResponse>, Status> {
        let id = request.into_inner().node_id;
        use crate::cluster::ForgetError;
        match self.node.cluster().forget_member(&id) {
            Ok(()) => Ok(Response::new(ForgetMemberResponse {})),
            Err(e @ ForgetError::Unknown(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ (ForgetError::IsUp(_) | ForgetError::Myself)) => {
                Err(Status::failed_precondition(e.to_string()))
            }
        }
    }
}

/// The process's peak resident set size (`VmHWM`), in bytes. Linux only.
pub fn peak_rss_bytes() -> Option<u64> {
    peak_rss_of("self")
}

/// Peak resident set size (`VmHWM`) of process `pid` ("self" for this one),
/// in bytes. Linux only.
pub fn peak_rss_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = "VmHWM:";
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}
