//! The `eventpipe` binary: a thin edge over the library; see `eventpipe::cli` for the commands.
//! Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.

fn main() -> std::process::ExitCode {
    eventpipe::cli::main()
}
