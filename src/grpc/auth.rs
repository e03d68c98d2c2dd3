//! Who may call what: every dfs method needs a bearer token of at least the
//! role in [`METHOD_ROLES`]; health checking and reflection stay open so
//! probes and grpcurl work without a token.
//!
//! The check is a tower layer over the whole server rather than a tonic
//! interceptor: it needs the method (the request path), which interceptors
//! do not see.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::Either;
use tonic::Status;

use super::tokens::{Role, TokenFile};

/// The role each dfs method needs. A method missing here needs `admin`
/// (deny by default); a unit test keeps this table in step with the protos.
pub const METHOD_ROLES: &[(&str, Role)] = &[
    ("/dfs.v1.Storage/Download", Role::Read),
    ("/dfs.v1.Storage/Stat", Role::Read),
    ("/dfs.v1.Storage/List", Role::Read),
    ("/dfs.v1.Cluster/Status", Role::Read),
    ("/dfs.v1.Storage/Upload", Role::Write),
    ("/dfs.v1.Storage/Delete", Role::Write),
    ("/dfs.v1.Cluster/ForgetMember", Role::Admin),
];

/// Services anyone may call: probes and meshes check health without a
/// token, and reflection only describes the API.
pub const OPEN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The role a call to `path` (`/package.Service/Method`) needs, or `None`
/// for the open services.
pub fn required_role(path: &str) -> Option<Role> {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if OPEN_SERVICES.contains(&service) {
        return None;
    }
    Some(
        METHOD_ROLES
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(Role::Admin, |(_, r)| *r),
    )
}

/// Decides one call: `Ok` lets it through, `Err` is the status to answer.
pub fn authorize(tokens: &TokenFile, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
    let Some(needed) = required_role(path) else {
        return Ok(());
    };
    let Some(token) = bearer_token(headers) else {
        return Err(Status::unauthenticated(
            "this node requires a bearer token (authorization: Bearer <token>)",
        ));
    };
    let Some(role) = tokens.tokens().role_of(token) else {
        return Err(Status::unauthenticated("invalid bearer token"));
    };
    if role < needed {
        let method = path.trim_start_matches('/');
        return Err(Status::permission_denied(format!(
            "{method} needs a token with role {needed} or higher; this token has role {role}"
        )));
    }
    Ok(())
}

/// The token of an `authorization: Bearer <token>` header (the scheme is
/// case-insensitive, as HTTP says).
fn bearer_token(headers: &http::HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Checks every call against the token file; without one, every call
/// passes (the node is open, as on a laptop or behind a mesh that
/// authenticates for it).
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenFile>>,
}

impl AuthLayer {
    pub fn new(tokens: Option<Arc<TokenFile>>) -> Self {
        Self { tokens }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the server's routes.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    tokens: Option<Arc<TokenFile>>,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Authorize<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if let Some(tokens) = &self.tokens
            && let Err(status) = authorize(tokens, req.uri().path(), req.headers())
        {
            tracing::debug!(path = req.uri().path(), code = ?status.code(), "call refused");
            return Either::Left(std::future::ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> (tempfile::TempDir, TokenFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, text).unwrap();
        let file = TokenFile::load(&path).unwrap();
        (dir, file)
    }

    fn call(file: &TokenFile, path: &str, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut headers = http::HeaderMap::new();
        if let Some(h) = header {
            headers.insert(http::header::AUTHORIZATION, h.parse().unwrap());
        }
        authorize(file, path, &headers).map_err(|s| s.code())
    }

    #[test]
    fn each_role_reaches_its_methods_only() {
        use tonic::Code::PermissionDenied as Denied;
        let (_dir, file) = tokens("read r\nwrite w\nadmin a\n");
        for (path, needed) in METHOD_ROLES {
            for (token, role) in [("r", Role::Read), ("w", Role::Write), ("a", Role::Admin)] {
                let got = call(&file, path, Some(&format!("Bearer {token}")));
                let want = if role >= *needed { Ok(()) } else { Err(Denied) };
                assert_eq!(got, want, "{path} with a {role} token");
            }
        }
    }

    #[test]
    fn missing_or_unknown_tokens_are_unauthenticated() {
        use tonic::Code::Unauthenticated;
        let (_dir, file) = tokens("read r\n");
        let stat = "/dfs.v1.Storage/Stat";
        assert_eq!(call(&file, stat, None), Err(Unauthenticated));
        assert_eq!(call(&file, stat, Some("Bearer x")), Err(Unauthenticated));
        assert_eq!(call(&file, stat, Some("r")), Err(Unauthenticated));
        assert_eq!(call(&file, stat, Some("Basic r")), Err(Unauthenticated));
        assert_eq!(call(&file, stat, Some("bearer r")), Ok(()));
        assert_eq!(call(&file, stat, Some("Bearer  r ")), Ok(()));
    }

    #[test]
    fn health_and_reflection_are_open_and_unknown_methods_need_admin() {
        let (_dir, file) = tokens("read r\n");
        assert_eq!(call(&file, "/grpc.health.v1.Health/Check", None), Ok(()));
        assert_eq!(call(&file, "/grpc.health.v1.Health/Watch", None), Ok(()));
        let reflect = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
        assert_eq!(call(&file, reflect, None), Ok(()));
        assert_eq!(required_role("/dfs.v1.Storage/Compact"), Some(Role::Admin));
        assert_eq!(
            required_role("/grpc.health.v1.Healthy/Check"),
            Some(Role::Admin)
        );
        assert_eq!(
            call(&file, "/dfs.v1.Storage/Compact", Some("Bearer r")),
            Err(tonic::Code::PermissionDenied)
        );
    }

    #[test]
    fn refusal_names_the_role_needed() {
        let (_dir, file) = tokens("read r\n");
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, "Bearer r".parse().unwrap());
        let status = authorize(&file, "/dfs.v1.Storage/Upload", &headers).unwrap_err();
        assert_eq!(
            status.message(),
            "dfs.v1.Storage/Upload needs a token with role write or higher; this token has role read"
        );
    }

    /// A new RPC must get a row in the table: the default (admin) is safe
    /// but would lock read and write tokens out of it by surprise.
    #[test]
    fn every_dfs_method_has_a_role() {
        use prost::Message;
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        let dfs: Vec<_> = methods
            .iter()
            .filter(|m| m.starts_with("/dfs.v1."))
            .collect();
        assert!(dfs.len() >= METHOD_ROLES.len(), "{methods:?}");
        for m in dfs {
            assert!(
                METHOD_ROLES.iter().any(|(p, _)| p == m),
                "{m} has no row in METHOD_ROLES"
            );
        }
    }
}
