//! `dfs health`: asks a node's grpc.health.v1 service whether it is
//! SERVING, for container probes (a Docker HEALTHCHECK, or a Kubernetes exec
//! probe where the API port speaks TLS, which native gRPC probes cannot).

use std::{process::ExitCode, time::Duration};

use clap::Args;

use super::{ClientArgs, duration_arg};

#[derive(Args)]
pub struct HealthArgs {
    /// Health service to ask: "" (the default) is SERVING while the node can take writes, "liveness" while it runs
    #[arg(long, default_value = "")]
    service: String,
    /// Give up (and fail) after this long
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    timeout: Duration,
    #[command(flatten)]
    client: ClientArgs,
}

/// Prints the status; exits 0 for SERVING and 1 for anything else,
/// including a node that cannot be reached in time.
pub async fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let check = async {
        let mut client = args.client.connect().await?;
        Ok::<_, anyhow::Error>(client.health(&args.service).await?)
    };
    let status = tokio::time::timeout(args.timeout, check)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no health answer from {} within {:?}",
                args.client.node,
                args.timeout
            )
        })??;
    println!("{}", status.as_str_name());
    if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}
