//! The `dfs` binary: a storage node and its command-line client in one.

/// Large blocks aligned for direct I/O (see `dfs::alloc`).
#[global_allocator]
static ALLOCATOR: dfs::alloc::BlockAligned = dfs::alloc::BlockAligned;

fn main() -> std::process::ExitCode {
    dfs::cli::main()
}
