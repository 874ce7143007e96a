//! A plain HTTP/1.1 client for tests against a real `ferry run --http`: one request per
//! connection, the status and the body (JSON when it parses, else the text).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Waits until something accepts connections on the port.
pub fn wait_for_listener(port: u16) {
    super::wait_until(Duration::from_secs(90), "the gateway listens", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// One request, with `token` as a bearer token when given; the status and the body. Status 0:
/// the server closed the connection before taking the whole body, and left no answer.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    connection
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let sent = write!(
        connection,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorization}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A server may answer a body it refuses (too large) before reading it, and close: the
    // rest of the body then meets a closed connection, and the answer may or may not still be
    // there to read (a reset drops what was not read).
    let cut_short = match sent {
        Ok(()) => false,
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "send: {e}"
            );
            true
        }
    };
    let mut answer = Vec::new();
    let read = connection.read_to_end(&mut answer);
    if cut_short && answer.is_empty() {
        // Closed before the body was taken, with no answer left: status 0.
        return (0, Value::Null);
    }
    if let Err(e) = read {
        assert!(
            e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty(),
            "answer: {e}"
        );
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    (status, body)
}
