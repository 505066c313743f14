//! The checks behind the fuzz targets in `fuzz/` and the replay of their inputs
//! (`fuzz/seeds/<target>/`, `fuzz/corpus/<target>/`, by this module's tests): the bodies of
//! `POST /v1/send`, `POST /v1/send/batch` and `PUT /v1/policy`, the records Kafka producers
//! write to `herald.requests`, and the receiver files of `POST /v1/campaigns`, each run through
//! the parsing and validation herald runs on them.
//! Templates come from a fixed set (chosen by `template_id`) instead of the store; API keys and
//! the accounts a policy names are not looked up. The renderer's own target is
//! `herald_core::fuzzing`.
//!
//! A check panics when a promise breaks: bad input answered with anything but a `4xx`, a bad
//! producer's record not refused outright (so never dead-lettered), an accepted message whose
//! record dispatch could not read back, whose receiver is not in canonical form, or whose
//! content is over the size limit, a valid policy that dispatch evaluates wrongly, or a
//! campaign file whose rows depend on how its upload was framed or that a run cannot read.

use crate::ApiError;
use crate::body::parse_json;
use crate::campaign::csvfile::{self, BadCsv, Splitter};
use crate::producer::{ProducerError, ProducerRequest, Source};
use crate::send::{BatchBody, Group, SendBody, Timing, build_records};
use axum::response::IntoResponse;
use chrono::DateTime;
use herald_core::config::{HttpConfig, Secret};
use herald_core::domain::parse_receiver;
use herald_core::policy::{AppPolicy, window_start};
use herald_core::store::{App, Template};
use herald_core::template::MAX_RENDERED_BYTES;
use herald_core::{Channel, MessageId, MessageRecord, MsgType};
use serde_json::json;
use std::collections::HashSet;
use std::sync::LazyLock;

/// What one input came to: the number of message records, or the error code.
pub type Outcome = Result<usize, &'static str>;

/// A body of `POST /v1/send`.
pub fn send(data: &[u8]) -> Outcome {
    let body: SendBody = parse_json(data).map_err(client_error)?;
    accepted(body.template_id, &body.timing(), &body.groups(), false)
}

/// A body of `POST /v1/send/batch`.
pub fn send_batch(data: &[u8]) -> Outcome {
    let body: BatchBody = parse_json(data).map_err(client_error)?;
    let groups = body
        .groups(CONFIG.max_batch_messages)
        .map_err(client_error)?;
    accepted(body.template_id, &body.timing(), &groups, true)
}

/// A record on `herald.requests` that is not a message record of herald's own: a producer's
/// request, as dispatch hands it to ingest's checks.
pub fn kafka_record(data: &[u8]) -> Outcome {
    let refusal = |e: ProducerError| match e {
        ProducerError::Refused { code, .. } => code,
        ProducerError::Unavailable(why) => {
            panic!("a bad record would be retried forever instead of dead-lettered: {why}")
        }
    };
    let request = ProducerRequest::decode(data, &CONFIG).map_err(refusal)?;
    let source = Source {
        topic: "herald.requests",
        partition: 0,
        offset: 7,
    };
    let records = request
        .records(&CONFIG, &APP, fixture(request.template_id), source)
        .map_err(refusal)?;
    check_records(&records);
    Ok(records.len())
}

/// A body of `PUT /v1/policy`, checked and compiled as the handler does, then evaluated as
/// dispatch evaluates it, at a few instants (daylight-saving changes among them).
pub fn policy(data: &[u8]) -> Outcome {
    let doc: AppPolicy = parse_json(data).map_err(client_error)?;
    let policy = doc
        .compile()
        .map_err(|m| client_error(ApiError::invalid("bad_policy", m)))?;
    let tz = policy.timezone;
    for at in INSTANTS {
        let at = DateTime::from_timestamp(at, 0).expect("a valid instant");
        if let Some((window, _)) = &policy.quiet_hours
            && let Some(end) = window.ends_after(at, tz)
        {
            assert!(end > at, "quiet hours at {at} end at {end}");
        }
        for cap in &policy.frequency_caps {
            let at_ms = at.timestamp_millis();
            let start = window_start(at_ms, cap.period_secs, tz);
            assert!(start <= at_ms && at_ms - start < cap.period_secs as i64 * 1000);
        }
    }
    for route in &policy.routes {
        let mut ids: Vec<i64> = route.accounts.iter().map(|a| a.account_id).collect();
        ids.sort_unstable();
        for draw in [0, 1, 4_999, u64::MAX] {
            let mut order = route.order(draw);
            let first = route.accounts.iter().find(|a| a.account_id == order[0]);
            assert!(
                first.is_some_and(|a| a.weight > 0),
                "a standby account first"
            );
            order.sort_unstable();
            assert_eq!(order, ids, "the order is not a permutation of the accounts");
        }
    }
    for limit in &policy.receiver_rate_limits {
        let (interval, burst) = limit.pace();
        assert!(
            interval >= 1 && burst >= 0,
            "pace {interval} µs, burst {burst} µs"
        );
    }
    let mut content = json!([doc.sensitive_words.join(" "), "plain text"]);
    let masked = policy.dictionary.mask(&mut content);
    assert!(
        masked > 0 || doc.sensitive_words.is_empty(),
        "a word was not found"
    );
    assert_eq!(
        policy.dictionary.matches(&content),
        Vec::<String>::new(),
        "a word is left after masking"
    );
    Ok(policy.routes.len())
}

