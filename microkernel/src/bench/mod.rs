//! `microkernel bench`: what the host costs on this machine, each cost next to its floor,
//! the least the same work can cost here, measured in the same run.
//!
//! Absolute figures drift on a shared machine (a request/reply median moved from 4 µs to
//! 74 µs between two runs of an idle 2-vCPU machine); the ratio of a cost to a floor
//! measured in the same minutes holds. Each measure interleaves its samples with its
//! floor's, so that both see the same machine.
//!
//! The plugins measured are built beforehand (`.ci/bench-plugins DIR`, see
//! docs/PERFORMANCE.md); the bench compiles nothing. It writes, into the out directory:
//! `summary.json` (one object per measure: `measure`, `value`, `floor`, `unit`, `ratio`,
//! `spread` (the lowest and highest ratio over consecutive chunks of the run's samples),
//! `goal`, `met`), `machine.json`, and `swap-pause.svg`.

mod chart;
mod daemon;
mod fleet;
mod isolation;
mod requests;
mod stats;
mod swap;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context as _};
use serde::Serialize;

pub use requests::serve_json_lines;

/// What `microkernel bench` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the built plugins are (see the module docs).
    pub plugins: PathBuf,
    /// Where the summary, the machine's description and the chart go.
    pub out: PathBuf,
    /// Where state is written (a temporary directory made inside it); `out` when `None`.
    pub disk: Option<PathBuf>,
    /// How many samples.
    pub effort: Effort,
    /// Only the measures whose names are given (all when empty).
    pub only: Vec<String>,
    /// Also measure a fleet (`fleet`): it starts etcd, which must be installed.
    pub fleet: bool,
}

/// How many samples each measure takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    /// A few minutes: the figures to quote.
    Full,
    /// Under a minute: is this machine in the right range.
    Quick,
    /// A handful of samples: checks that every measure runs (the test suite's).
    Smoke,
}

impl Effort {
    /// `full`, `quick` or `smoke` samples.
    fn pick(self, full: usize, quick: usize, smoke: usize) -> usize {
        match self {
            Effort::Full => full,
            Effort::Quick => quick,
            Effort::Smoke => smoke,
        }
    }
}

/// What a measure must come to, compared with its floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// `ratio <= x`: a cost against the least it can cost.
    RatioAtMost(f64),
    /// `ratio >= x`: a throughput against the most it can be.
    RatioAtLeast(f64),
    /// `value - floor < x`, in the measure's unit.
    GrowthBelow(f64),
    /// `value == floor`.
    Equal,
    /// No goal: shown for comparison.
    None,
}

impl Goal {
    fn text(self) -> Option<String> {
        match self {
            Goal::RatioAtMost(x) => Some(format!("<= {x}")),
            Goal::RatioAtLeast(x) => Some(format!(">= {x}")),
            Goal::GrowthBelow(x) => Some(format!("value - floor < {x}")),
            Goal::Equal => Some("value == floor".to_owned()),
            Goal::None => None,
        }
    }

    fn met(self, value: f64, floor: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Goal::RatioAtMost(x) => ratio.map(|r| r <= x),
            Goal::RatioAtLeast(x) => ratio.map(|r| r >= x),
            Goal::GrowthBelow(x) => Some(value - floor < x),
            Goal::Equal => Some(value == floor),
            Goal::None => None,
        }
    }
}

/// One line of the summary.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub measure: String,
    /// Its figure (a median unless the measure says otherwise).
    pub value: f64,
    /// The floor's figure, in the same unit.
    pub floor: f64,
    /// What the floor is.
    pub floor_is: String,
    /// The unit of `value` and `floor`.
    pub unit: String,
    /// `value / floor` (for a throughput, higher is better); `null` when the floor is 0.
    pub ratio: Option<f64>,
    /// What the ratio (or the value) must come to; `null` for a row shown for comparison.
    pub goal: Option<String>,
    /// Whether it does; `null` without a goal.
    pub met: Option<bool>,
    /// How many samples of each the figures come from.
    pub samples: usize,
    /// Where the value's time goes, step by step, in its unit (swap pauses).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<(String, f64)>,
    /// How far the ratio moved within the run (`null` for a single figure).
    pub spread: Option<stats::Spread>,
}

