//! A TCP proxy that cuts a download off part-way, to prove that downloads resume.
//!
//! It forwards every connection to the target unchanged, watching the requests go by. When a
//! request for a path containing `watch` passes, it counts the bytes flowing back on that
//! connection and, while cuts remain, closes the connection after `cut_after` bytes (as a
//! dropped mobile link would). It also notes whether any such request asked for a `Range`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; it stops when dropped.
#[derive(Debug)]
pub struct CuttingProxy {
    /// Where to connect to go through the proxy.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    target: SocketAddr,
    watch: String,
    cut_after: usize,
    cuts_left: AtomicUsize,
    cuts_done: AtomicUsize,
    saw_range: AtomicBool,
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
        });
        let task_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, Arc::clone(&task_state)));
            }
        });
        Ok(CuttingProxy { addr, state, task })
    }

    /// How many connections it cut.
    pub fn cuts_done(&self) -> usize {
        self.state.cuts_done.load(Ordering::SeqCst)
    }

    /// Whether a watched request carried a `Range` header.
    pub fn saw_range_request(&self) -> bool {
        self.state.saw_range.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, state: Arc<State>) {
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
            let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
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
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
