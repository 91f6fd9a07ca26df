//! `augur dev`: starts, serves, stops cleanly on Ctrl-C, and finds its data again.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn run_dev_until_ready(state: &std::path::Path) -> Vec<String> {
    let mut child = Command::new(common::AUGUR)
        .args(["dev", "--listen", "127.0.0.9:7199", "--state"])
        .arg(state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("augur dev exited early: {lines:?}, {:?}", child.wait());
        }
        lines.push(line.trim_end().to_string());
        if line.contains("Ctrl-C stops") {
            break;
        }
    }
    use nix::sys::signal::{Signal, kill};
    kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    for line in reader.lines() {
        lines.push(line.unwrap());
    }
    assert!(child.wait().unwrap().success(), "augur dev exits cleanly on Ctrl-C: {lines:?}");
    lines
}

#[test]
fn dev_round_trips_a_block_and_finds_it_after_restart() {
    let state = tempfile::tempdir().unwrap();
    let first = run_dev_until_ready(state.path());
    assert!(first.iter().any(|l| l.contains("fresh state directory")), "{first:?}");
    let written = first.iter().find_map(|l| l.strip_prefix("wrote ")).expect("wrote line").to_string();
    let greeting = written.split(" (durable").next().unwrap().to_string();

    let second = run_dev_until_ready(state.path());
    let read_back = second.iter().find(|l| l.starts_with("read back over QUIC")).expect("read-back line");
    assert!(read_back.ends_with(&greeting), "{read_back} vs {greeting}");
    assert!(second.iter().any(|l| l.starts_with("stopped; state kept")), "{second:?}");
}