impl Row {
    /// A row; the ratio and whether the goal is met are worked out here.
    pub fn new(
        measure: impl Into<String>,
        (value, floor): (f64, f64),
        unit: &str,
        floor_is: impl Into<String>,
        goal: Goal,
        samples: usize,
    ) -> Self {
        let ratio = (floor != 0.0).then(|| value / floor);
        Row {
            measure: measure.into(),
            value,
            floor,
            floor_is: floor_is.into(),
            unit: unit.to_owned(),
            ratio,
            goal: goal.text(),
            met: goal.met(value, floor, ratio),
            samples,
            parts: Vec::new(),
            spread: None,
        }
    }

    /// The same, with the spread of its ratio over the samples (in the order measured) its
    /// value and floor are the `q` quantile of.
    pub fn with_spread(mut self, values: &[f64], floors: &[f64], q: f64) -> Self {
        self.spread = stats::spread(values, floors, q);
        self
    }

    /// The same, with the value's breakdown.
    pub fn with_parts(mut self, parts: Vec<(String, f64)>) -> Self {
        self.parts = parts;
        self
    }
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// The CPU model.
    pub cpu: String,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// `uname -sr`.
    pub kernel: String,
    /// The file system state is written to.
    pub disk: String,
    /// This build.
    pub host: String,
    /// `full`, `quick` or `smoke`.
    pub effort: String,
    /// The seconds the run took.
    pub seconds: f64,
}

type Measure = fn(&Bench) -> anyhow::Result<Vec<Row>>;

/// Every measure, by the name `--only` knows it by, in the order they run.
const MEASURES: [(&str, Measure); 8] = [
    ("requests", requests::rows),
    ("memory", swap::memory_rows),
    ("swap", swap::pauses),
    ("persist", swap::persist),
    ("checkpoint", swap::checkpoint),
    ("reload", daemon::reload),
    ("startup", daemon::startup),
    ("isolation", isolation::rows),
];

/// The files `bench` needs in the plugins directory, named in its error when missing.
const NEEDED: &[&str] = &[
    "libnoop.so",
    "libecho.so",
    "libkv.so",
    "versions/named-1.0.0.so",
    "versions/named-2.0.0.so",
    "startup",
];

/// Runs every measure, prints the table, writes the summary, the machine and the chart.
pub fn run(options: &Options) -> anyhow::Result<Vec<Row>> {
    let started = Instant::now();
    // The allocator as the daemon sets it (before any thread), so that swaps cost here what
    // they cost there.
    host::loader::limit_malloc_arenas(crate::daemon::MALLOC_ARENAS);
    host::loader::threads::adopt_current_thread();
    for needed in NEEDED {
        let path = options.plugins.join(needed);
        if !path.exists() {
            bail!(
                "{} is missing: build the bench's plugins first with `.ci/bench-plugins {}` (see docs/PERFORMANCE.md)",
                path.display(),
                options.plugins.display()
            );
        }
    }
    fs::create_dir_all(&options.out)
        .with_context(|| format!("creating the out directory {}", options.out.display()))?;
    let disk = options.disk.clone().unwrap_or_else(|| options.out.clone());
    let scratch = tempfile::Builder::new()
        .prefix(".bench-")
        .tempdir_in(&disk)
        .with_context(|| format!("creating a scratch directory in {}", disk.display()))?;
    let bench = Bench {
        plugins: options.plugins.clone(),
        scratch: scratch.path().to_owned(),
        effort: options.effort,
    };

    let mut rows = Vec::new();
    for (name, measure) in MEASURES {
        if !options.only.is_empty() && !options.only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("bench: {name} ...");
        let new = measure(&bench).with_context(|| format!("measuring {name}"))?;
        for row in &new {
            eprintln!("{}", table_line(row));
        }
        rows.extend(new);
    }
    if options.fleet || options.only.iter().any(|o| o == "fleet") {
        eprintln!("bench: fleet ...");
        let new = fleet::rows(&bench).context("measuring fleet")?;
        for row in &new {
            eprintln!("{}", table_line(row));
        }
        rows.extend(new);
    }
    let pauses: Vec<Row> = rows
        .iter()
        .filter(|r| r.measure.starts_with(swap::PAUSE))
        .cloned()
        .collect();

    let machine = Machine {
        cpu: cpu_model(),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        kernel: uname(),
        disk: file_system_of(&disk),
        host: format!("microkernel {}", env!("CARGO_PKG_VERSION")),
        effort: format!("{:?}", options.effort).to_lowercase(),
        seconds: started.elapsed().as_secs_f64().round(),
    };
    write_json(&options.out.join("summary.json"), &rows)?;
    write_json(&options.out.join("machine.json"), &machine)?;
    // The chart only when the swap pauses were measured (`--only` may leave them out): an
    // empty one would replace a run's chart with nothing.
    let svg = options.out.join("swap-pause.svg");
    let charted = !pauses.is_empty();
    if charted {
        chart::swap_pause(&svg, &pauses)?;
    }
    println!("{}", table(&rows));
    println!(
        "{} of {} goals met; {} on {} ({} CPUs), state on {}; {} s",
        rows.iter().filter(|r| r.met == Some(true)).count(),
        rows.iter().filter(|r| r.met.is_some()).count(),
        machine.host,
        machine.cpu,
        machine.cpus,
        machine.disk,
        machine.seconds
    );
    let mut wrote = vec![
        options.out.join("summary.json").display().to_string(),
        options.out.join("machine.json").display().to_string(),
    ];
    if charted {
        wrote.push(svg.display().to_string());
    }
    println!("wrote {}", wrote.join(", "));
    Ok(rows)
}

