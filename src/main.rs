//! `tally`: the command-line program.

mod cli;

use std::process::ExitCode;

use crate::cli::Command;

/// A bad command line: nothing ran.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match cli::parse(&args) {
        Ok(Command::Help(topic)) => print!("{}", topic.text()),
        Ok(Command::Version) => println!("tally {}", env!("CARGO_PKG_VERSION")),
        Ok(Command::Simulate(_)) => {
            eprintln!("tally: simulate: not yet");
            return ExitCode::FAILURE;
        }
        Err(error) => {
            eprintln!("tally: {error}\n{}", error.hint());
            return ExitCode::from(EXIT_USAGE);
        }
    }
    ExitCode::SUCCESS
}
