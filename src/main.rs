//! The `phasekit` command line: parse, run one command, report, exit with its code.
//!
//! Everything else is the library: argument types and the commands' `run` functions in
//! `phasekit::cli` (and the modules it names), output in `phasekit::cli::printer`.

use std::process::ExitCode;

use clap::Parser;

use phasekit::cli::{self, printer, Cli, Printer};
use phasekit::error::Error;

/// A failed allocation ends the process with one line and exit 9 (src/alloc.rs).
#[global_allocator]
static ALLOC: phasekit::alloc::ReportingAlloc = phasekit::alloc::ReportingAlloc;

fn main() -> ExitCode {
    // Like other Unix tools: a closed pipe (`phasekit inspect ... | head`) ends the process
    // quietly instead of panicking inside println!.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            // Scripts asked for JSON: a usage error is one JSON object too (help stays text).
            if e.use_stderr() && std::env::args_os().any(|a| a == "--json") {
                let message = e.kind().as_str().map(str::to_string).unwrap_or_else(|| "usage error".into());
                let detail = e.to_string();
                let first = detail.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim_start_matches("error: ").to_string();
                printer::print_error_json(&Error::usage(if first.is_empty() { message } else { first }));
                return ExitCode::from(code);
            }
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = phasekit::alloc::init(cli.json) {
        Printer::new(cli.json, cli.quiet).error(&e);
        return ExitCode::from(e.exit_code() as u8);
    }
    if let Some(n) = cli.threads {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
    }
    let p = Printer::new(cli.json, cli.quiet);
    match cli::run(cli) {
        Ok(status) => ExitCode::from(status.code() as u8),
        Err(e) => {
            p.error(&e);
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
