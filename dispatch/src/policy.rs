//! The policy stages of the send pipeline, in order: scheduling (`send_at`), the template's
//! kill switch, receiver lists, quiet hours, sensitive words, then content dedup and frequency
//! caps. All but the last two are decided here from the app's policy document (read through a
//! cache of [`DispatchConfig::policy_cache_ttl`], so changes apply without a restart); dedup and
//! caps are counters in the store, passed in the claim transaction (`Store::claim_messages`)
//! so that they hold across workers and restarts. Sensitive words are checked before the
//! counters, so a rejected message does not use up a receiver's cap.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use herald_core::config::DispatchConfig;
use herald_core::policy::sensitive::Dictionary;
use herald_core::policy::{Policy, QuietMode, SensitiveAction, window_start};
use herald_core::store::{LedgerState, Limit, ListName, ScheduleKind, Store, StoreError};
use herald_core::{Channel, MessageRecord, MsgType, State};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// A `send_at` at most this far ahead counts as due (clocks of processes differ a little).
const DUE_TOLERANCE: chrono::Duration = chrono::Duration::milliseconds(100);

/// What the policies decided for one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Send it, once it passed `limits`; `masked` holds the content with sensitive words masked
    /// and the words found.
    Send {
        limits: Vec<Limit>,
        masked: Option<(serde_json::Value, Vec<String>)>,
    },
    /// Do not send it.
    Stop(Stop),
    /// Keep it until `until`.
    Wait {
        kind: ScheduleKind,
        until: DateTime<Utc>,
    },
}

/// Why a message is not sent: its ledger state, its event and the event's code and detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub ledger: LedgerState,
    pub state: State,
    pub code: &'static str,
    pub detail: String,
}

impl Stop {
    fn new(ledger: LedgerState, state: State, code: &'static str, detail: String) -> Self {
        Stop {
            ledger,
            state,
            code,
            detail,
        }
    }

    /// The stop a limit's refusal in the store stands for.
    pub fn of_limit(ledger: LedgerState) -> Self {
        match ledger {
            LedgerState::DedupContent => Stop::new(
                ledger,
                State::DedupContent,
                "duplicate_content",
                "the same content went to this receiver within the dedup window".into(),
            ),
            _ => Stop::new(
                ledger,
                State::DedupFrequency,
                "frequency_cap",
                "the receiver reached a frequency cap".into(),
            ),
        }
    }
}

/// An app's compiled policy and which of its channels have an allowlist.
struct AppPolicies {
    policy: Policy,
    allowlisted: HashSet<Channel>,
    /// The version of the shared dictionary compiled in.
    shared_version: u64,
}

/// Evaluates policies for a dispatch worker.
pub struct Policies {
    store: Store,
    ttl: std::time::Duration,
    cache: Mutex<HashMap<String, (Arc<AppPolicies>, Instant)>>,
    shared: SharedWords,
}

/// The sensitive words of `dispatch.sensitive_words_file`, re-read when the file changes.
struct SharedWords {
    path: Option<PathBuf>,
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    /// When the file was last looked at.
    checked: Option<Instant>,
    modified: Option<SystemTime>,
    words: Arc<Vec<String>>,
    /// Raised on every change, so that apps' compiled dictionaries are rebuilt.
    version: u64,
}

impl SharedWords {
    /// The current words and their version; looks at the file at most once per `ttl`. A file
    /// that cannot be read or holds a bad word keeps the last good words, loudly.
    fn current(&self, ttl: std::time::Duration) -> (Arc<Vec<String>>, u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.path else {
            return (Arc::clone(&s.words), s.version);
        };
        if s.checked.is_some_and(|at| at.elapsed() < ttl) {
            return (Arc::clone(&s.words), s.version);
        }
        s.checked = Some(Instant::now());
        let modified = std::fs::metadata(path).and_then(|m| m.modified());
        match modified {
            Ok(m) if s.modified == Some(m) => {}
            Ok(m) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    let words = Dictionary::words_of_file(&text);
                    match Dictionary::new(&words) {
                        Ok(_) => {
                            tracing::info!(path = %path.display(), words = words.len(), "sensitive words loaded");
                            s.words = Arc::new(words);
                            s.modified = Some(m);
                            s.version += 1;
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), error = %e, "bad sensitive words file; keeping the last good words")
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot read the sensitive words file; keeping the last good words")
                }
            },
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the sensitive words file; keeping the last good words")
            }
        }
        (Arc::clone(&s.words), s.version)
    }
}

