//! Optional bearer-token authentication for the dfs services. Health and
//! reflection stay open so probes and grpcurl work without a token.

use tonic::{Request, Status, service::Interceptor};

/// Checks `authorization: Bearer <token>` on every request when a token is
/// configured; lets everything through when none is.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Vec<u8>>,
}

impl BearerAuth {
    /// `None` disables authentication.
    pub fn new(token: Option<String>) -> Self {
        Self {
            expected: token.map(|t| format!("Bearer {t}").into_bytes()),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match request.metadata().get("authorization") {
            Some(given) if constant_time_eq(given.as_bytes(), expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "this node requires a bearer token (authorization: Bearer <token>)",
            )),
        }
    }
}

/// Compares without an early exit, so response time says nothing about how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut BearerAuth, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        auth.call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn token_is_required_only_when_configured() {
        let mut open = BearerAuth::new(None);
        assert_eq!(call(&mut open, None), Ok(()));
        let mut locked = BearerAuth::new(Some("s3cret".into()));
        assert_eq!(call(&mut locked, Some("Bearer s3cret")), Ok(()));
        assert_eq!(
            call(&mut locked, Some("Bearer s3cres")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&mut locked, Some("s3cret")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(&mut locked, None), Err(tonic::Code::Unauthenticated));
    }
}
