//! The executor driven through the seam alone: a [`ServiceInstance`] written here, with no
//! library, no ABI and no kernel, as a worker process's instance would be.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crossbeam_channel::bounded;
use plugin_api::{abi::LogLevel, Reply};

use super::{launch, Envelope, InstanceError, Launch, Letter, Mailbox, OperationError};
use crate::instance::{HostServices, InstanceSource, Lane, Laned, Message, ServiceInstance};

/// Records every call made to its instances, in order.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    /// What `stop` answers.
    stop_fails: bool,
    /// Whether `import_state` fails as an instance whose process was killed from outside.
    lost_on_import: bool,
}

impl Recorder {
    fn note(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

struct Recorded {
    recorder: Arc<Recorder>,
    count: u64,
}

impl ServiceInstance for Recorded {
    fn start(&mut self) -> Result<(), String> {
        self.recorder.note("start".into());
        Ok(())
    }
    fn stop(&mut self) -> Result<(), String> {
        self.recorder.note("stop".into());
        if self.recorder.stop_fails {
            return Err("the disk is gone".into());
        }
        Ok(())
    }
    fn handle(&mut self, request: Message<'_>) -> Reply {
        self.recorder
            .note(format!("handle {} from {}", request.kind, request.from));
        self.count += 1;
        Reply::ok(self.count.to_string().into_bytes())
    }
    fn on_event(&mut self, event: Message<'_>) -> Result<(), String> {
        self.recorder.note(format!("on_event {}", event.kind));
        Ok(())
    }
    fn lost_to_the_host(&self) -> bool {
        self.recorder.lost_on_import
    }
    fn export_state(&mut self) -> Result<Vec<u8>, String> {
        self.recorder.note("export".into());
        Ok(self.count.to_string().into_bytes())
    }
    fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), String> {
        self.recorder.note(format!("import from {from_version}"));
        if self.recorder.lost_on_import {
            return Err("its worker process was killed by SIGKILL".into());
        }
        self.count = String::from_utf8_lossy(state)
            .parse()
            .map_err(|e| format!("{e}"))?;
        Ok(())
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.recorder.note("drop".into());
    }
}

impl InstanceSource for Recorder {
    fn create(
        self: Arc<Self>,
        _services: Arc<dyn HostServices>,
        config: Option<&str>,
    ) -> Result<Box<dyn ServiceInstance>, crate::instance::CreateError> {
        self.note(format!("new {}", config.unwrap_or("-")));
        Ok(Box::new(Recorded {
            recorder: self,
            count: 0,
        }))
    }
}

struct NoHost;

impl HostServices for NoHost {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
    fn request(&self, _: &str, _: &str, _: &[u8], _: Duration) -> Reply {
        Reply::error(plugin_api::codes::NOT_FOUND, "no host")
    }
    fn emit(&self, _: &str, _: &str, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

fn launch_of(recorder: &Arc<Recorder>, mailbox: &Mailbox) -> Launch {
    Launch {
        service: "recorded".into(),
        source: recorder.clone(),
        services: Arc::new(NoHost),
        config: Some("conf".into()),
        timeout: Duration::from_secs(30),
        spin: Duration::ZERO,
        metrics: crate::metrics::Metrics::new().service("recorded"),
        mailbox: mailbox.clone(),
    }
}

fn request(mailbox: &Mailbox, kind: &str) -> Reply {
    let (reply, answer) = bounded(1);
    let letter = Letter::new(None, kind, b"");
    let envelope = Envelope::Request {
        letter,
        chain: Vec::new(),
        reply,
        sent: Instant::now(),
    };
    mailbox.tx.send(envelope).unwrap();
    answer.recv_timeout(Duration::from_secs(30)).unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

#[test]
fn an_executor_drives_any_service_instance_through_the_seam_in_order() {
    let recorder = Arc::new(Recorder::default());
    let mailbox = Mailbox::new(8);
    let state = ("1.0.0".to_owned(), Arc::new(b"41".to_vec()));
    let executor = launch(launch_of(&recorder, &mailbox), Some(state)).unwrap();
    assert_eq!(request(&mailbox, "count").data, b"42");
    mailbox
        .tx
        .send(Envelope::Event {
            letter: Letter::new(None, "tick", b""),
        })
        .unwrap();
    assert_eq!(executor.export(soon()).unwrap(), b"42");
    let stopped = executor.stop(true, soon());
    assert_eq!(stopped.state, Some(Ok(b"42".to_vec())));
    assert_eq!(stopped.stop, Ok(()));
    assert!(stopped.stuck.is_none());
    assert_eq!(
        recorder.calls(),
        [
            "new conf",
            "import from 1.0.0",
            "start",
            "handle count from external",
            "on_event tick",
            "export",
            "export",
            "stop",
            "drop"
        ]
    );
}

#[test]
fn a_suspension_dropped_resumes_serving_and_one_stopped_stops_before_the_drop_is_released() {
    let recorder = Arc::new(Recorder::default());
    let mailbox = Mailbox::new(8);
    let executor = launch(launch_of(&recorder, &mailbox), None).unwrap();
    assert_eq!(request(&mailbox, "a").data, b"1");

    let (suspension, state) = executor.suspend(soon()).unwrap();
    assert_eq!(state, b"1");
    drop(suspension);
    assert_eq!(request(&mailbox, "b").data, b"2");

    let (suspension, _) = executor.suspend(soon()).unwrap();
    let (stopped, release) = suspension.stop(soon());
    assert_eq!(stopped, Some(Ok(())));
    // Stopped, but not dropped until released.
    assert_eq!(recorder.calls().last().map(String::as_str), Some("stop"));
    drop(release);
    executor.exit(soon(), "the test's executor").unwrap();
    assert_eq!(recorder.calls().last().map(String::as_str), Some("drop"));
}

#[test]
fn a_failed_stop_is_the_plugins_error_and_an_operation_on_an_ended_executor_is_unanswered() {
    let recorder = Arc::new(Recorder {
        stop_fails: true,
        ..Recorder::default()
    });
    let mailbox = Mailbox::new(8);
    let executor = launch(launch_of(&recorder, &mailbox), None).unwrap();
    let stopped = executor.stop(false, soon());
    assert_eq!(stopped.state, None);
    assert_eq!(
        stopped.stop,
        Err(OperationError::Plugin {
            call: super::Call::Stop,
            message: "the disk is gone".into()
        })
    );

    // An executor asked after its thread ended: its operation is left in the mailbox, and
    // the wait ends at the deadline with the reason, not a hang.
    let recorder = Arc::new(Recorder::default());
    let executor = launch(launch_of(&recorder, &mailbox), None).unwrap();
    let suspended = executor.suspend(soon()).unwrap();
    let (Some(Ok(())), release) = suspended.0.stop(soon()) else {
        panic!("the suspended instance did not stop");
    };
    drop(release);
    let error = executor
        .export(Instant::now() + Duration::from_millis(50))
        .unwrap_err();
    assert!(
        matches!(
            error,
            OperationError::Unanswered {
                why: super::Unanswered::NoAnswer,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("did not get to it"), "{error}");
}

#[test]
fn a_call_failed_because_the_instances_process_was_lost_to_the_host_is_not_the_plugins() {
    let mailbox = Mailbox::new(8);
    let state = ("1.0.0".to_owned(), Arc::new(b"7".to_vec()));
    let lost = Arc::new(Recorder {
        lost_on_import: true,
        ..Recorder::default()
    });
    let failure = launch(launch_of(&lost, &mailbox), Some(state.clone())).unwrap_err();
    assert!(
        matches!(failure.error, InstanceError::Unavailable(_)),
        "{}",
        failure.error
    );
    // The same failure of the plugin's own is the plugin's.
    let refused = Arc::new(Recorder::default());
    let bad = ("1.0.0".to_owned(), Arc::new(b"not a number".to_vec()));
    let failure = launch(launch_of(&refused, &mailbox), Some(bad)).unwrap_err();
    assert!(
        matches!(failure.error, InstanceError::Import(_)),
        "{}",
        failure.error
    );
}

/// An instance with a [`Lane`]: its lane's calls and its executor's are recorded, and
/// either can be held until the test lets it go.
struct WithLane {
    recorder: Arc<Recorder>,
    lane: Arc<HeldLane>,
    /// What `on_event` of kind `hold` waits for.
    hold: crossbeam_channel::Receiver<()>,
}

struct HeldLane {
    recorder: Arc<Recorder>,
    /// What a lane call of kind `hold` waits for.
    hold: crossbeam_channel::Receiver<()>,
}

impl Lane for HeldLane {
    fn handle(&self, request: Message<'_>, _deadline: Instant) -> Laned {
        self.recorder.note(format!("lane {} enters", request.kind));
        if request.kind == "hold" {
            self.hold.recv().unwrap();
        }
        self.recorder.note(format!("lane {} leaves", request.kind));
        Laned::Replied(Reply::ok(b"through the lane".to_vec()))
    }
}

impl ServiceInstance for WithLane {
    fn start(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn stop(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn handle(&mut self, request: Message<'_>) -> Reply {
        self.recorder.note(format!("handle {}", request.kind));
        Reply::ok(b"through the executor".to_vec())
    }
    fn on_event(&mut self, event: Message<'_>) -> Result<(), String> {
        self.recorder
            .note(format!("on_event {} enters", event.kind));
        if event.kind == "hold" {
            self.hold.recv().unwrap();
        }
        Ok(())
    }
    fn export_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
    fn import_state(&mut self, _: &str, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn lane(&self) -> Option<Arc<dyn Lane>> {
        Some(self.lane.clone())
    }
}

struct LaneSource {
    recorder: Arc<Recorder>,
    lane_hold: crossbeam_channel::Receiver<()>,
    event_hold: crossbeam_channel::Receiver<()>,
}

impl InstanceSource for LaneSource {
    fn create(
        self: Arc<Self>,
        _services: Arc<dyn HostServices>,
        _config: Option<&str>,
    ) -> Result<Box<dyn ServiceInstance>, crate::instance::CreateError> {
        Ok(Box::new(WithLane {
            recorder: self.recorder.clone(),
            lane: Arc::new(HeldLane {
                recorder: self.recorder.clone(),
                hold: self.lane_hold.clone(),
            }),
            hold: self.event_hold.clone(),
        }))
    }
}

fn lane_request(mailbox: &Mailbox, kind: &str) -> Option<Reply> {
    let request = Message {
        from: "external",
        to: "recorded",
        kind,
        payload: b"",
    };
    match mailbox.through_lane(request, &[], soon()) {
        Laned::Replied(reply) => Some(reply),
        Laned::TimedOut => panic!("no timeout"),
        Laned::Refused => None,
    }
}

fn event(mailbox: &Mailbox, kind: &str) {
    mailbox
        .tx
        .send(Envelope::Event {
            letter: Letter::new(None, kind, b""),
        })
        .unwrap();
}

/// Waits (a while at most) for `recorder` to have noted `call`.
fn noted(recorder: &Recorder, call: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if recorder.calls().iter().any(|c| c == call) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn a_lane_takes_requests_only_while_the_executor_is_idle_and_never_overlaps_it() {
    let recorder = Arc::new(Recorder::default());
    let (release_lane, lane_hold) = bounded(1);
    let (release_event, event_hold) = bounded(1);
    let source = Arc::new(LaneSource {
        recorder: recorder.clone(),
        lane_hold,
        event_hold,
    });
    let mailbox = Mailbox::new(8);
    let executor = launch(
        Launch {
            source,
            ..launch_of(&recorder, &mailbox)
        },
        None,
    )
    .unwrap();
    // Through the executor first: once it answers, it serves with its lane open.
    assert_eq!(request(&mailbox, "first").data, b"through the executor");
    let through = lane_request(&mailbox, "idle").expect("the lane of an idle executor");
    assert_eq!(through.data, b"through the lane");

    // The executor busy with a message: the lane is closed.
    event(&mailbox, "hold");
    assert!(noted(
        &recorder,
        "on_event hold enters",
        Duration::from_secs(30)
    ));
    assert!(lane_request(&mailbox, "while busy").is_none());
    release_event.send(()).unwrap();

    // A lane call under way: the executor takes nothing until it ends.
    let lane = std::thread::spawn({
        let mailbox = mailbox.clone();
        move || lane_request(&mailbox, "hold")
    });
    assert!(noted(
        &recorder,
        "lane hold enters",
        Duration::from_secs(30)
    ));
    event(&mailbox, "after");
    let overlapped = noted(
        &recorder,
        "on_event after enters",
        Duration::from_millis(200),
    );
    release_lane.send(()).unwrap();
    assert!(lane.join().unwrap().is_some());
    assert!(
        !overlapped,
        "the executor called the instance during a lane call"
    );
    assert!(noted(
        &recorder,
        "on_event after enters",
        Duration::from_secs(30)
    ));

    // Stopped: the lane is closed.
    let stopped = executor.stop(false, soon());
    assert_eq!(stopped.stop, Ok(()));
    assert!(lane_request(&mailbox, "after the stop").is_none());
    let calls = recorder.calls();
    let at = |call: &str| calls.iter().position(|c| c == call).unwrap();
    assert!(
        at("lane hold leaves") < at("on_event after enters"),
        "{calls:?}"
    );
    assert!(!calls.iter().any(|c| c.contains("while busy")), "{calls:?}");
}
