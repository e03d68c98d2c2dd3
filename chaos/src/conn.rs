//! gRPC connections the harness can cut.
//!
//! Dropping a tonic client-streaming call does not end its request stream:
//! hyper keeps piping the body on its own task, and if that body then ends
//! normally the node sees a complete upload and commits it. A client that
//! gives up must instead look like a client that went away, so every upload
//! gets its own connection, and abandoning it shuts the socket down (as a
//! killed `dfs put` would) before anything can end the stream.

use std::{
    future::Future,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to one address and keeps a duplicate of the socket, so the
/// connection can be shut down from outside without racing a closed and
/// reused descriptor number.
#[derive(Clone)]
struct CuttableConnector {
    addr: String,
    socket: Arc<Mutex<Option<OwnedFd>>>,
}

impl tower_service::Service<Uri> for CuttableConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let addr = self.addr.clone();
        let socket = self.socket.clone();
        Box::pin(async move {
            let stream = TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            let dup = stream.as_fd().try_clone_to_owned()?;
            *socket.lock().unwrap_or_else(|p| p.into_inner()) = Some(dup);
            Ok(TokioIo::new(stream))
        })
    }
}

/// The knife for one connection.
pub struct Cut(Arc<Mutex<Option<OwnedFd>>>);

impl Cut {
    /// Shuts the socket down both ways: the node sees the connection end
    /// with every stream on it unfinished.
    pub fn cut(&self) {
        if let Some(fd) = self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // SAFETY: shutdown(2) on a descriptor we own (a dup of the socket).
            unsafe {
                libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
    }
}

/// A fresh connection of its own to `addr`, and the means to cut it.
pub async fn dedicated(addr: &str) -> Result<(Channel, Cut), tonic::Status> {
    let socket = Arc::new(Mutex::new(None));
    let connector = CuttableConnector {
        addr: addr.to_owned(),
        socket: socket.clone(),
    };
    let channel = endpoint(addr)?
        .connect_with_connector(connector)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect to {addr}: {e}")))?;
    Ok((channel, Cut(socket)))
}

/// A shared, lazily connected channel to `addr` (reconnects by itself).
pub fn shared(addr: &str) -> Result<Channel, tonic::Status> {
    Ok(endpoint(addr)?.connect_lazy())
}

fn endpoint(addr: &str) -> Result<Endpoint, tonic::Status> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| tonic::Status::invalid_argument(format!("bad address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .initial_stream_window_size(2 << 20)
        .initial_connection_window_size(4 << 20))
}
