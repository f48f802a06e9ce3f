//! A TCP proxy between a device and the hub, to prove that downloads resume and that reports
//! wait for the network.
//!
//! It forwards every connection to the target unchanged, watching the requests go by:
//!
//! - **Cutting.** When a request for a path containing `watch` passes, it counts the bytes
//!   flowing back on that connection and, while cuts remain, closes the connection after
//!   `cut_after` bytes (as a dropped mobile link would). It notes whether any such request asked
//!   for a `Range`.
//! - **Offline.** [`CuttingProxy::set_offline`] drops every open connection and closes each new
//!   one as soon as it is accepted, until it is switched back on.
//! - **Recording.** Every plain-HTTP request line it sees is kept ([`CuttingProxy::requests`]),
//!   so a test can count check-ins, enrolments and downloads, and read their `Range` headers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; it stops when dropped.
#[derive(Debug)]
pub struct CuttingProxy {
    /// Where to connect to go through the proxy.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

/// A request seen going through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// When the proxy saw it.
    pub at: Instant,
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target, such as `/device/v1/checkin`.
    pub path: String,
    /// The `Range` header's value, if it had one.
    pub range: Option<String>,
}

#[derive(Debug)]
struct State {
    target: SocketAddr,
    watch: String,
    cut_after: usize,
    cuts_left: AtomicUsize,
    cuts_done: AtomicUsize,
    saw_range: AtomicBool,
    offline: watch::Sender<bool>,
    requests: Mutex<Vec<SeenRequest>>,
}

impl CuttingProxy {
    /// Proxies to `target`, cutting `cuts` responses to requests whose line contains `watch`
    /// after `cut_after` bytes.
    pub async fn start(
        target: SocketAddr,
        watch: &str,
        cut_after: usize,
        cuts: usize,
    ) -> std::io::Result<CuttingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            target,
            watch: watch.to_string(),
            cut_after,
            cuts_left: AtomicUsize::new(cuts),
            cuts_done: AtomicUsize::new(0),
            saw_range: AtomicBool::new(false),
            offline: watch::Sender::new(false),
            requests: Mutex::new(Vec::new()),
        });
        let task_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *task_state.offline.borrow() {
                    // Refused: closed before a byte is read.
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, Arc::clone(&task_state)));
            }
        });
        Ok(CuttingProxy { addr, state, task })
    }

    /// Proxies to `target` without cutting anything (for recording requests and going offline).
    pub async fn forward(target: SocketAddr) -> std::io::Result<CuttingProxy> {
        CuttingProxy::start(target, "", 0, 0).await
    }

    /// `http://<addr>`, the URL to give a device instead of the hub's.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many connections it cut.
    pub fn cuts_done(&self) -> usize {
        self.state.cuts_done.load(Ordering::SeqCst)
    }

    /// Whether a watched request carried a `Range` header.
    pub fn saw_range_request(&self) -> bool {
        self.state.saw_range.load(Ordering::SeqCst)
    }

    /// Goes offline (drops every open connection and refuses new ones) or back online.
    pub fn set_offline(&self, offline: bool) {
        self.state.offline.send_replace(offline);
    }

    /// Whether it is offline.
    pub fn is_offline(&self) -> bool {
        *self.state.offline.borrow()
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many requests with `method` had a path starting with `path`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(path))
            .count()
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Notes the request lines (and their `Range` headers) in a chunk a client sent.
fn record_requests(state: &State, chunk: &str) {
    let lines: Vec<&str> = chunk.split("\r\n").collect();
    for (i, line) in lines.iter().enumerate() {
        let mut parts = line.split(' ');
        let (Some(method), Some(path), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let is_method = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
        if !is_method || !path.starts_with('/') || !version.starts_with("HTTP/1.") {
            continue;
        }
        let range = lines[i + 1..]
            .iter()
            .take_while(|l| !l.is_empty())
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("range")
                    .then(|| value.trim().to_string())
            });
        state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(SeenRequest {
                at: Instant::now(),
                method: method.to_string(),
                path: path.to_string(),
                range,
            });
    }
}

async fn relay(mut client: TcpStream, state: Arc<State>) {
    let mut offline = state.offline.subscribe();
    let Ok(mut server) = TcpStream::connect(state.target).await else {
        return;
    };
    let armed = Arc::new(AtomicBool::new(false));
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let original = String::from_utf8_lossy(&buf[..n]);
            record_requests(&state, &original);
            let text = original.to_ascii_lowercase();
            if text.contains(&state.watch.to_ascii_lowercase()) {
                if text.contains("\r\nrange: bytes=") {
                    state.saw_range.store(true, Ordering::SeqCst);
                }
                armed.store(true, Ordering::SeqCst);
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent_while_armed = 0usize;
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut n = n;
            let mut cut = false;
            if armed.load(Ordering::SeqCst) && state.cuts_left.load(Ordering::SeqCst) > 0 {
                if sent_while_armed + n >= state.cut_after {
                    n = state.cut_after.saturating_sub(sent_while_armed);
                    cut = true;
                }
                sent_while_armed += n;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            if cut {
                state.cuts_left.fetch_sub(1, Ordering::SeqCst);
                state.cuts_done.fetch_add(1, Ordering::SeqCst);
                let _ = client_write.shutdown().await;
                break;
            }
        }
    };
    // Going offline ends the relay, which drops both sockets.
    let went_offline = async {
        let _ = offline.wait_for(|offline| *offline).await;
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
        () = went_offline => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_ranges_are_recorded() {
        let state = State {
            target: "127.0.0.1:1".parse().unwrap(),
            watch: String::new(),
            cut_after: 0,
            cuts_left: AtomicUsize::new(0),
            cuts_done: AtomicUsize::new(0),
            saw_range: AtomicBool::new(false),
            offline: watch::Sender::new(false),
            requests: Mutex::new(Vec::new()),
        };
        record_requests(
            &state,
            "GET /device/v1/artifacts/ab HTTP/1.1\r\nhost: x\r\nRange: bytes=10-\r\n\r\n",
        );
        record_requests(
            &state,
            "POST /device/v1/checkin HTTP/1.1\r\ncontent-length: 2\r\n\r\n{\"a\": \"B C HTTP/1.1\"}",
        );
        let seen = state.requests.lock().unwrap();
        let summary: Vec<_> = seen
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str(), r.range.as_deref()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("GET", "/device/v1/artifacts/ab", Some("bytes=10-")),
                ("POST", "/device/v1/checkin", None),
            ]
        );
    }
}
