//! Test fixture: service `old`, built against plugin-api 0.0.5.

use plugin_api::{export_service, BoxError, Host, Reply, Request, Service};

struct Fixture;

impl Service for Fixture {
    const NAME: &'static str = "old";
    const VERSION: &'static str = "1.0.0";
    const DEPENDENCIES: &'static [&'static str] = &[];

    fn new(_host: Host, _config: Option<&str>) -> Result<Self, BoxError> {
        Ok(Fixture)
    }

    fn handle(&mut self, request: Request) -> Result<Reply, BoxError> {
        Ok(Reply::ok(request.payload))
    }
}

export_service!(Fixture);
