//! The `dfs` command line: a node, its client commands, the demo and the
//! benchmark. Client commands print results on stdout and one-line errors on
//! stderr, and exit non-zero on any failure.

mod client_cmds;
mod demo;
mod health_cmd;
mod node_cmd;
mod tls_args;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

pub use node_cmd::NodeArgs;
pub use tls_args::{ClientTlsArgs, ServerTlsArgs};

use crate::units::parse_size;

#[derive(Parser)]
#[command(
    name = "dfs",
    version,
    about = "A decentralized, content-addressed, encrypted file store",
    long_about = "dfs stores files as encrypted, content-addressed chunks. Run a storage \
node with `dfs node`, then store and fetch files with `dfs put` and `dfs get`.\n\n\
Every flag of `dfs node` can also be set with an environment variable (DFS_...)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a storage node
    Node(Box<NodeArgs>),
    /// Upload a file
    Put(client_cmds::PutArgs),
    /// Download a file
    Get(client_cmds::GetArgs),
    /// List objects, optionally under a key prefix
    Ls(client_cmds::LsArgs),
    /// Show one object's details
    Stat(client_cmds::StatArgs),
    /// Delete an object
    Rm(client_cmds::RmArgs),
    /// Show the node's status
    Status(client_cmds::StatusArgs),
    /// List the cluster's members, or forget a dead one for good
    Members(client_cmds::MembersArgs),
    /// Check a node's grpc.health.v1 status (exit 0 when SERVING): for probes and HEALTHCHECK
    Health(health_cmd::HealthArgs),
    /// Write a new random cluster secret to a file
    Keygen(KeygenArgs),
    /// Run a local demo: store the files in test_files/ and recover them
    Demo(demo::DemoArgs),
    /// Measure upload/download throughput, memory and this machine's limits
    Bench(crate::bench::BenchArgs),
}

/// Options shared by every command that talks to a node.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// Node gRPC address (host:port)
    #[arg(long, env = "DFS_NODE", default_value = "127.0.0.1:50051")]
    pub node: String,
    /// File holding the bearer token for nodes that require one
    #[arg(long, env = "DFS_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Bearer token (prefer --token-file: arguments are visible to other users)
    #[arg(
        long,
        env = "DFS_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl ClientArgs {
    /// The token to send, if any.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.token_file {
            let t = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", path.display()))?;
            return Ok(Some(t.trim().to_owned()));
        }
        Ok(self.token.clone())
    }

    /// Connects to the node.
    pub async fn connect(&self) -> anyhow::Result<crate::client::Client> {
        let opts = crate::client::ConnectOptions {
            token: self.token()?,
            tls: self.tls.files(),
        };
        crate::client::Client::connect_with(&self.node, &opts).await
    }
}

#[derive(Args)]
struct KeygenArgs {
    /// Where to write the key (refuses to overwrite an existing file)
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

/// Parses a size flag (`4MiB`, `64KiB`, plain bytes).
pub fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text)
}

/// Parses a duration flag (`500ms`, `5s`, `10m`, `1h`).
pub fn duration_arg(text: &str) -> Result<std::time::Duration, String> {
    crate::units::parse_duration(text)
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any TLS is set up, in the node and in the client commands.
    crate::grpc::tls::install_crypto_provider();
    let result = match cli.command {
        Command::Node(args) => node_cmd::run(*args),
        Command::Keygen(args) => keygen(args),
        other => run_client(other),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dfs: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run_client(command: Command) -> anyhow::Result<ExitCode> {
    crate::alloc::tune_for_client();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Put(a) => client_cmds::put(a).await,
            Command::Get(a) => client_cmds::get(a).await,
            Command::Ls(a) => client_cmds::ls(a).await,
            Command::Stat(a) => client_cmds::stat(a).await,
            Command::Rm(a) => client_cmds::rm(a).await,
            Command::Status(a) => client_cmds::status(a).await,
            Command::Members(a) => client_cmds::members(a).await,
            Command::Health(a) => return health_cmd::run(a).await,
            Command::Demo(a) => demo::run(a).await,
            Command::Bench(a) => crate::bench::run(a).await,
            Command::Node(_) | Command::Keygen(_) => unreachable!("handled before"),
        }?;
        Ok(ExitCode::SUCCESS)
    })
}

fn keygen(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let secret = crate::crypto::ClusterSecret::generate();
    secret.write_new_file(&args.out)?;
    println!("wrote a new cluster key to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// An error and its causes on one line, for stderr.
pub fn one_line(e: &anyhow::Error) -> String {
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        return status_line(status);
    }
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text.replace('\n', " ")
}

/// A gRPC status as `CODE: message`.
/// A status the client made itself (a transport failure, such as a TLS
/// handshake the node refused) also gets its causes: "transport error"
/// alone says nothing.
pub fn status_line(status: &tonic::Status) -> String {
    let text = crate::client::with_sources(
        status.message().to_owned(),
        std::error::Error::source(status),
    );
    format!("{}: {}", code_name(status.code()), text.replace('\n', " "))
}

/// A status code as gRPC names it: `Code::DataLoss` as `DATA_LOSS`.
pub fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}
