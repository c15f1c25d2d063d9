//! The metrics responder (`--metrics-listen`): one connection at a time, one bounded request,
//! answered with the kernel's OpenMetrics text and closed.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;

use host::{loader::threads, Kernel};

/// Serves `kernel`'s metrics at `http://addr/metrics` on one thread of its own (bound here,
/// so that a bad address stops the host before any service starts). One connection at a
/// time, one request each, read for at most [`SCRAPE_TIMEOUT`] and [`SCRAPE_REQUEST_BYTES`],
/// answered and closed: a client that misbehaves costs a scrape some seconds, never a
/// thread, a descriptor past the listen backlog, or memory. (A general-purpose HTTP server
/// starts a thread per connection, which idle clients can pile up.)
pub(super) fn serve_metrics(addr: std::net::SocketAddr, kernel: Arc<Kernel>) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "metrics served at http://{bound}/metrics");
    threads::spawn_detached("metrics", move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    if let Err(error) = answer_scrape(stream, &kernel) {
                        tracing::debug!(%error, "metrics: a scrape failed");
                    }
                }
                Err(error) => {
                    // Out of descriptors, say: try again shortly rather than spin.
                    tracing::warn!(%error, "metrics: accepting a connection failed");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
    .context("starting the metrics thread")?;
    Ok(())
}

/// How long a metrics client has to send its request, and to read the answer.
pub(super) const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

/// The largest metrics request read (its request line and headers).
pub(super) const SCRAPE_REQUEST_BYTES: usize = 8 * 1024;

/// Reads one HTTP request from `stream` and answers it: the metrics for `GET /metrics`
/// (OpenMetrics text, what prometheus-client writes), 404 or 405 otherwise.
pub(super) fn answer_scrape(
    mut stream: std::net::TcpStream,
    kernel: &Kernel,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let ended =
        |r: &[u8]| r.windows(4).any(|w| w == b"\r\n\r\n") || r.windows(2).any(|w| w == b"\n\n");
    while !ended(&request) {
        if request.len() > SCRAPE_REQUEST_BYTES || Instant::now() > deadline {
            return Err(std::io::Error::other(
                "no whole request in time or in 8 KiB",
            ));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(request.split(|&b| b == b'\n').next().unwrap_or_default());
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            with_log_drops(kernel.metrics_text(), crate::logs::dropped()),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
    };
    let mut answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        answer.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&answer)?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// The engine's metrics, and the daemon's count of log lines dropped (before `# EOF`).
fn with_log_drops(mut text: String, dropped: u64) -> String {
    let end = text.rfind("# EOF").unwrap_or(text.len());
    text.insert_str(
        end,
        &format!(
            "# HELP microkernel_log_lines_dropped Log lines dropped because their reader did not keep up.\n\
             # TYPE microkernel_log_lines_dropped counter\n\
             microkernel_log_lines_dropped_total {dropped}\n"
        ),
    );
    text
}