impl Policies {
    /// Policies read from `store`.
    pub fn new(store: Store, config: &DispatchConfig) -> Self {
        Policies {
            store,
            ttl: config.policy_cache_ttl,
            cache: Mutex::default(),
            shared: SharedWords {
                path: config.sensitive_words_file.clone(),
                state: Mutex::default(),
            },
        }
    }

    /// One verdict per record, in order; `now` is the batch's time.
    pub async fn evaluate(
        &self,
        records: &[&MessageRecord],
        now: DateTime<Utc>,
    ) -> Result<Vec<Verdict>, StoreError> {
        let mut apps: HashMap<&str, Arc<AppPolicies>> = HashMap::new();
        let mut memberships = HashSet::new();
        let mut by_app: HashMap<&str, Vec<&str>> = HashMap::new();
        for r in records {
            by_app.entry(&r.app).or_default().push(&r.receiver);
        }
        for (app, receivers) in by_app {
            apps.insert(app, self.app(app).await?);
            for (channel, list, receiver) in self.store.list_memberships(app, &receivers).await? {
                memberships.insert((app, channel, list, receiver));
            }
        }
        Ok(records
            .iter()
            .map(|r| {
                let listed = |list| {
                    memberships.contains(&(r.app.as_str(), r.channel, list, r.receiver.clone()))
                };
                verdict(r, &apps[r.app.as_str()], &listed, now)
            })
            .collect())
    }

    /// The accounts a message may be sent through, in the order it tries them: its app's route
    /// for its channel and type (the first drawn by weight from bits of the message id), else
    /// its template's account.
    pub async fn accounts_for(&self, r: &MessageRecord) -> Result<Vec<i64>, StoreError> {
        let app = self.app(&r.app).await?;
        Ok(match app.policy.route(r.channel, r.msg_type) {
            Some(route) => route.order(r.message_id.0.as_u128() as u64),
            None => r.account_id.into_iter().collect(),
        })
    }

    /// The receiver timelines a message must take a slot on: each limit's key (a digest of app,
    /// limit, channel and receiver), pace and burst allowance (µs).
    pub async fn receiver_limits(
        &self,
        r: &MessageRecord,
    ) -> Result<Vec<(i64, i64, i64)>, StoreError> {
        let app = self.app(&r.app).await?;
        Ok(app
            .policy
            .receiver_limits_for(r.channel, r.msg_type)
            .map(|(i, l)| {
                let key = digest(&[&r.app, &i.to_string(), r.channel.as_str(), &r.receiver]);
                let (interval, burst) = l.pace();
                (key, interval, burst)
            })
            .collect())
    }

    /// The rate limit (per second) the app set on `account`.
    pub async fn rate_limit(&self, app: &str, account: i64) -> Result<Option<u32>, StoreError> {
        Ok(self.app(app).await?.policy.rate_limit(account))
    }

