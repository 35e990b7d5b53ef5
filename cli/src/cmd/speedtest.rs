//! `myco speedtest WS[.AGENT]`: bulk throughput over the mesh, per interval and in total.

use std::time::{Duration, Instant};

use anyhow::Context;
use mesh::WorkspaceRef;
use mesh::control::{Direction, SpeedtestRequest, SpeedtestResult};
use serde::Serialize;

use crate::Globals;
use crate::dial::{self, MeshArgs};
use crate::output::{self, Format, OutputArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent: [OWNER/]WORKSPACE[.AGENT].
    target: WorkspaceRef,
    /// Which way data flows, seen from here.
    #[arg(long, value_enum, default_value = "down")]
    direction: DirectionArg,
    /// How long to send, e.g. 5s.
    #[arg(short = 't', long = "time", default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Report every this long.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[command(flatten)]
    mesh: MeshArgs,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    Up,
    Down,
}

#[derive(Debug, Serialize)]
struct Interval {
    start_s: f64,
    end_s: f64,
    bytes: u64,
    mbits_per_sec: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    agent: String,
    direction: &'static str,
    path: String,
    intervals: Vec<Interval>,
    total_bytes: u64,
    seconds: f64,
    mbits_per_sec: f64,
}

fn mbits(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 * 8.0 / secs / 1e6
    }
}

const CHUNK: usize = 256 * 1024;

pub async fn run(globals: &Globals, args: Args) -> anyhow::Result<()> {
    if args.duration.is_zero() || args.interval.is_zero() {
        anyhow::bail!("--time and --interval must be longer than zero");
    }
    let mut d = dial::dial(globals, &args.target, mesh::alpn::SPEEDTEST, &args.mesh).await?;
    let direction = match args.direction {
        DirectionArg::Up => Direction::Up,
        DirectionArg::Down => Direction::Down,
    };
    mesh::frame::write(
        &mut d.send,
        &SpeedtestRequest {
            direction,
            duration_ms: u64::try_from(args.duration.as_millis()).unwrap_or(u64::MAX),
        },
    )
    .await?;
    let json = args.out.format == Format::Json;
    let agent = d.hello.agent.clone();
    if !json {
        println!(
            "speedtest {} {agent} for {:?} via {}",
            if direction == Direction::Up {
                "to"
            } else {
                "from"
            },
            args.duration,
            dial::current_path(&d.conn)
        );
    }
    let mut meter = Meter::new(args.interval, json);
    let (total_bytes, seconds) = match direction {
        Direction::Down => {
            loop {
                // Chunks straight from QUIC's buffers, without a copy.
                match d.recv.read_chunk(CHUNK).await {
                    Ok(Some(c)) => meter.add(c.len() as u64),
                    Ok(None) => break,
                    Err(e) => {
                        let why = dial::close_reason(&d.conn).unwrap_or_else(|| e.to_string());
                        anyhow::bail!("speedtest from {agent} broke off: {why}");
                    }
                }
            }
            meter.finish()
        }
        Direction::Up => {
            let chunk = bytes::Bytes::from(vec![0u8; CHUNK]);
            let deadline = meter.start + args.duration;
            while Instant::now() < deadline {
                d.send
                    .write_chunk(chunk.clone())
                    .await
                    .with_context(|| format!("speedtest to {agent} broke off"))?;
                meter.add(CHUNK as u64);
            }
            d.send.finish().context("cannot finish the upload")?;
            meter.finish();
            // The agent's count of what arrived is the truth; ours is what we queued.
            let result: SpeedtestResult = mesh::frame::read(&mut d.recv)
                .await
                .context("no result from the agent")?;
            (result.bytes, result.elapsed_ms as f64 / 1000.0)
        }
    };
    let intervals = meter.intervals;
    let report = Report {
        agent,
        direction: if direction == Direction::Up {
            "up"
        } else {
            "down"
        },
        path: dial::current_path(&d.conn).to_string(),
        intervals,
        total_bytes,
        seconds,
        mbits_per_sec: mbits(total_bytes, seconds),
    };
    d.conn.close(0u32.into(), b"done");
    if json {
        output::json(&report)?;
    } else {
        println!(
            "total: {:.1} MB in {:.2} s = {:.2} Mbits/sec ({})",
            total_bytes as f64 / 1e6,
            seconds,
            report.mbits_per_sec,
            report.path
        );
    }
    d.mesh.endpoint.close().await;
    Ok(())
}

/// Counts bytes and prints one line per interval.
struct Meter {
    start: Instant,
    mark: Instant,
    every: Duration,
    in_interval: u64,
    total: u64,
    intervals: Vec<Interval>,
    quiet: bool,
}

impl Meter {
    fn new(every: Duration, quiet: bool) -> Self {
        let now = Instant::now();
        Self {
            start: now,
            mark: now,
            every,
            in_interval: 0,
            total: 0,
            intervals: Vec::new(),
            quiet,
        }
    }

    fn add(&mut self, n: u64) {
        self.in_interval += n;
        self.total += n;
        let now = Instant::now();
        if now.duration_since(self.mark) >= self.every {
            self.close_interval(now);
        }
    }

    fn close_interval(&mut self, now: Instant) {
        let iv = Interval {
            start_s: self.mark.duration_since(self.start).as_secs_f64(),
            end_s: now.duration_since(self.start).as_secs_f64(),
            bytes: self.in_interval,
            mbits_per_sec: mbits(
                self.in_interval,
                now.duration_since(self.mark).as_secs_f64(),
            ),
        };
        if !self.quiet {
            println!(
                "{:6.2}-{:6.2} sec  {:10.2} Mbits/sec",
                iv.start_s, iv.end_s, iv.mbits_per_sec
            );
        }
        self.intervals.push(iv);
        self.in_interval = 0;
        self.mark = now;
    }

    /// Closes the last partial interval; returns total bytes and seconds.
    fn finish(&mut self) -> (u64, f64) {
        let now = Instant::now();
        if self.in_interval > 0 {
            self.close_interval(now);
        }
        (self.total, now.duration_since(self.start).as_secs_f64())
    }
}
