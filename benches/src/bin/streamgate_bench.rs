//! `streamgate-bench`: drive a running gateway (or the FastAPI baseline) over real HTTP and
//! measure streams on the wire: time to first token, inter-token gaps, tokens, `[DONE]`,
//! statuses (429/503 apart). Bounded in count and time; targets only the URL it is given.
//!
//!     streamgate-bench --url http://127.0.0.1:8000 --concurrency 64 --duration-secs 10 \
//!         --max-tokens 64 --server-pid $PID --json out.json --svg out.svg

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use streamgate_benches::client::{Connection, Route, StreamResult, process_usage, run_stream};
use streamgate_benches::report::{Series, cdf, rate_over_time, render};
use streamgate_benches::stats::Percentiles;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "SSE load generator for streamgate")]
struct Args {
    /// Base URL of the server (http only), e.g. http://127.0.0.1:8000.
    #[arg(long)]
    url: String,
    #[arg(long, value_enum, default_value_t = Route::Native)]
    route: Route,
    /// Model version (native and AI SDK routes) or model name (OpenAI route).
    #[arg(long, default_value = "v1")]
    version: String,
    /// Streams kept open at once (closed loop).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Open loop instead: start this many requests per second (each on its own connection).
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many requests in total.
    #[arg(long, default_value_t = 1_000_000)]
    requests: usize,
    /// Stop starting requests after this many seconds (open streams get 30 s more at most).
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Spread the start of the concurrent streams over this many seconds.
    #[arg(long, default_value_t = 0.0)]
    ramp_up_secs: f64,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature sent with each request (0 = greedy: streams run to --max-tokens);
    /// the server's default when not given.
    #[arg(long)]
    temperature: Option<f64>,
    /// Prompts, used in turn (repeat the flag); or --prompts-file, one per line.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    #[arg(long)]
    prompts_file: Option<std::path::PathBuf>,
    /// Client threads (0 = the machine's cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Server process to sample for CPU time and resident memory (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// A label for the report.
    #[arg(long, default_value = "run")]
    label: String,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
    /// No progress bar (CI logs).
    #[arg(long)]
    quiet: bool,
    /// Open a new TCP connection for every stream instead of reusing one per client
    /// (HTTP/1.1 keep-alive, what browsers and proxies do).
    #[arg(long)]
    new_connection_per_stream: bool,
}

