//! TLS flags: the node's (`--tls-*`) and the client commands' (`--ca-file`,
//! `--cert-file`, `--key-file`). Each has an environment twin.

use std::path::PathBuf;

use clap::Args;

use crate::grpc::tls::{ClientTlsFiles, ServerTlsFiles};

/// `dfs node`'s TLS flags. Without them the API port is plaintext, which
/// is right on loopback and behind a mesh that encrypts.
#[derive(Args, Debug, Clone)]
pub struct ServerTlsArgs {
    /// Serve gRPC over TLS with this certificate chain (PEM; needs --tls-key-file)
    #[arg(
        long,
        env = "DFS_TLS_CERT_FILE",
        value_name = "PATH",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key of --tls-cert-file (PEM: PKCS#8, PKCS#1 or SEC1)
    #[arg(
        long,
        env = "DFS_TLS_KEY_FILE",
        value_name = "PATH",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by a CA in this file (PEM)
    #[arg(
        long,
        env = "DFS_TLS_CLIENT_CA_FILE",
        value_name = "PATH",
        requires = "tls_cert_file"
    )]
    pub tls_client_ca_file: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The files to load, if TLS is on.
    pub fn files(&self) -> Option<ServerTlsFiles> {
        let (cert, key) = (self.tls_cert_file.clone()?, self.tls_key_file.clone()?);
        Some(ServerTlsFiles {
            cert,
            key,
            client_ca: self.tls_client_ca_file.clone(),
        })
    }
}

/// A client command's TLS flags. Any of them (or an `https://` address)
/// makes the client use TLS.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// Use TLS, trusting the CA certificates in this file (PEM); without it, an https:// address trusts the system's roots
    #[arg(long, env = "DFS_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for nodes that require one (mutual TLS; PEM; needs --key-file)
    #[arg(
        long,
        env = "DFS_CERT_FILE",
        value_name = "PATH",
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,
    /// Private key of --cert-file (PEM)
    #[arg(
        long,
        env = "DFS_KEY_FILE",
        value_name = "PATH",
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,
    /// Name the node's certificate must hold, if not the host in --node
    #[arg(long, env = "DFS_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl ClientTlsArgs {
    pub fn files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.ca_file.clone(),
            cert: self.cert_file.clone(),
            key: self.key_file.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }
}