    /// The app's policies, through the cache. A bad stored document (which the API never
    /// writes) counts as no policy, loudly.
    async fn app(&self, app: &str) -> Result<Arc<AppPolicies>, StoreError> {
        let (shared, version) = self.shared.current(self.ttl);
        if let Some((p, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(app)
            && at.elapsed() < self.ttl
            && p.shared_version == version
        {
            return Ok(Arc::clone(p));
        }
        let (doc, allowlisted) = self.store.app_policy_by_name(app).await?;
        let policy = doc.compile_with(&shared).unwrap_or_else(|e| {
            tracing::error!(app, error = %e, "stored policy is invalid; applying none");
            Policy::default()
        });
        let p = Arc::new(AppPolicies {
            policy,
            allowlisted,
            shared_version: version,
        });
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app.to_string(), (Arc::clone(&p), Instant::now()));
        Ok(p)
    }
}

/// The verdict on one message; `listed(list)` says whether its receiver is on that list for its
/// channel.
fn verdict(
    r: &MessageRecord,
    app: &AppPolicies,
    listed: &dyn Fn(ListName) -> bool,
    now: DateTime<Utc>,
) -> Verdict {
    let policy = &app.policy;
    if let Some(at) = r.send_at
        && at > now + DUE_TOLERANCE
    {
        return Verdict::Wait {
            kind: ScheduleKind::Scheduled,
            until: at,
        };
    }
    let template = policy.template(r.template_id);
    if template.discarded {
        return Verdict::Stop(Stop::new(
            LedgerState::Discarded,
            State::Discarded,
            "template_discarded",
            format!("template {} is switched off", r.template_id),
        ));
    }
    if listed(ListName::Block) {
        return Verdict::Stop(Stop::new(
            LedgerState::Blocked,
            State::Blocked,
            "blocklisted",
            format!("the receiver is on the app's {} blocklist", r.channel),
        ));
    }
    if app.allowlisted.contains(&r.channel) && !listed(ListName::Allow) {
        return Verdict::Stop(Stop::new(
            LedgerState::Blocked,
            State::Blocked,
            "not_allowlisted",
            format!(
                "the app's {} allowlist does not hold the receiver",
                r.channel
            ),
        ));
    }
    if r.msg_type == MsgType::Marketing && listed(ListName::Unsubscribed) {
        return Verdict::Stop(Stop::new(
            LedgerState::Blocked,
            State::Blocked,
            "unsubscribed",
            format!("the receiver unsubscribed from {} marketing", r.channel),
        ));
    }
    let tz = receiver_timezone(r, policy);
    if let Some((window, mode)) = policy.quiet_mode(r.msg_type)
        && mode != QuietMode::Send
        && let Some(end) = window.ends_after(now, tz)
    {
        return match mode {
            QuietMode::Defer => Verdict::Wait {
                kind: ScheduleKind::Deferred,
                until: end,
            },
            _ => Verdict::Stop(Stop::new(
                LedgerState::Discarded,
                State::Discarded,
                "quiet_hours",
                format!("quiet hours in {tz} until {end}"),
            )),
        };
    }
    let mut masked = None;
    if template.sensitive_words != SensitiveAction::Off && !policy.dictionary.is_empty() {
        let found = policy.dictionary.matches(&r.content);
        if !found.is_empty() {
            if template.sensitive_words == SensitiveAction::Reject {
                return Verdict::Stop(Stop::new(
                    LedgerState::Filtered,
                    State::Filtered,
                    "sensitive_words",
                    format!("the content holds sensitive words: {}", found.join(", ")),
                ));
            }
            let mut content = r.content.clone();
            policy.dictionary.mask(&mut content);
            masked = Some((content, found));
        }
    }
    let limits = if template.exempt_from_dedup {
        Vec::new()
    } else {
        limits(r, policy, tz, now)
    };
    Verdict::Send { limits, masked }
}

/// `verdict`, unless it sends a message older than `max_age` (counted from its acceptance, or
/// from its `send_at` when that is later): then the message is `expired`.
pub fn expire(
    verdict: Verdict,
    r: &MessageRecord,
    max_age: Duration,
    now: DateTime<Utc>,
) -> Verdict {
    let born = r.send_at.map_or(r.accepted_at, |at| at.max(r.accepted_at));
    let age = (now - born).to_std().unwrap_or_default();
    match verdict {
        Verdict::Send { .. } if age > max_age => Verdict::Stop(Stop::new(
            LedgerState::Expired,
            State::Expired,
            "expired",
            format!(
                "{} s old, past the {} s a {} message may wait",
                age.as_secs(),
                max_age.as_secs(),
                r.msg_type.as_str()
            ),
        )),
        v => v,
    }
}

/// The receiver's time zone: the request's, else the app's.
fn receiver_timezone(r: &MessageRecord, policy: &Policy) -> Tz {
    r.timezone
        .as_deref()
        .and_then(|name| name.parse().ok())
        .unwrap_or(policy.timezone)
}

/// The content-dedup and frequency-cap limits a message must pass.
fn limits(r: &MessageRecord, policy: &Policy, tz: Tz, now: DateTime<Utc>) -> Vec<Limit> {
    let now_ms = now.timestamp_millis();
    let mut out = Vec::new();
    if let Some(secs) = policy.content_dedup_secs {
        let key = digest(&[
            "content",
            &r.app,
            &r.template_id.to_string(),
            &r.receiver,
            &r.content.to_string(),
        ]);
        out.push(Limit::Content {
            key,
            expires_at: now_ms + secs as i64 * 1000,
        });
    }
    for (_, cap) in policy.caps_for(r.channel, r.msg_type) {
        // The cap's scope leaves out `max`, so raising a cap keeps the counts.
        let scope = digest(&[
            "frequency",
            &r.app,
            &r.receiver,
            cap.channel.map_or("*", Channel::as_str),
            cap.msg_type.map_or("*", MsgType::as_str),
            &cap.period_secs.to_string(),
        ]);
        let start = window_start(now_ms, cap.period_secs, tz);
        out.push(Limit::Frequency {
            scope,
            window_start: start,
            max: cap.max,
            expires_at: start + cap.period_secs as i64 * 1000,
        });
    }
    out
}

/// A 64-bit key for `parts`: the first 8 bytes of their SHA-256, each part length-prefixed so
/// that no two lists collide. An integer key keeps the dedup tables' B-trees small (0.59 to
/// 0.71 of the policy-free throughput). The price: among ten million live keys, the chance that
/// any two collide — a false duplicate, or two receivers sharing a cap count — is about 3 in a
/// million.
fn digest(parts: &[&str]) -> i64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let hash = h.finalize();
    i64::from_le_bytes(hash[..8].try_into().expect("SHA-256 has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::policy::AppPolicy;
    use serde_json::json;

    fn record(msg_type: MsgType, content: serde_json::Value) -> MessageRecord {
        let mut r = crate::channels::testkit::record(Channel::Sms, "+8613812345678", content);
        r.msg_type = msg_type;
        r
    }

    fn app(doc: serde_json::Value, allowlisted: &[Channel]) -> AppPolicies {
        let doc: AppPolicy = serde_json::from_value(doc).unwrap();
        AppPolicies {
            policy: doc.compile().unwrap(),
            allowlisted: allowlisted.iter().copied().collect(),
            shared_version: 0,
        }
    }

    #[test]
    fn the_shared_dictionary_reloads_when_its_file_changes_and_keeps_good_words_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("words.txt");
        let write = |text: &str, secs: u64| {
            std::fs::write(&path, text).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        };
        write("# shared\n赌博\n\n  casino  \n", 1);
        let shared = SharedWords {
            path: Some(path.clone()),
            state: Mutex::default(),
        };
        let ttl = Duration::ZERO;
        let (words, v1) = shared.current(ttl);
        assert_eq!(*words, vec!["赌博".to_string(), "casino".to_string()]);
        // Unchanged file: same version, no rebuild.
        assert_eq!(shared.current(ttl).1, v1);
        write("lottery\n", 2);
        let (words, v2) = shared.current(ttl);
        assert_eq!(*words, vec!["lottery".to_string()]);
        assert!(v2 > v1);
        // A word with the mask character is refused: the last good words stay.
        write("bad*word\n", 3);
        let (words, v3) = shared.current(ttl);
        assert_eq!((words.as_slice(), v3), (&["lottery".to_string()][..], v2));
        // And they are merged into an app's dictionary.
        let doc: AppPolicy = serde_json::from_value(json!({"sensitive_words": ["spam"]})).unwrap();
        let policy = doc.compile_with(&words).unwrap();
        let found = policy
            .dictionary
            .matches(&json!({"text": "spam and lottery"}));
        assert_eq!(found.len(), 2, "{found:?}");
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn stop_code(v: &Verdict) -> &'static str {
        match v {
            Verdict::Stop(s) => s.code,
            other => panic!("not a stop: {other:?}"),
        }
    }

    #[test]
    fn a_future_send_at_waits_and_a_due_one_goes() {
        let a = app(json!({}), &[]);
        let now = at("2026-11-27T10:00:00Z");
        let mut r = record(MsgType::Notice, json!({"text": "hi"}));
        r.send_at = Some(at("2026-11-27T12:00:00Z"));
        assert_eq!(
            verdict(&r, &a, &|_| false, now),
            Verdict::Wait {
                kind: ScheduleKind::Scheduled,
                until: at("2026-11-27T12:00:00Z")
            }
        );
        r.send_at = Some(now + chrono::Duration::milliseconds(50));
        assert!(matches!(
            verdict(&r, &a, &|_| false, now),
            Verdict::Send { .. }
        ));
    }

    #[test]
    fn stops_come_in_pipeline_order() {
        let r = record(MsgType::Marketing, json!({"text": "hi"}));
        let t = r.template_id.to_string();
        let now = at("2026-11-27T10:00:00Z");
        let off = app(json!({"templates": {t.clone(): {"discarded": true}}}), &[]);
        assert_eq!(
            stop_code(&verdict(&r, &off, &|_| true, now)),
            "template_discarded"
        );
        let a = app(json!({}), &[Channel::Sms]);
        assert_eq!(
            stop_code(&verdict(&r, &a, &|l| l == ListName::Block, now)),
            "blocklisted"
        );
        assert_eq!(
            stop_code(&verdict(&r, &a, &|_| false, now)),
            "not_allowlisted"
        );
        assert_eq!(
            stop_code(&verdict(&r, &a, &|l| l != ListName::Block, now)),
            "unsubscribed"
        );
        let mut notice = r.clone();
        notice.msg_type = MsgType::Notice;
        assert!(matches!(
            verdict(&notice, &a, &|l| l != ListName::Block, now),
            Verdict::Send { .. }
        ));
    }

    #[test]
    fn quiet_hours_drop_defer_or_exempt_by_type_in_the_receivers_zone() {
        let a = app(
            json!({"timezone": "Asia/Shanghai", "quiet_hours": {"start": "22:00", "end": "08:00"}}),
            &[],
        );
        // 23:00 in Shanghai.
        let now = at("2026-11-27T15:00:00Z");
        let marketing = record(MsgType::Marketing, json!({"text": "sale"}));
        assert_eq!(
            stop_code(&verdict(&marketing, &a, &|_| false, now)),
            "quiet_hours"
        );
        let notice = record(MsgType::Notice, json!({"text": "bill"}));
        assert_eq!(
            verdict(&notice, &a, &|_| false, now),
            Verdict::Wait {
                kind: ScheduleKind::Deferred,
                until: at("2026-11-28T00:00:00Z")
            }
        );
        let code = record(MsgType::AuthCode, json!({"text": "123456"}));
        assert!(matches!(
            verdict(&code, &a, &|_| false, now),
            Verdict::Send { .. }
        ));
        // The same instant is 10:00 in London: no quiet hours there.
        let mut london = notice.clone();
        london.timezone = Some("Europe/London".into());
        assert!(matches!(
            verdict(&london, &a, &|_| false, now),
            Verdict::Send { .. }
        ));
    }

    #[test]
    fn sensitive_words_mask_or_reject_per_template() {
        let r = record(MsgType::Notice, json!({"text": "来赌博吧"}));
        let t = r.template_id.to_string();
        let now = at("2026-11-27T10:00:00Z");
        let mask = app(
            json!({"sensitive_words": ["赌博"], "templates": {t.clone(): {"sensitive_words": "mask"}}}),
            &[],
        );
        match verdict(&r, &mask, &|_| false, now) {
            Verdict::Send {
                masked: Some((content, words)),
                ..
            } => {
                assert_eq!(content, json!({"text": "来**吧"}));
                assert_eq!(words, vec!["赌博".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        let reject = app(
            json!({"sensitive_words": ["赌博"], "templates": {t: {"sensitive_words": "reject"}}}),
            &[],
        );
        assert_eq!(
            stop_code(&verdict(&r, &reject, &|_| false, now)),
            "sensitive_words"
        );
        let off = app(json!({"sensitive_words": ["赌博"]}), &[]);
        assert!(matches!(
            verdict(&r, &off, &|_| false, now),
            Verdict::Send { masked: None, .. }
        ));
    }

    #[test]
    fn limits_name_the_receiver_and_window() {
        let a = app(
            json!({"content_dedup_secs": 60, "frequency_caps": [
                {"msg_type": "marketing", "max": 2, "period_secs": 3600},
                {"channel": "email", "max": 9, "period_secs": 3600}
            ]}),
            &[],
        );
        let now = at("2026-11-27T10:30:00Z");
        let r = record(MsgType::Marketing, json!({"text": "sale"}));
        let Verdict::Send { limits, .. } = verdict(&r, &a, &|_| false, now) else {
            panic!()
        };
        assert_eq!(limits.len(), 2, "{limits:?}");
        assert!(matches!(
            &limits[1],
            Limit::Frequency { max: 2, window_start, .. }
                if *window_start == at("2026-11-27T10:00:00Z").timestamp_millis()
        ));
        let mut other = r.clone();
        other.receiver = "+8613900000000".into();
        let Verdict::Send { limits: theirs, .. } = verdict(&other, &a, &|_| false, now) else {
            panic!()
        };
        assert_ne!(limits, theirs);
    }
}
