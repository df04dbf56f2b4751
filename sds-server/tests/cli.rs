//! `trustweave-sds` as operators run it: bad flags fail closed naming the flag;
//! `inspect` explains an absent socket.

use std::process::Command;

fn sds(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trustweave-sds"))
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .expect("run trustweave-sds");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_configuration_fails_closed_naming_the_flag() {
    let (code, err) = sds(&[]);
    assert_ne!(code, Some(0));
    assert!(err.contains("--workload-api-socket"), "{err}");
    let (code, err) = sds(&[
        "--workload-api-socket",
        "/run/agent.sock",
        "--socket-mode",
        "0999",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("invalid --socket-mode"), "{err}");
    let (code, err) = sds(&[
        "--workload-api-socket",
        "/run/agent.sock",
        "--rootca-format",
        "der",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("--rootca-format"), "{err}");
}

#[test]
fn inspect_reports_an_absent_socket() {
    let (code, err) = sds(&["inspect", "--sds-socket", "/nonexistent/trustweave/socket"]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("cannot connect to SDS socket /nonexistent/trustweave/socket"),
        "{err}"
    );
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_trustweave-sds"))
        .arg("--workload-api-socket")
        .arg(dir.path().join("no-agent.sock"))
        .arg("--sds-socket")
        .arg(dir.path().join("sds.sock"))
        .args(["--admin-addr", "off"])
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run trustweave-sds");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("utf-8 log line");
        let done = line.contains("Workload API unavailable");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    assert!(text.contains("Workload API unavailable"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escape codes in a non-terminal log:\n{text}"
    );
}
