//! `dfs demo`: placeholder replaced below.
use clap::Args;
#[derive(Args)]
pub struct DemoArgs {}
pub async fn run(_a: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo: not built yet")
}
