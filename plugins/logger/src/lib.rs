//! `logger`: the classic microkernel demo client. It depends on `echo`.
//!
//! - On start: logs through the host, announces itself to the kernel with an event, pings the
//!   kernel and sends a greeting to `echo`, logging the replies.
//! - On an event: logs it and forwards its payload to `echo`.
//! - On a request of kind `log`: logs the payload and replies `{"logged": N}`.

use plugin_api::{
    codes, export_service, info, serde_json, warn, BoxError, Event, Host, Reply, Request, Service,
};

struct Logger {
    host: Host,
    lines: u64,
}

impl Logger {
    fn ask_echo(&self, text: &str) {
        let reply = self.host.request("echo", "echo", text.as_bytes());
        if reply.is_ok() {
            info!("echo answered: {}", String::from_utf8_lossy(&reply.data));
        } else {
            warn!("echo did not answer: {reply}");
        }
    }
}

impl Service for Logger {
    const NAME: &'static str = "logger";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DEPENDENCIES: &'static [&'static str] = &["echo"];

    fn new(host: Host, _config: Option<&str>) -> Result<Self, BoxError> {
        Ok(Logger { host, lines: 0 })
    }

    fn start(&mut self) -> Result<(), BoxError> {
        info!("logger starting");
        self.host
            .emit("kernel", "started", br#"{"service":"logger"}"#)?;
        let pong = self.host.request("kernel", "ping", b"");
        info!(
            "kernel answered ping: {}",
            String::from_utf8_lossy(&pong.data)
        );
        self.ask_echo("hello from logger");
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> Result<(), BoxError> {
        info!(
            "event `{}` from {}: {}",
            event.kind,
            event.from,
            String::from_utf8_lossy(&event.payload)
        );
        self.ask_echo(&format!("event {} from {}", event.kind, event.from));
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Result<Reply, BoxError> {
        if request.kind != "log" {
            return Ok(Reply::error(
                codes::BAD_REQUEST,
                format!("logger understands `log` requests, not `{}`", request.kind),
            ));
        }
        self.lines += 1;
        info!("[{}] {}", request.from, request.text()?);
        Ok(Reply::json(&serde_json::json!({ "logged": self.lines })))
    }
}

export_service!(Logger);
