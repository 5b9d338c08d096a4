//! The `chatwall` binary: everything is in the library; this maps the
//! command line to exit codes.
fn main() -> std::process::ExitCode {
    chatwall::cli::main()
}