/// What every measure needs.
#[derive(Debug)]
pub(crate) struct Bench {
    plugins: PathBuf,
    /// A directory on the disk being measured, removed at the end.
    scratch: PathBuf,
    effort: Effort,
}

impl Bench {
    fn plugin(&self, name: &str) -> PathBuf {
        self.plugins.join(name)
    }

    /// A fresh directory in the scratch directory.
    fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.scratch.join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(dir)
    }
}

/// Loads one of the bench's plugins: the one place the bench vouches for a library.
fn load(
    loader: &host::loader::Loader,
    file: &host::loader::PluginFile,
) -> Result<host::loader::Library, host::loader::LoadError> {
    // SAFETY: the bench loads only the plugins of this repository that `.ci/bench-plugins`
    // built into the directory its `--plugins` names: the operator vouches for them as for a
    // plugins directory.
    unsafe { loader.load_file(file) }
}

/// [`load`] of the file at `path`.
fn load_path(
    loader: &host::loader::Loader,
    path: &Path,
) -> Result<host::loader::Library, host::loader::LoadError> {
    load(loader, &host::loader::PluginFile::read(path)?)
}

/// A reloader of the bench's plugins directory (see [`load`]).
fn reloader(plugins: &Path) -> host::reload::Reloader {
    // SAFETY: as in `load`.
    unsafe { host::reload::Reloader::new(plugins) }
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A figure with as many digits as it deserves.
fn figure(x: f64) -> String {
    match x.abs() {
        x if x >= 100.0 => format!("{x:.0}"),
        x if x >= 10.0 => format!("{x:.1}"),
        _ => format!("{x:.2}"),
    }
}

fn table_line(row: &Row) -> String {
    let ratio = row.ratio.map_or("-".to_owned(), |r| format!("{r:.2}"));
    let spread = row
        .spread
        .map_or(String::new(), |s| format!("{:.2}–{:.2}", s.low, s.high));
    let goal = row.goal.clone().unwrap_or_else(|| "(comparison)".into());
    let met = match row.met {
        Some(true) => "ok",
        Some(false) => "MISSED",
        None => "",
    };
    let mut line = format!(
        "{:<52} {:>10} {:>10} {:<6} {:>7} {:>11}  {:<20} {met}",
        row.measure,
        figure(row.value),
        figure(row.floor),
        row.unit,
        ratio,
        spread,
        goal
    );
    if !row.parts.is_empty() && row.value > 0.0 {
        let parts: Vec<String> = row
            .parts
            .iter()
            .map(|(name, v)| format!("{name} {:.0}%", 100.0 * v / row.value))
            .collect();
        let _ = write!(line, "\n{:<6}{}", "", parts.join(", "));
    }
    line
}

/// The table printed at the end.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<52} {:>10} {:>10} {:<6} {:>7} {:>11}  {:<20}\n",
        "measure", "value", "floor", "unit", "ratio", "spread", "goal"
    );
    for row in rows {
        out.push_str(&table_line(row));
        out.push('\n');
    }
    out
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn uname() -> String {
    nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} {}",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy()
            )
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// The file system type and device of `path`, from `/proc/self/mountinfo`.
fn file_system_of(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return "unknown".into();
    };
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        if path.starts_with(mount) && best.as_ref().is_none_or(|(len, _)| mount.len() >= *len) {
            best = Some((
                mount.len(),
                format!("{fstype} ({source}, mounted at {mount})"),
            ));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, fs)| fs)
}
