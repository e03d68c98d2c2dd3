//! TLS on the gRPC API port, for the node (`--tls-cert-file`,
//! `--tls-key-file`, `--tls-client-ca-file`) and for clients (`--ca-file`,
//! `--cert-file`, `--key-file`).
//!
//! tonic does the handshakes (rustls underneath). This module reads the PEM
//! files and checks them before anything listens, so a missing file, a key
//! that belongs to another certificate or a CA file with no certificate is a
//! clear start-up failure rather than a handshake error on the first call.
//!
//! The crypto provider is ring, installed explicitly as the process default
//! ([`install_crypto_provider`]): rustls panics at the first handshake if it
//! finds two providers linked in and none chosen.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    sign::CertifiedKey,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a client may take to finish the TLS handshake: a connection
/// that opens and says nothing must not hold a slot for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes ring the process's rustls provider. Idempotent; if the embedding
/// program chose a provider first, that one stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS file could not be used. Each names the file and the flag's
/// role for it, so the operator knows which one to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is not PEM: {reason}")]
    BadPem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{what} {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { what: &'static str, path: PathBuf },
    #[error("key {key} does not belong to certificate {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds a certificate that cannot be a trust anchor: {reason}")]
    BadCa {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Usage(String),
}

/// The node's TLS files, from its flags.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Reads and checks the files and returns tonic's server configuration.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsFileError> {
        let (cert_pem, key_pem) = read_identity(&self.cert, &self.key, "TLS certificate")?;
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert_pem, key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca {
            let ca_pem = read_roots(ca, "client CA file")?;
            config = config.client_ca_root(Certificate::from_pem(ca_pem));
        }
        Ok(config)
    }
}

/// A client's TLS files, from its flags.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// CA that signed the node's certificate (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for nodes that require one (mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the node's certificate must hold, when it differs from the
    /// host in the address (say, a port-forward to 127.0.0.1).
    pub server_name: Option<String>,
}

impl ClientTlsFiles {
    /// Whether any TLS option is set (which makes the client use TLS).
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.server_name.is_some()
    }

    /// Reads and checks the files and returns tonic's client configuration.
    pub fn load(&self) -> Result<ClientTlsConfig, TlsFileError> {
        let mut config = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read_roots(ca, "CA file")?)),
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let (cert_pem, key_pem) = read_identity(cert, key, "client certificate")?;
                config = config.identity(Identity::from_pem(cert_pem, key_pem));
            }
            (None, None) => {}
            _ => {
                return Err(TlsFileError::Usage(
                    "--cert-file and --key-file go together".into(),
                ));
            }
        }
        if let Some(name) = &self.server_name {
            ServerName::try_from(name.as_str()).map_err(|_| {
                TlsFileError::Usage(format!(
                    "--tls-server-name {name:?} is not a DNS name or IP address"
                ))
            })?;
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    pem: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::BadPem {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsFileError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A certificate chain and its key, checked to belong together.
fn read_identity(
    cert: &Path,
    key: &Path,
    what: &'static str,
) -> Result<(Vec<u8>, Vec<u8>), TlsFileError> {
    let cert_pem = read(cert, what)?;
    let key_pem = read(key, "TLS key")?;
    let chain = certificates(&cert_pem, cert, what)?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsFileError::NoKey {
            what: "TLS key",
            path: key.to_owned(),
        },
        e => TlsFileError::BadPem {
            what: "TLS key",
            path: key.to_owned(),
            reason: e.to_string(),
        },
    })?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|e| TlsFileError::KeyMismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok((cert_pem, key_pem))
}

/// A CA bundle, checked to hold at least one usable trust anchor.
fn read_roots(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsFileError> {
    let pem = read(path, what)?;
    let mut roots = RootCertStore::empty();
    for cert in certificates(&pem, path, what)? {
        roots.add(cert).map_err(|e| TlsFileError::BadCa {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(pem)
}

/// Turns TLS on for a server builder when the node has a certificate.
pub fn apply(
    builder: tonic::transport::Server,
    tls: Option<ServerTlsConfig>,
) -> Result<tonic::transport::Server, tonic::transport::Error> {
    match tls {
        Some(config) => builder.tls_config(config),
        None => Ok(builder),
    }
}

/// The warning a node logs when its API is plaintext and reachable from
/// other machines, or `None` when it is not.
pub fn exposure_warning(addr: SocketAddr, tls: bool) -> Option<String> {
    if tls || addr.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "gRPC on {addr} is plaintext and reachable from other machines: object names, \
         metadata, file contents and bearer tokens cross the network in clear. Use \
         --tls-cert-file and --tls-key-file, or keep the port behind a mesh that encrypts"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plaintext_beyond_loopback_warns() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(exposure_warning(at("127.0.0.1:50051"), false).is_none());
        assert!(exposure_warning(at("127.8.0.2:50051"), false).is_none());
        assert!(exposure_warning(at("[::1]:50051"), false).is_none());
        assert!(exposure_warning(at("0.0.0.0:50051"), true).is_none());
        let w = exposure_warning(at("0.0.0.0:50051"), false).unwrap();
        assert!(
            w.contains("bearer tokens") && w.contains("file contents"),
            "{w}"
        );
        assert!(exposure_warning(at("[::]:50051"), false).is_some());
        assert!(exposure_warning(at("10.1.2.3:50051"), false).is_some());
    }
}