/// A receiver file of `POST /v1/campaigns` (the input after its first byte), split into stored
/// pieces as the upload handler splits it, in frames of 1 to 256 bytes (the first byte picks
/// the size), then read back piece by piece as a campaign run reads it. The rows and lines must
/// be those of the same file in one frame, the data rows those the `csv` crate reads from the
/// whole file, and every piece of an accepted file must read back.
pub fn campaign_file(data: &[u8]) -> Outcome {
    let Some((&step, file)) = data.split_first() else {
        return Err("no_input");
    };
    let framed = split_campaign_file(file, usize::from(step) + 1);
    let whole = split_campaign_file(file, file.len().max(1));
    assert_eq!(framed, whole, "the framing of the upload changed its rows");
    let (_, rows) = framed.map_err(|_| "bad_csv")?;
    let mut lines = rows.iter().map(|(line, _)| *line);
    let mut last = 1;
    assert!(
        lines.all(|line| std::mem::replace(&mut last, line) < line),
        "row lines do not increase from 2"
    );
    let records: Vec<Vec<Vec<u8>>> = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(file)
        .into_byte_records()
        .map(|r| {
            r.expect("bytes in memory read")
                .iter()
                .map(<[u8]>::to_vec)
                .collect()
        })
        .collect();
    let fields: Vec<&Vec<Vec<u8>>> = rows.iter().map(|(_, f)| f).collect();
    assert_eq!(
        fields,
        records.iter().skip(1).collect::<Vec<_>>(),
        "the rows differ from the csv crate's reading of the file"
    );
    Ok(rows.len())
}

/// A campaign file's header and rows (line, fields), uploaded in `step`-byte frames.
pub(crate) type SplitFile = (Vec<String>, Vec<(i64, Vec<Vec<u8>>)>);

pub(crate) fn split_campaign_file(file: &[u8], step: usize) -> Result<SplitFile, BadCsv> {
    let mut splitter = Splitter::new();
    let mut pieces = Vec::new();
    for frame in file.chunks(step) {
        pieces.extend(splitter.push(frame)?);
    }
    pieces.extend(splitter.finish()?);
    let mut rows = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        assert_eq!(piece.seq, i as i64, "pieces out of order");
        assert_eq!(piece.first_row, rows.len() as i64, "piece {i}'s first row");
        for row in csvfile::rows(piece) {
            let row = row.expect("a stored piece of an accepted file reads back");
            rows.push((row.line, row.fields.iter().map(<[u8]>::to_vec).collect()));
        }
    }
    assert_eq!(
        rows.len() as i64,
        splitter.rows(),
        "the upload counted other rows than its pieces hold"
    );
    let header = splitter.header().expect("a header once finished").to_vec();
    Ok((header, rows))
}

/// Unix times policies are evaluated at: the EU's and the US's daylight-saving changes of 2026,
/// Australia's, the epoch and one ordinary day.
const INSTANTS: [i64; 6] = [
    1_774_746_000,
    1_792_890_000,
    1_772_953_200,
    1_775_318_400,
    0,
    1_795_780_800,
];

/// Validates and renders like the send handlers, then checks the records.
fn accepted(template_id: i64, timing: &Timing, groups: &[Group<'_>], batch: bool) -> Outcome {
    let records = build_records(
        &CONFIG,
        &APP,
        fixture(template_id),
        timing,
        groups,
        batch,
        "request",
        &mut |n| MessageId(uuid::Uuid::from_u128(n as u128)),
    )
    .map_err(client_error)?;
    let total: usize = groups.iter().map(|g| g.receivers.len()).sum();
    assert_eq!(records.len(), total, "one record per receiver");
    check_records(&records);
    Ok(records.len())
}

/// The code of an error answered to bad input, which must be a client error.
fn client_error(e: ApiError) -> &'static str {
    let code = e.code();
    let status = e.into_response().status();
    assert!(
        status.is_client_error(),
        "bad input answered {status} ({code})"
    );
    code
}

