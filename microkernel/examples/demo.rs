//! The narrated demo (`cargo demo`): builds the example plugins and the host, then tells the
//! whole story with the real `microkernel` binary: services starting in dependency order,
//! requests through the control socket, a hot replace of `echo` by a new version on SIGHUP
//! with its state migrated, the encrypted state file, and a restart that restores the state.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn say(text: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1;36m==> {text}\x1b[0m");
    } else {
        println!("\n==> {text}");
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

struct Demo {
    bin: PathBuf,
    root: PathBuf,
}

impl Demo {
    fn path(&self, name: &str) -> String {
        self.root.join(name).to_string_lossy().into_owned()
    }

    fn microkernel(&self, args: &[&str]) -> Result<String> {
        let shown: Vec<String> = args
            .iter()
            .map(|a| microkernel::cli::shell_quote(a))
            .collect();
        println!("$ microkernel {}", shown.join(" "));
        let text = self.quietly(args)?;
        print!("{text}");
        Ok(text)
    }

    /// Runs `microkernel` without echoing the command or its output.
    fn quietly(&self, args: &[&str]) -> Result<String> {
        let output = Command::new(&self.bin).args(args).output()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            return Err(
                format!("microkernel {} failed ({})", args.join(" "), output.status).into(),
            );
        }
        Ok(text)
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let socket = self.path("state/control.sock");
        let mut all = vec!["ctl", "--socket", &socket];
        all.extend_from_slice(args);
        self.microkernel(&all)
    }

    fn start_host(&self) -> Result<Child> {
        let host = Command::new(&self.bin)
            .args([
                "run",
                "--plugins",
                &self.path("plugins"),
                "--state-dir",
                &self.path("state"),
            ])
            .args([
                "--key-file",
                &self.path("state.key"),
                "--pid-file",
                &self.path("host.pid"),
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let socket = self.root.join("state/control.sock");
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err("the host did not come up".into());
            }
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_millis(100));
        Ok(host)
    }

    fn stop_host(&self, mut host: Child) -> Result {
        let pid = fs::read_to_string(self.root.join("host.pid"))?;
        Command::new("kill").args(["-TERM", pid.trim()]).status()?;
        let status = host.wait()?;
        println!("host exited: {status}");
        Ok(())
    }
}

fn main() -> Result {
    say("Building the host and the example plugins (cargo build: a few minutes the first time)");
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args([
            "build", "-p", "host", "-p", "echo", "-p", "echo-v2", "-p", "logger", "-p", "kv",
        ])
        .status()?;
    if !status.success() {
        return Err("cargo build failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("debug");
    let root = tempfile::tempdir()?;
    let demo = Demo {
        bin: target.join("microkernel"),
        root: root.path().to_owned(),
    };
    fs::create_dir(root.path().join("plugins"))?;
    for lib in ["libecho.so", "liblogger.so", "libkv.so"] {
        fs::copy(target.join(lib), root.path().join("plugins").join(lib))?;
    }
    println!("working in {}", root.path().display());

    say("A state key: 32 random bytes, mode 0600, never in the code");
    demo.microkernel(&["keygen", "--out", &demo.path("state.key")])?;

    say("Starting the host: echo, kv and logger; logger depends on echo, so it starts last and talks to the kernel and to echo");
    let host = demo.start_host()?;
    demo.ctl(&["list"])?;

    say("Requests through the control socket: echo counts them, kv stores a value");
    for word in ["one", "two", "three"] {
        demo.ctl(&["send", "echo", word])?;
    }
    demo.ctl(&[
        "send",
        "kv",
        r#"{"op":"put","key":"greeting","value":"hello"}"#,
    ])?;

    say("Dropping echo-v2 into the plugins directory and sending SIGHUP (microkernel reload)");
    fs::copy(
        target.join("libecho_v2.so"),
        root.path().join("plugins/libecho_v2.so"),
    )?;
    demo.microkernel(&["reload", "--pid-file", &demo.path("host.pid")])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let socket = demo.path("state/control.sock");
    while !demo
        .quietly(&["ctl", "--socket", &socket, "list", "--json"])?
        .contains("\"2.0.0\"")
    {
        if Instant::now() > deadline {
            return Err("echo 2.0.0 did not come up".into());
        }
        thread::sleep(Duration::from_millis(100));
    }

    say("echo 2.0.0 serves, with the count migrated from version 1's state");
    demo.ctl(&["send", "echo", "four"])?;
    demo.ctl(&["list"])?;

    say("The state on disk is ciphertext: no trace of the value stored in kv");
    demo.ctl(&["checkpoint"])?;
    let sealed = fs::read(root.path().join("state/kv.state"))?;
    let shown: String = sealed.iter().take(48).map(|b| format!("{b:02x}")).collect();
    println!("state/kv.state: {} bytes: {shown}...", sealed.len());
    println!(
        "contains \"hello\": {}",
        sealed.windows(5).any(|w| w == b"hello")
    );
    say("...and the key opens it");
    demo.microkernel(&[
        "inspect-state",
        "--key-file",
        &demo.path("state.key"),
        &demo.path("state/echo.state"),
    ])?;

    say("Stopping the host (SIGTERM): every service stops in reverse dependency order and saves its state");
    demo.stop_host(host)?;

    say("Starting it again: the state is restored");
    let host = demo.start_host()?;
    demo.ctl(&["send", "echo", "five"])?;
    demo.ctl(&["send", "kv", r#"{"op":"get","key":"greeting"}"#])?;
    demo.stop_host(host)?;

    say("Done. Run `cargo test --workspace` for the test suite; README.md has the rest.");
    Ok(())
}