#[derive(Serialize)]
struct Summary {
    label: String,
    args: Args,
    wall_s: f64,
    streams: usize,
    completed: usize,
    errors: usize,
    status_429: usize,
    status_503: usize,
    other_status: usize,
    token_events: usize,
    events_per_s: f64,
    streams_per_s: f64,
    ttft_ms: Percentiles,
    inter_token_ms: Percentiles,
    server_cpu_s: Option<f64>,
    server_cpu_us_per_event: Option<f64>,
    /// The load generator's own CPU per token event: near a core's worth, it is the bottleneck.
    client_cpu_us_per_event: Option<f64>,
    server_rss_before_kib: Option<u64>,
    server_rss_peak_kib: Option<u64>,
    server_kib_per_open_stream: Option<f64>,
    max_open_streams: usize,
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), AnyError> {
    let args = Args::parse();
    let hostport = args
        .url
        .strip_prefix("http://")
        .ok_or("--url must start with http://")?
        .trim_end_matches('/')
        .to_owned();
    let mut prompts = args.prompts.clone();
    if let Some(file) = &args.prompts_file {
        prompts.extend(
            std::fs::read_to_string(file)?.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned),
        );
    }
    if prompts.is_empty() {
        prompts.push("Write a short poem about the sea.".into());
    }
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        prompts
            .iter()
            .map(|p| {
                args.route.request(
                    &hostport,
                    &args.version,
                    p,
                    args.max_tokens,
                    args.temperature,
                    !args.new_connection_per_stream,
                )
            })
            .collect(),
    );
    let threads = if args.threads > 0 {
        args.threads
    } else {
        std::thread::available_parallelism().map_or(2, usize::from)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;

    let before = args.server_pid.and_then(process_usage);
    let client_before = process_usage(std::process::id());
    let started = Instant::now();
    let stop_starting = started + Duration::from_secs_f64(args.duration_secs);
    let hard_deadline = stop_starting + Duration::from_secs(30);
    let issued = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let progress = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.requests.min(1_000_000) as u64)
    };
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} {wide_bar} {pos} streams {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // Sample the server's memory while the run goes on (peak RSS → memory per open stream).
    let peak_rss = Arc::new(AtomicUsize::new(before.map_or(0, |b| b.1 as usize)));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = args.server_pid.map(|pid| {
        let (peak, on) = (peak_rss.clone(), sampling.clone());
        std::thread::spawn(move || {
            while on.load(Ordering::Relaxed) {
                if let Some((_, rss)) = process_usage(pid) {
                    peak.fetch_max(rss as usize, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    });

    let results: Vec<StreamResult> = runtime.block_on(async {
        let mut handles = Vec::new();
        let addr = Arc::new(hostport.clone());
        let route = args.route;
        let one = {
            let (issued, open, max_open, progress) =
                (issued.clone(), open.clone(), max_open.clone(), progress.clone());
            move |addr: Arc<String>, request: Vec<u8>, mut conn: Option<Connection>| {
                let (open, max_open, progress) = (open.clone(), max_open.clone(), progress.clone());
                let _ = &issued;
                async move {
                    let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
                    max_open.fetch_max(now_open, Ordering::Relaxed);
                    let r = run_stream(&mut conn, &addr, &request, route, started, hard_deadline).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                    progress.inc(1);
                    (r, conn)
                }
            }
        };
        if let Some(rate) = args.rate {
            // Open loop: one new request every 1/rate seconds, each its own task.
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            loop {
                tick.tick().await;
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= args.requests || Instant::now() >= stop_starting {
                    break;
                }
                let request = requests[n % requests.len()].clone();
                let task = one(addr.clone(), request, None);
                handles.push(tokio::spawn(async move { vec![task.await.0] }));
            }
        } else {
            for worker in 0..args.concurrency {
                let (addr, requests, issued) = (addr.clone(), requests.clone(), issued.clone());
                let one = one.clone();
                let delay = Duration::from_secs_f64(
                    args.ramp_up_secs * worker as f64 / args.concurrency.max(1) as f64,
                );
                let limit = args.requests;
                let reuse = !args.new_connection_per_stream;
                handles.push(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut mine = Vec::new();
                    let mut conn = None;
                    loop {
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        if n >= limit || Instant::now() >= stop_starting {
                            break;
                        }
                        let (result, kept) =
                            one(addr.clone(), requests[n % requests.len()].clone(), conn).await;
                        conn = if reuse { kept } else { None };
                        mine.push(result);
                    }
                    mine
                }));
            }
        }
        let mut all = Vec::new();
        for h in handles {
            if let Ok(mut rs) = h.await {
                all.append(&mut rs);
            }
        }
        all
    });
    let wall = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    sampling.store(false, Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.join();
    }
    let after = args.server_pid.and_then(process_usage);
    let client_cpu = client_before.zip(process_usage(std::process::id())).map(|(b, a)| a.0 - b.0);

    let token_events: usize = results.iter().map(|r| r.tokens).sum();
    let ok = |r: &&StreamResult| r.status == 200;
    let cpu = before.zip(after).map(|(b, a)| a.0 - b.0);
    let max_open_streams = max_open.load(Ordering::Relaxed);
    let peak = peak_rss.load(Ordering::Relaxed) as u64;
    let summary = Summary {
        label: args.label.clone(),
        args: args.clone(),
        wall_s: wall,
        streams: results.len(),
        completed: results.iter().filter(|r| r.done).count(),
        errors: results.iter().filter(ok).filter(|r| r.error.is_some() || !r.done).count()
            + results.iter().filter(|r| r.status == 0).count(),
        status_429: results.iter().filter(|r| r.status == 429).count(),
        status_503: results.iter().filter(|r| r.status == 503).count(),
        other_status: results.iter().filter(|r| ![0, 200, 429, 503].contains(&r.status)).count(),
        token_events,
        events_per_s: token_events as f64 / wall,
        streams_per_s: results.len() as f64 / wall,
        ttft_ms: Percentiles::of(results.iter().filter_map(|r| r.ttft_ms).collect()),
        inter_token_ms: Percentiles::of(
            results.iter().flat_map(|r| r.gaps_ms.iter().map(|g| f64::from(*g))).collect(),
        ),
        server_cpu_s: cpu,
        server_cpu_us_per_event: cpu.filter(|_| token_events > 0).map(|c| c * 1e6 / token_events as f64),
        client_cpu_us_per_event: client_cpu
            .filter(|_| token_events > 0)
            .map(|c| c * 1e6 / token_events as f64),
        server_rss_before_kib: before.map(|b| b.1),
        server_rss_peak_kib: args.server_pid.map(|_| peak),
        server_kib_per_open_stream: before
            .filter(|_| max_open_streams > 0)
            .map(|b| peak.saturating_sub(b.1) as f64 / max_open_streams as f64),
        max_open_streams,
    };

    let mut out = std::io::stdout().lock();
    let p = |x: &Percentiles| format!("{:>9.2} {:>9.2} {:>9.2} {:>9.2}", x.p50, x.p90, x.p99, x.max);
    writeln!(
        out,
        "{} — {:?} {} streams in {:.1} s ({:.0} streams/s), {} completed with [DONE]",
        summary.label, args.route, summary.streams, wall, summary.streams_per_s, summary.completed
    )?;
    writeln!(
        out,
        "  statuses: 429 {}  503 {}  other {}  stream errors {}",
        summary.status_429, summary.status_503, summary.other_status, summary.errors
    )?;
    writeln!(out, "                         p50       p90       p99       max")?;
    writeln!(out, "  TTFT (ms)        {}", p(&summary.ttft_ms))?;
    writeln!(out, "  inter-token (ms) {}", p(&summary.inter_token_ms))?;
    writeln!(
        out,
        "  token events: {} ({:.0}/s); max open streams {}",
        token_events, summary.events_per_s, max_open_streams
    )?;
    if let (Some(cpu), Some(per)) = (summary.server_cpu_s, summary.server_cpu_us_per_event) {
        writeln!(out, "  server CPU: {cpu:.2} s = {per:.3} µs per token event")?;
    }
    if let Some(per) = summary.client_cpu_us_per_event {
        writeln!(out, "  load generator CPU: {per:.3} µs per token event")?;
    }
    if let (Some(b), Some(pk)) = (summary.server_rss_before_kib, summary.server_rss_peak_kib) {
        writeln!(
            out,
            "  server RSS: {b} KiB before, {pk} KiB peak ({:.1} KiB per open stream)",
            summary.server_kib_per_open_stream.unwrap_or(0.0)
        )?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    if let Some(path) = &args.svg {
        let ttft = vec![Series {
            label: &args.label,
            color: "#2f5bd3",
            points: cdf(results.iter().filter_map(|r| r.ttft_ms).collect()),
        }];
        let gaps = vec![Series {
            label: &args.label,
            color: "#2f5bd3",
            points: cdf(results.iter().flat_map(|r| r.gaps_ms.iter().map(|g| f64::from(*g))).collect()),
        }];
        let times: Vec<f64> = results
            .iter()
            .filter_map(|r| r.ttft_ms.map(|t| (r, t)))
            .flat_map(|(r, t)| {
                let mut at = r.started_s + t / 1e3;
                std::iter::once(at).chain(r.gaps_ms.iter().map(move |g| {
                    at += f64::from(*g) / 1e3;
                    at
                }))
            })
            .collect();
        let tput =
            vec![Series { label: &args.label, color: "#1f7a3d", points: rate_over_time(&times, 0.25) }];
        std::fs::write(path, render(&format!("streamgate-bench: {}", args.label), &ttft, &gaps, &tput))?;
    }
    Ok(())
}
