//! Where the doctor reads one part of the mesh: an `http://` URL it reaches
//! itself (an Envoy admin or trustweave-sds admin port, a `kubectl
//! port-forward`), or a command whose standard output is the answer
//! (`kubectl exec … -- pilot-agent request GET {path}`, `ip netns exec …`).
//!
//! What comes back is hostile until parsed: every answer is bounded, every
//! wait has a deadline, and an error quotes at most a short, printable part
//! of what the other side said.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// How long one answer may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Where one answer is read.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Source {
    /// `http://host:port`; the path asked for is appended.
    Url {
        /// The base URL.
        url: String,
    },
    /// A program and its arguments; `{path}` in an argument is replaced by the
    /// path asked for, otherwise the path is the last argument.
    Command {
        /// Program first.
        command: Vec<String>,
    },
}

impl Source {
    /// What an operator reads in a report.
    pub fn describe(&self) -> String {
        match self {
            Self::Url { url } => url.clone(),
            Self::Command { command } => command.join(" "),
        }
    }

    /// The answer to `path` (`/config_dump`), at most `limit` bytes.
    pub async fn get(&self, path: &str, limit: usize) -> Result<Vec<u8>, String> {
        match self {
            Self::Url { url } => http_get(url, path, limit).await,
            Self::Command { command } => {
                let mut args: Vec<String> = command.clone();
                if args.iter().any(|a| a.contains("{path}")) {
                    for arg in &mut args {
                        *arg = arg.replace("{path}", path);
                    }
                } else {
                    args.push(path.to_string());
                }
                run(&args, limit).await
            }
        }
    }
}

/// Runs `args` (program first); its standard output, at most `limit` bytes.
pub async fn run(args: &[String], limit: usize) -> Result<Vec<u8>, String> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| "empty command".to_string())?;
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("{program}: no output pipes"));
    };
    let finished = async {
        let (out, err) = tokio::join!(read_bounded(stdout, limit), read_bounded(stderr, 4096));
        let status = child.wait().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, out?, err.unwrap_or_default()))
    };
    let (status, out, err) = tokio::time::timeout(TIMEOUT, finished)
        .await
        .map_err(|_| format!("{program}: no answer within {}s", TIMEOUT.as_secs()))??;
    if !status.success() {
        return Err(format!("{program} failed ({status}): {}", quote(&err)));
    }
    Ok(out)
}

async fn read_bounded(reader: impl AsyncRead + Unpin, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    if out.len() > limit {
        return Err(format!("answer larger than {limit} bytes"));
    }
    Ok(out)
}

/// At most 300 printable characters of `bytes`, trimmed.
pub fn quote(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect()
}

/// `GET base + path` over HTTP/1.1 without TLS; the body of a 200 answer.
async fn http_get(base: &str, path: &str, limit: usize) -> Result<Vec<u8>, String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base}: only http:// URLs are read"))?
        .trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '@', ' ']) {
        return Err(format!("{base}: expected http://host:port"));
    }
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| e.to_string())?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        read_bounded(stream, limit.saturating_add(64 * 1024)).await
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {}s", TIMEOUT.as_secs()))?
        .map_err(|e| format!("{base}{path}: {e}"))?;
    let response = parse_response(&raw).map_err(|e| format!("{base}{path}: {e}"))?;
    if response.len() > limit {
        return Err(format!("{base}{path}: answer larger than {limit} bytes"));
    }
    Ok(response)
}

/// The body of a complete HTTP/1.1 answer (plain or chunked), if its status is 200.
pub fn parse_response(raw: &[u8]) -> Result<Vec<u8>, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("not an HTTP answer")?;
    let (head, body) = raw.split_at(split);
    let body = body.get(4..).unwrap_or_default();
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(format!("{}: {}", quote(status.as_bytes()), quote(body)));
    }
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
        })
    });
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_vec())
    }
}

/// Decodes a chunked body.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let (line, rest) = body.split_at(end);
        let size = String::from_utf8_lossy(line);
        let size = size.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| "bad chunk size")?;
        let rest = rest.get(2..).unwrap_or_default();
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        body = rest
            .get(size.saturating_add(2)..)
            .ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_plain_or_chunked_and_errors_quote_the_status() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(parse_response(plain).unwrap(), b"ok");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"abcde");
        let truncated = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nabc";
        assert!(parse_response(truncated).is_err());
        let refused = b"HTTP/1.1 404 Not Found\r\n\r\nno such path\x1b[31m";
        let error = parse_response(refused).unwrap_err();
        assert!(
            error.contains("404") && error.contains("no such path"),
            "{error}"
        );
        assert!(!error.contains('\x1b'));
    }

    #[tokio::test]
    async fn a_command_gets_the_path_and_its_failure_names_it() {
        let echo = Source::Command {
            command: vec!["echo".into(), "at{path}".into()],
        };
        assert_eq!(echo.get("/certs", 100).await.unwrap(), b"at/certs\n");
        let appended = Source::Command {
            command: vec!["echo".into()],
        };
        assert_eq!(appended.get("/x", 100).await.unwrap(), b"/x\n");
        let big = Source::Command {
            command: vec!["echo".into(), "0123456789".into()],
        };
        assert!(big.get("", 4).await.unwrap_err().contains("larger than 4"));
        let failing = run(&["false".to_string()], 10).await.unwrap_err();
        assert!(failing.starts_with("false failed"), "{failing}");
    }
}
