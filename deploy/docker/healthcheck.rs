//! `cliqgate-healthcheck [http://HOST:PORT/PATH]`: exit 0 if the URL answers HTTP 200, else 1.
//!
//! The container image is distroless (no shell, no curl), so its HEALTHCHECK runs this instead:
//! one std-only file, compiled with plain `rustc` in the image's build stage, no dependencies.
//! Default URL: `http://127.0.0.1:9090/healthz`, the admin listener of the shipped configs.
//! Plain HTTP only (the admin listener has no TLS), bounded by a 2 s timeout on every step.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:9090/healthz";
/// Docker's own HEALTHCHECK timeout is longer; this keeps one probe from hanging on a wedged peer.
const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    match probe(&url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("cliqgate-healthcheck: {url}: {why}");
            ExitCode::FAILURE
        }
    }
}

fn probe(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("bad address {authority:?}: {e}"))?
        .next()
        .ok_or("the address resolves to nothing")?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    // The status line is all we need: "HTTP/1.x 200 ...".
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < head.len() {
        match stream.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) => return Err(e.to_string()),
        }
        if head[..len].contains(&b'\n') {
            break;
        }
    }
    let status_line = String::from_utf8_lossy(&head[..len]);
    let status = status_line.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        Ok(())
    } else {
        Err(format!(
            "answered {:?}",
            status_line.lines().next().unwrap_or("")
        ))
    }
}