fn check_records(records: &[MessageRecord]) {
    let mut ids = HashSet::new();
    for r in records {
        assert!(
            ids.insert(r.message_id),
            "message id {} twice",
            r.message_id
        );
        assert_eq!(
            parse_receiver(r.channel, &r.receiver).as_deref(),
            Ok(r.receiver.as_str()),
            "the receiver is not in canonical form"
        );
        let content = serde_json::to_vec(&r.content).expect("content serialises");
        assert!(
            content.len() <= MAX_RENDERED_BYTES,
            "content of {} bytes",
            content.len()
        );
        let wire = serde_json::to_vec(r).expect("a record serialises");
        let back: MessageRecord =
            serde_json::from_slice(&wire).expect("dispatch reads the record back");
        assert_eq!(&back, r, "the record changed on the wire");
    }
}

/// Unsubscribe links are configured, so templates using them take the per-receiver path.
static CONFIG: LazyLock<HttpConfig> = LazyLock::new(|| HttpConfig {
    public_url: Some("https://push.example.com".into()),
    unsubscribe_secret: Some(Secret::new("fuzzing-unsubscribe-secret")),
    ..HttpConfig::default()
});

static APP: LazyLock<App> = LazyLock::new(|| App {
    id: 1,
    name: "shop".into(),
});

