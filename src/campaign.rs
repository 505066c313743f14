//! `herald campaign run FILE`: uploads a receiver file as a campaign (streamed, never read into
//! memory whole), follows its first run with a progress bar on stderr, then prints the rows that
//! were not sent with their line numbers. Exits non-zero when the campaign failed or was
//! cancelled before its first run finished.

use anyhow::{Context, bail};
use futures::TryStreamExt;
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Campaign commands.
#[derive(clap::Subcommand)]
pub enum CampaignCommand {
    /// Uploads FILE (CSV: a `receiver` column and one column per template variable) as a
    /// campaign, shows the progress of its first run, then its bad rows.
    Run(RunArgs),
}

/// Arguments of `herald campaign run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The CSV file.
    file: PathBuf,
    /// The template to send.
    #[arg(long)]
    template: i64,
    /// The app's API key.
    #[arg(long)]
    key: String,
    /// Where herald's API is.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The campaign's name (default: the file's name).
    #[arg(long)]
    name: Option<String>,
    /// A cron schedule (5 fields, or 6 with seconds first); without it the campaign runs once.
    #[arg(long)]
    cron: Option<String>,
    /// The cron schedule's IANA time zone (default: the app policy's, else UTC).
    #[arg(long)]
    timezone: Option<String>,
    /// The first run, not before this time (RFC 3339).
    #[arg(long)]
    start_at: Option<String>,
}

/// How often the campaign is asked for its progress.
const POLL: Duration = Duration::from_millis(200);

/// Runs a campaign command.
pub async fn run(command: CampaignCommand) -> anyhow::Result<()> {
    match command {
        CampaignCommand::Run(args) => run_file(args).await,
    }
}

async fn run_file(args: RunArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let base = args.url.trim_end_matches('/').to_string();
    let id = upload(&http, &base, &args).await?;
    let url = format!("{base}/v1/campaigns/{id}");
    // Follow the first run until it is in the history (or the campaign ended without it).
    let campaign = loop {
        let c = get(&http, &url, &args.key).await?;
        draw(&c);
        let first_done = c["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|r| r["run"] == 1));
        if first_done || matches!(c["state"].as_str(), Some("failed" | "cancelled")) {
            break c;
        }
        tokio::time::sleep(POLL).await;
    };
    eprintln!();
    let first = get(&http, &format!("{url}?run=1&bad_limit=10000"), &args.key).await?;
    let run = first["history"]
        .as_array()
        .and_then(|h| h.iter().find(|r| r["run"] == 1).cloned());
    if let Some(r) = &run {
        println!(
            "campaign {id}, run 1: {} of {} rows accepted, {} bad",
            thousands(r["accepted"].as_i64().unwrap_or(0)),
            thousands(r["processed_rows"].as_i64().unwrap_or(0)),
            thousands(r["bad_rows"].as_i64().unwrap_or(0)),
        );
    }
    let bad = first["bad"].as_array().cloned().unwrap_or_default();
    if !bad.is_empty() {
        println!("rows not sent:");
        for b in &bad {
            println!(
                "  line {}: receiver {:?}: {}",
                b["line"],
                b["receiver"].as_str().unwrap_or_default(),
                b["reason"].as_str().unwrap_or_default()
            );
        }
        let total = run
            .as_ref()
            .and_then(|r| r["bad_rows"].as_i64())
            .unwrap_or(0);
        if total > bad.len() as i64 {
            println!(
                "  ... and {} more (only the first 10,000 are kept)",
                thousands(total - bad.len() as i64)
            );
        }
    }
    match campaign["state"].as_str() {
        Some("failed") => bail!(
            "campaign {id} failed: {}",
            campaign["error"].as_str().unwrap_or("no reason given")
        ),
        Some("cancelled") if run.is_none() => {
            bail!("campaign {id} was cancelled before its first run finished")
        }
        _ => {
            if let Some(next) = campaign["next_run_at"].as_str() {
                println!("campaign {id} runs again at {next}");
            }
            Ok(())
        }
    }
}

/// Streams the file to `POST /v1/campaigns`, showing how much was sent; returns the id.
async fn upload(http: &reqwest::Client, base: &str, args: &RunArgs) -> anyhow::Result<i64> {
    let file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let size = file.metadata().await?.len();
    let sent = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&sent);
    let stream = futures::stream::try_unfold(file, move |mut file| {
        let counted = Arc::clone(&counted);
        async move {
            let mut buf = Vec::with_capacity(256 * 1024);
            let n = (&mut file).take(256 * 1024).read_to_end(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            counted.fetch_add(n as u64, Ordering::Relaxed);
            Ok(Some((bytes::Bytes::from(buf), file)))
        }
    })
    .into_stream();
    let name = args.name.clone().unwrap_or_else(|| {
        args.file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mut query = vec![("template_id", args.template.to_string()), ("name", name)];
    for (k, v) in [
        ("cron", &args.cron),
        ("timezone", &args.timezone),
        ("start_at", &args.start_at),
    ] {
        if let Some(v) = v {
            query.push((k, v.clone()));
        }
    }
    let request = http
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&args.key)
        .header("content-type", "text/csv")
        .query(&query)
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let progress = tokio::spawn(async move {
        loop {
            let done = sent.load(Ordering::Relaxed);
            bar("uploading", done as i64, size as i64, "bytes", None);
            tokio::time::sleep(POLL).await;
        }
    });
    let response = request.await;
    progress.abort();
    let response = response.context("cannot reach herald")?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    if status.as_u16() != 201 {
        eprintln!();
        bail!(
            "herald refused the campaign ({status}): {} {}",
            body["error"]["code"].as_str().unwrap_or_default(),
            body["error"]["message"].as_str().unwrap_or_default()
        );
    }
    body["id"]
        .as_i64()
        .context("herald answered without a campaign id")
}

async fn get(http: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<Value> {
    let response = http
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .context("cannot reach herald")?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("herald answered {status}: {body}");
    }
    Ok(body)
}

/// The progress line of a campaign.
fn draw(c: &Value) {
    let n = |k: &str| c[k].as_i64().unwrap_or(0);
    match c["state"].as_str() {
        Some("waiting") if n("runs") == 0 => {
            let at = c["next_run_at"].as_str().unwrap_or("?");
            eprint!("\rwaiting for the first run at {at}\x1b[K");
            let _ = std::io::stderr().flush();
        }
        _ => bar(
            "",
            n("processed_rows"),
            n("total_rows"),
            "rows",
            Some(n("bad_rows")),
        ),
    }
}

/// `\r[#########           ] 45%  450,000/1,000,000 rows  3 bad` on stderr.
fn bar(label: &str, done: i64, total: i64, unit: &str, bad: Option<i64>) {
    const WIDTH: i64 = 20;
    let share = if total > 0 {
        (done.min(total) * 100) / total
    } else {
        0
    };
    let filled = (share * WIDTH / 100) as usize;
    let mut line = format!(
        "\r{label}{}[{}{}] {share:>3}%  {}/{} {unit}",
        if label.is_empty() { "" } else { " " },
        "#".repeat(filled),
        " ".repeat(WIDTH as usize - filled),
        thousands(done),
        thousands(total),
    );
    if let Some(bad) = bad {
        line.push_str(&format!("  {} bad", thousands(bad)));
    }
    eprint!("{line}\x1b[K");
    let _ = std::io::stderr().flush();
}

/// `1234567` as `1,234,567`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_are_separated() {
        for (n, s) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (450_000, "450,000"),
            (1_000_000, "1,000,000"),
            (-12_345, "-12,345"),
        ] {
            assert_eq!(thousands(n), s);
        }
    }
}
