//! `bench-instructions`: instruction counts (`valgrind --tool=callgrind`) that
//! do not move with whatever else the machine does — (a) the native engine
//! deciding the benchmark request, (c) one Rego evaluation of the guide
//! policy, (b) one SDS push to one stream and one rendering of a change.
//! Each figure is the difference of two runs of an example at two sizes, so
//! start-up cancels out; the top of the larger run's profile goes with it.
//! Writes the `instructions` section of BENCHMARKS.md (`--output`);
//! `--smoke` runs small sizes from the debug examples (no figure is judged).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "bench-instructions")]
struct Args {
    /// Small sizes, debug examples: checks the harness, judges nothing.
    #[arg(long)]
    smoke: bool,
    /// File whose `instructions` section is rewritten.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// One counted run: total instructions and the profile's top entries.
struct Counted {
    instructions: u64,
    top: Vec<(f64, String)>,
}

fn examples_dir(smoke: bool) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(if smoke { "debug" } else { "release" })
        .join("examples")
}

/// Runs `program args` under callgrind.
fn callgrind(dir: &Path, program: &Path, args: &[String]) -> anyhow::Result<Counted> {
    if !program.exists() {
        bail!(
            "{} is missing: `cargo build --release --examples -p trustweave-engine -p trustweave-sds` (make bench-instructions does)",
            program.display()
        );
    }
    let out = dir.join(format!(
        "callgrind.{}.{}",
        program.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        args.join("-")
    ));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(program)
        .args(args)
        .output()
        .context("valgrind (apt-get install valgrind; scripts/setup.sh installs it)")?;
    if !status.status.success() {
        bail!(
            "valgrind {} {args:?} failed: {}",
            program.display(),
            String::from_utf8_lossy(&status.stderr)
        );
    }
    let text = std::fs::read_to_string(&out)?;
    let instructions = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no totals in {}", out.display()))?;
    Ok(Counted {
        instructions,
        top: top_entries(&out),
    })
}

/// The six functions with the highest self cost, as `callgrind_annotate` lists them.
fn top_entries(out: &Path) -> Vec<(f64, String)> {
    let Ok(annotated) = Command::new("callgrind_annotate")
        .arg("--auto=no")
        .arg(out)
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&annotated.stdout)
        .lines()
        .filter_map(|line| {
            // `12,345 (25.00%)  file:function [object]`
            let (_, rest) = line.trim_start().split_once(" (")?;
            let (percent, name) = rest.split_once("%)")?;
            let percent: f64 = percent.trim().parse().ok()?;
            let name = name.trim();
            let name = name.split(" [").next().unwrap_or(name);
            // `path/file.c:function` → `function` (a Rust path's `::` is not a file).
            let name = match name.split_once(':') {
                Some((file, function))
                    if !function.starts_with(':')
                        && (file.contains('/') || file.contains('.') || file == "???") =>
                {
                    function
                }
                _ => name,
            };
            (!name.is_empty() && !name.contains("PROGRAM TOTALS"))
                .then(|| (percent, name.chars().take(110).collect()))
        })
        .take(6)
        .collect()
}

/// A figure: instructions per unit, from runs at `small` and `large` units.
struct Figure {
    what: &'static str,
    per: &'static str,
    instructions: f64,
    top: Vec<(f64, String)>,
}

fn difference(
    what: &'static str,
    per: &'static str,
    dir: &Path,
    program: &Path,
    small: (Vec<String>, u64),
    large: (Vec<String>, u64),
) -> anyhow::Result<Figure> {
    let a = callgrind(dir, program, &small.0)?;
    let b = callgrind(dir, program, &large.0)?;
    let units = large.1.saturating_sub(small.1).max(1);
    Ok(Figure {
        what,
        per,
        instructions: b.instructions.saturating_sub(a.instructions) as f64 / units as f64,
        top: b.top,
    })
}

fn strings(args: &[usize]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let examples = examples_dir(args.smoke);
    let work = tempfile::tempdir()?;
    let dir = work.path();
    let (rounds, changes, streams) = if args.smoke {
        (100, 4, 10)
    } else {
        (2_000, 50, 100)
    };
    let engine = examples.join("request_cost");
    let push = examples.join("push_cost");
    let rounds_args = |n: usize, mode: &str| {
        let mut a = strings(&[n]);
        a.push(mode.to_string());
        a
    };
    let figures = vec![
        difference(
            "(a) native engine: the benchmark request (JSON multi-cloud policy, 2 KiB XFCC, warm certificate cache)",
            "request",
            dir,
            &engine,
            (rounds_args(rounds, "json"), rounds as u64),
            (rounds_args(2 * rounds, "json"), 2 * rounds as u64),
        )?,
        difference(
            "(c) one Rego evaluation: the same request, the users' federated guide policy (input document built, query run)",
            "request",
            dir,
            &engine,
            (rounds_args(rounds, "rego"), rounds as u64),
            (rounds_args(2 * rounds, "rego"), 2 * rounds as u64),
        )?,
        difference(
            "(b) one SDS push to one stream: a rotation's `default` response built, encoded, ACKed",
            "push",
            dir,
            &push,
            (strings(&[changes, streams]), (changes * streams) as u64),
            (strings(&[changes, 2 * streams]), (2 * changes * streams) as u64),
        )?,
        difference(
            "rendering one change (once per change, shared by every stream)",
            "change",
            dir,
            &push,
            (strings(&[changes, 0]), changes as u64),
            (strings(&[2 * changes, 0]), 2 * changes as u64),
        )?,
    ];
    let valgrind = Command::new("valgrind")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut table =
        String::from("| what | instructions | top of the profile (self cost) |\n|---|---|---|\n");
    for f in &figures {
        let top: Vec<String> = f
            .top
            .iter()
            .map(|(percent, name)| format!("{percent:.1}% `{}`", name.replace('|', "\\|")))
            .collect();
        let row = format!(
            "| {} | {:.0} per {} | {} |\n",
            f.what,
            f.instructions,
            f.per,
            top.join("<br>")
        );
        print!("{row}");
        table.push_str(&row);
    }
    let body = format!(
        "## Instruction counts (`make bench-instructions`)\n\n\
         Instructions retired ({valgrind}, `--tool=callgrind`), the same whatever else the machine \
         does: each is the difference of two runs of an example (`filter/engine/examples/request_cost.rs`, \
         `sds-server/examples/push_cost.rs`) at two sizes ({rounds} and {} requests; {changes} changes \
         to {streams} and {} streams; {changes} and {} changes to none), divided by the units \
         added, so start-up cancels. Release builds, native (the `.wasm` in V8 runs the same \
         engine at a different cost); the top entries are the larger run's.\n\n{table}",
        2 * rounds,
        2 * streams,
        2 * changes,
    );
    if let Some(path) = &args.output {
        trustweave_e2e::bench_filter::write_section(path, "instructions", &body)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
