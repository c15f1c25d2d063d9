//! `noop`: answers every request with an empty reply and ignores every event. What a
//! request costs with it is what the host costs: `microkernel bench` measures the request
//! path with it. No state.

use plugin_api::{export_service, BoxError, Event, Host, Reply, Request, Service};

struct Noop;

impl Service for Noop {
    const NAME: &'static str = "noop";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(_host: Host, _config: Option<&str>) -> Result<Self, BoxError> {
        Ok(Noop)
    }

    fn handle(&mut self, _request: Request) -> Result<Reply, BoxError> {
        Ok(Reply::ok(Vec::new()))
    }

    fn on_event(&mut self, _event: Event) -> Result<(), BoxError> {
        Ok(())
    }
}

export_service!(Noop);