/// The template a request's `template_id` stands for: one of a few realistic ones.
fn fixture(template_id: i64) -> &'static Template {
    static TEMPLATES: LazyLock<Vec<Template>> = LazyLock::new(|| {
        let template = |channel, msg_type, content| Template {
            id: 0,
            name: "fixture".into(),
            channel,
            msg_type,
            account_id: Some(1),
            content,
            version: 1,
            created_at: 0,
            updated_at: 0,
        };
        vec![
            template(
                Channel::Sms,
                MsgType::AuthCode,
                json!({"text": "Your code is {$code}; it expires in {$minutes} minutes."}),
            ),
            template(
                Channel::Email,
                MsgType::Marketing,
                json!({"subject": "{$name}, this week's offers",
                       "html": "<p>Hi {$name}, {$offer}</p><a href=\"{$unsubscribe_url}\">unsubscribe</a>"}),
            ),
            template(
                Channel::Webhook,
                MsgType::Notice,
                json!({"event": "order.shipped",
                       "data": {"order": "{$order}", "items": ["{$item}", 2, true, null],
                                "note": "{$note} {$}{$x y}"}}),
            ),
            template(
                Channel::Inbox,
                MsgType::Notice,
                json!({"title": "{$title}", "body": "{$body}"}),
            ),
        ]
    });
    let i = template_id.rem_euclid(TEMPLATES.len() as i64) as usize;
    &TEMPLATES[i]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// A target's check.
    type Check = fn(&[u8]) -> Outcome;

    /// Every fuzz target, by its name in `fuzz/fuzz_targets/`, `fuzz/seeds/` and `fuzz/corpus/`.
    const TARGETS: [(&str, Check); 6] = [
        ("send", send),
        ("send_batch", send_batch),
        ("kafka_record", kafka_record),
        ("policy", policy),
        ("template", template),
        ("campaign_file", campaign_file),
    ];

    fn template(data: &[u8]) -> Outcome {
        herald_core::fuzzing::template(data).map_err(|_| "refused")
    }

    #[test]
    fn fuzz_checks_answer_known_inputs() {
        let many = format!(
            r#"{{"template_id": 3, "messages": [{}]}}"#,
            [r#"{"receivers": ["u"]}"#; 1001].join(",")
        );
        let cases: &[(Check, &[u8], Outcome)] = &[
            (send, b"not json", Err("bad_json")),
            (send, br#"{"template_id": 0, "receivers": ["x"], "extra": 1}"#, Err("bad_json")),
            (
                send,
                br#"{"template_id": 0, "receivers": ["13812345678", "+44 20 7946 0958"],
                     "variables": {"code": "1234", "minutes": 5}}"#,
                Ok(2),
            ),
            (
                send,
                br#"{"template_id": 0, "receivers": ["12345"], "variables": {"code": 1, "minutes": 5}}"#,
                Err("bad_receiver"),
            ),
            (
                send,
                br#"{"template_id": 3, "receivers": ["u"], "variables": {"title": "t"}}"#,
                Err("missing_variable"),
            ),
            (
                send,
                br#"{"template_id": 3, "receivers": ["u"], "variables": {"title": "t", "body": "b"},
                     "timezone": "Mars/Olympus"}"#,
                Err("bad_timezone"),
            ),
            (send_batch, many.as_bytes(), Err("too_many_messages")),
            (
                send_batch,
                br#"{"template_id": 1, "messages": [{"receivers": ["Ann@Example.COM"],
                     "variables": {"name": "Ann", "offer": "-10%"}},
                     {"receivers": [], "variables": {"name": "B", "offer": "x"}}]}"#,
                Err("no_receivers"),
            ),
            (kafka_record, b"{}", Err("malformed_record")),
            (
                kafka_record,
                br#"{"v": 2, "app": "shop", "template_id": 3, "messages": []}"#,
                Err("unsupported_version"),
            ),
            (
                kafka_record,
                br#"{"v": 1, "app": "shop", "template_id": 3, "messages": [{"receivers": ["u1", "u2"],
                     "variables": {"title": "t", "body": "b"}}]}"#,
                Ok(2),
            ),
            (policy, br#"{"content_dedup_secs": 0}"#, Err("bad_policy")),
            (policy, br#"{"quiet_hours": {}}"#, Err("bad_json")),
            (
                policy,
                br#"{"timezone": "Europe/Berlin", "quiet_hours": {"start": "01:30", "end": "02:30"},
                     "routes": [{"channel": "sms", "accounts": [{"account_id": 3, "weight": 1}]}]}"#,
                Ok(1),
            ),
            (campaign_file, b"", Err("no_input")),
            (campaign_file, b"\x00name\nx\n", Err("bad_csv")),
            (campaign_file, b"\x00\xef\xbb\xbfreceiver\r\n\r\nu1\n\"u\n2\"\nu3", Ok(3)),
            (campaign_file, b"\x02receiver,name\nu1\nu2,a,b\n", Ok(2)),
        ];
        for &(check, input, expected) in cases {
            assert_eq!(check(input), expected, "{}", String::from_utf8_lossy(input));
        }
    }

    proptest::proptest! {
        /// Campaign files made of the pieces that trouble CSV parsers (quotes, separators,
        /// every line end, blank lines, a byte order mark, bytes that are not UTF-8), half of
        /// them after a good header, in every framing.
        #[test]
        fn campaign_files_read_the_same_in_every_framing(
            step in 0u8..=255,
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "receiver", "\"receiver\"", "name", "u1", ",", "\"", "\"\"", "\n", "\r\n", "\r", " ",
                "\u{feff}", "\u{7}", "é", "\u{0}",
            ]), 0..40),
            header in proptest::bool::ANY,
            not_utf8 in proptest::bool::ANY,
        ) {
            let mut data = vec![step];
            if header {
                data.extend_from_slice(b"receiver,name\n");
            }
            data.extend(pieces.concat().bytes());
            if not_utf8 {
                data.push(0xff);
            }
            let _ = campaign_file(&data);
        }
    }

    /// Replays `fuzz/seeds/` (hand-written inputs and past findings) and `fuzz/corpus/` (what
    /// fuzzing found, minimised): no check fails, no input takes a second.
    #[test]
    fn fuzz_corpus_replays_without_a_finding() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
        names.sort();
        for dir in ["seeds", "corpus"] {
            let mut dirs: Vec<String> = std::fs::read_dir(fuzz.join(dir))
                .expect("fuzz/seeds and fuzz/corpus")
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            dirs.sort();
            assert_eq!(dirs, names, "a directory per target in fuzz/{dir}");
        }
        for (name, check) in TARGETS {
            let mut files = 0;
            for dir in ["seeds", "corpus"] {
                for entry in std::fs::read_dir(fuzz.join(dir).join(name)).unwrap() {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    let start = Instant::now();
                    let outcome = std::panic::catch_unwind(|| check(&data));
                    let took = start.elapsed();
                    assert!(outcome.is_ok(), "{} fails its check", path.display());
                    assert!(
                        took < Duration::from_secs(1),
                        "{} took {took:?}",
                        path.display()
                    );
                    files += 1;
                }
            }
            assert!(files > 0, "no input for {name}");
        }
    }
}
