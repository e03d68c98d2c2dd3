//! The `dfs` binary: a storage node and its command-line client in one.

fn main() -> std::process::ExitCode {
    dfs::cli::main()
}
