//! Fetching files from URLs that users give (email attachments) without letting such a URL reach
//! into herald's own network (server-side request forgery).
//!
//! # What is fetched
//!
//! [`fetch`] takes only `http` and `https` URLs, and none with credentials (`user:pass@host`).
//! It resolves the host itself and refuses the URL if **any** of its addresses is not public,
//! unless [`UrlPolicy::allow_private`] is set (config `dispatch.allow_private_urls`):
//!
//! - IPv4: unspecified `0.0.0.0/8`, private `10/8`, `172.16/12`, `192.168/16`, CGNAT
//!   `100.64/10`, loopback `127/8`, link-local `169.254/16`, IETF protocol assignments
//!   `192.0.0/24`, documentation `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, benchmarking
//!   `198.18/15`, multicast `224/4`, broadcast `255.255.255.255` and reserved `240/4`;
//! - IPv6: unspecified `::`, loopback `::1`, discard-only `100::/64`, local-use NAT64
//!   `64:ff9b:1::/48`, benchmarking `2001:2::/48`, documentation `2001:db8::/32` and
//!   `3fff::/20`, unique-local `fc00::/7`, link-local `fe80::/10`, site-local `fec0::/10`,
//!   multicast `ff00::/8`;
//! - IPv6 addresses that carry an IPv4 address — mapped `::ffff:0:0/96`, compatible `::/96`,
//!   NAT64 `64:ff9b::/96`, 6to4 `2002::/16` — are judged by that IPv4 address.
//!
//! It then connects to exactly the addresses it checked: each fetch builds a one-off client whose
//! resolver answers them for the URL's host and never asks DNS, and which uses no proxy, so a
//! DNS answer that changes between the check and the connection ("DNS rebinding") cannot reach a
//! private address. For the same reason redirects are not followed: their target would skip the
//! check. TLS is rustls with the web PKI roots (certificates are verified).
//!
//! The body is streamed and the fetch stops as soon as it passes [`UrlPolicy::max_bytes`]; a
//! larger `Content-Length` is refused before any of the body is read. The whole fetch (name
//! lookup, connection, body) is limited to [`FETCH_TIMEOUT`].
//!
//! # Errors
//!
//! | code                     | kind      | when                                               |
//! |--------------------------|-----------|----------------------------------------------------|
//! | `attachment_url_refused` | permanent | not a URL, not `http(s)`, credentials in it, or an address that is not public |
//! | `attachment_redirect`    | permanent | a `3xx` answer                                     |
//! | `attachment_not_found`   | permanent | `404`, `410`                                       |
//! | `attachment_refused`     | permanent | any other `4xx` (but `408`, `429`)                 |
//! | `attachment_too_large`   | permanent | `Content-Length` or body past `max_bytes`          |
//! | `attachment_unavailable` | retryable | name lookup, connection or TLS failure, timeout, `408`, `429`, `5xx` (honouring `Retry-After`) |
//!
//! Details name the host (and port), never the whole URL, whose path or query may carry tokens.

use super::SendError;
use super::http::{body_excerpt, retry_after};
use bytes::Bytes;
use herald_core::config::DispatchConfig;
use percent_encoding::percent_decode_str;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::CONTENT_TYPE;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use url::{Host, Url};

/// Limit on one whole fetch: name lookup, connection, TLS, answer and body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Limit on opening the connection (TCP and TLS) to one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What may be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Largest body fetched, in bytes.
    pub max_bytes: usize,
    /// Whether the host may resolve to addresses that are not public (loopback, private,
    /// link-local, ...). Off in production: such URLs reach into herald's own network.
    pub allow_private: bool,
}

impl UrlPolicy {
    /// The policy set by `dispatch.attachment_max_bytes` and `dispatch.allow_private_urls`.
    pub fn from_config(config: &DispatchConfig) -> Self {
        UrlPolicy {
            max_bytes: config.attachment_max_bytes,
            allow_private: config.allow_private_urls,
        }
    }
}

impl Default for UrlPolicy {
    /// The configuration's defaults: 10 MiB, public addresses only.
    fn default() -> Self {
        Self::from_config(&DispatchConfig::default())
    }
}

/// A fetched file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub bytes: Bytes,
    /// The answer's `Content-Type`, as sent (parameters included), if it sent one.
    pub content_type: Option<String>,
    /// The URL's last path segment, percent-decoded, with `/`, `\` and control characters
    /// replaced by `_`; `None` if that leaves nothing (or only `.` or `..`).
    pub filename_from_url: Option<String>,
}

/// Fetches `url` under `policy` (see the [module docs](self)).
pub async fn fetch(policy: &UrlPolicy, url: &str) -> Result<Fetched, SendError> {
    fetch_within(policy, url, FETCH_TIMEOUT).await
}

async fn fetch_within(
    policy: &UrlPolicy,
    url: &str,
    timeout: Duration,
) -> Result<Fetched, SendError> {
    let url = check_url(url).map_err(url_refused)?;
    let attempt = async {
        let addrs = resolve(&url).await?;
        if !policy.allow_private {
            check_addresses(&url, &addrs)?;
        }
        get(policy, &url, &addrs).await
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(unavailable(
                format!(
                    "{}: no complete answer within {} ms",
                    origin(&url),
                    timeout.as_millis()
                ),
                None,
            ))
        })
}

/// Parses `url` and checks what can be checked without resolving it: an `http` or `https` URL
/// with a host and without credentials. The error says why, and never quotes the URL.
pub fn check_url(url: &str) -> Result<Url, String> {
    // `url`'s parse errors name the problem ("invalid port number"), never the input.
    let parsed = Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme `{}` is not fetched (http or https only)",
            parsed.scheme()
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("the URL carries credentials (user:password@), which are never sent".into());
    }
    if parsed.host().is_none() {
        return Err("the URL has no host".into());
    }
    Ok(parsed)
}

/// The URL's host and port as the details quote them (never its path or query).
fn origin(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// The addresses to connect to: the IP of an IP URL, else every address the name resolves to.
async fn resolve(url: &Url) -> Result<Vec<SocketAddr>, SendError> {
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = match url.host() {
        Some(Host::Ipv4(ip)) => vec![SocketAddr::new(ip.into(), port)],
        Some(Host::Ipv6(ip)) => vec![SocketAddr::new(ip.into(), port)],
        Some(Host::Domain(name)) => tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| unavailable(format!("cannot resolve {name}: {e}"), None))?
            .collect(),
        None => return Err(url_refused("the URL has no host")),
    };
    if addrs.is_empty() {
        return Err(unavailable(
            format!("{} resolves to no address", origin(url)),
            None,
        ));
    }
    Ok(addrs)
}

/// Refuses the URL if any of `addrs` is not public.
fn check_addresses(url: &Url, addrs: &[SocketAddr]) -> Result<(), SendError> {
    for addr in addrs {
        if let Some(why) = non_public(addr.ip()) {
            let target = match url.host() {
                Some(Host::Domain(name)) => format!("{name} resolves to {}, which is", addr.ip()),
                _ => format!("{} is", addr.ip()),
            };
            return Err(url_refused(format!(
                "{target} {why}: not a public address, and `allow_private_urls` is off"
            )));
        }
    }
    Ok(())
}

/// `GET`s `url`, connecting only to `addrs` (which the caller checked), and reads the body.
async fn get(policy: &UrlPolicy, url: &Url, addrs: &[SocketAddr]) -> Result<Fetched, SendError> {
    let origin = origin(url);
    let builder = reqwest::Client::builder()
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_max_idle_per_host(0);
    let builder = match url.host() {
        // An IP URL is connected to as it is; a name only ever to the checked addresses.
        Some(Host::Domain(name)) => builder.dns_resolver(Arc::new(Pinned {
            name: name.to_string(),
            addrs: addrs.to_vec(),
        })),
        _ => builder,
    };
    let client = builder
        .build()
        .map_err(|e| unavailable(format!("HTTP client: {e}"), None))?;
    // reqwest's own text is terse ("error sending request"): add its causes (no URL in them).
    let fetch_error = |e: reqwest::Error| {
        let e = e.without_url();
        let mut detail = format!("{origin}: {e}");
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            detail.push_str(&format!(": {c}"));
            cause = c.source();
        }
        unavailable(detail, None)
    };

    let mut response = client.get(url.clone()).send().await.map_err(fetch_error)?;
    let status = response.status();
    if !status.is_success() {
        let retry_after = retry_after(response.headers());
        let what = format!("{origin} answered HTTP {status}");
        return Err(match status.as_u16() {
            300..=399 => SendError::Permanent {
                code: "attachment_redirect".into(),
                detail: format!(
                    "{what}, a redirect: redirects are not followed (their target would skip \
                     the address check), give the final URL"
                ),
            },
            408 | 429 | 500..=599 => unavailable(
                format!("{what}{}", body_excerpt(response).await),
                retry_after,
            ),
            404 | 410 => SendError::Permanent {
                code: "attachment_not_found".into(),
                detail: format!("{what}{}", body_excerpt(response).await),
            },
            _ => SendError::Permanent {
                code: "attachment_refused".into(),
                detail: format!("{what}{}", body_excerpt(response).await),
            },
        });
    }

    let too_large = |detail: String| SendError::Permanent {
        code: "attachment_too_large".into(),
        detail: format!(
            "{origin}: {detail}; attachments are limited to {} bytes",
            policy.max_bytes
        ),
    };
    if let Some(length) = response.content_length()
        && length > policy.max_bytes as u64
    {
        return Err(too_large(format!("Content-Length is {length} bytes")));
    }
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from);
    let mut body = Vec::with_capacity(
        response
            .content_length()
            .map_or(0, |n| n as usize)
            .min(policy.max_bytes),
    );
    while let Some(chunk) = response.chunk().await.map_err(fetch_error)? {
        if chunk.len() > policy.max_bytes - body.len() {
            return Err(too_large(format!(
                "the body is longer than {} bytes",
                policy.max_bytes
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        bytes: body.into(),
        content_type,
        filename_from_url: filename_from_url(url),
    })
}

/// The resolver of a fetch's client: the checked addresses for the URL's host and nothing else,
/// so the client never asks DNS (whose answer may have changed since the check) at all.
struct Pinned {
    name: String,
    addrs: Vec<SocketAddr>,
}

impl Resolve for Pinned {
    fn resolve(&self, name: Name) -> Resolving {
        let answer: Result<Addrs, _> = if name.as_str().eq_ignore_ascii_case(&self.name) {
            Ok(Box::new(self.addrs.clone().into_iter()))
        } else {
            Err(format!(
                "{} is not the host whose addresses were checked",
                name.as_str()
            )
            .into())
        };
        Box::pin(std::future::ready(answer))
    }
}

/// The resolver of the shared vendor client when `allow_private_urls` is off: it answers a name
/// only if every address it resolves to is public, and herald connects to exactly the addresses
/// it answered, so a DNS answer cannot change between the check and the connection. (IP
/// literals never reach a resolver: [`check_account_urls`] refuses private ones when an account
/// is made.)
#[derive(Debug, Clone, Copy)]
pub struct PublicOnly;

/// A name that resolved to an address that is not public.
#[derive(Debug, thiserror::Error)]
#[error("{0}: not a public address, and `dispatch.allow_private_urls` is off")]
pub struct NotPublic(pub String);

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some((addr, why)) = addrs
                .iter()
                .find_map(|a| non_public(a.ip()).map(|why| (a, why)))
            {
                let e = NotPublic(format!("{host} resolves to {}, which is {why}", addr.ip()));
                return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Refuses an account config whose `url` or `base_url` (HTTP vendors, webhooks) or `host`
/// (SMTP) names a host by an IP address that is not public (names are checked by
/// [`PublicOnly`] at every HTTP connection, and by the email sender when it opens a pool).
pub fn check_account_urls(config: &serde_json::Value) -> Result<(), String> {
    for field in ["url", "base_url", "host"] {
        let Some(raw) = config.get(field).and_then(|v| v.as_str()) else {
            continue;
        };
        let ip: Option<IpAddr> = match (field, Url::parse(raw)) {
            // An SMTP account's bare host name or address.
            ("host", _) => raw.trim_matches(['[', ']']).parse().ok(),
            (_, Ok(url)) => match url.host() {
                Some(Host::Ipv4(ip)) => Some(ip.into()),
                Some(Host::Ipv6(ip)) => Some(ip.into()),
                _ => None,
            },
            (_, Err(_)) => continue,
        };
        if let Some(why) = ip.and_then(non_public) {
            return Err(format!(
                "`{field}`: {} is {why}: not a public address, and \
                 `dispatch.allow_private_urls` is off",
                ip.map(|i| i.to_string()).unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// See [`Fetched::filename_from_url`].
fn filename_from_url(url: &Url) -> Option<String> {
    let last = url.path_segments()?.next_back()?;
    let name: String = percent_decode_str(last)
        .decode_utf8_lossy()
        .chars()
        .map(|c| {
            if c.is_control() || c == '/' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let name = name.trim();
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

/// IPv4 ranges that are not public, with what they are; the first match names an address.
const V4_RANGES: &[(Ipv4Addr, u32, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "unspecified (0.0.0.0/8)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private (10.0.0.0/8)"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "CGNAT shared (100.64.0.0/10)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (127.0.0.0/8)"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local (169.254.0.0/16)",
    ),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private (172.16.0.0/12)"),
    (
        Ipv4Addr::new(192, 0, 0, 0),
        24,
        "IETF protocol assignments (192.0.0.0/24)",
    ),
    (
        Ipv4Addr::new(192, 0, 2, 0),
        24,
        "documentation (192.0.2.0/24)",
    ),
    (
        Ipv4Addr::new(192, 168, 0, 0),
        16,
        "private (192.168.0.0/16)",
    ),
    (
        Ipv4Addr::new(198, 18, 0, 0),
        15,
        "benchmarking (198.18.0.0/15)",
    ),
    (
        Ipv4Addr::new(198, 51, 100, 0),
        24,
        "documentation (198.51.100.0/24)",
    ),
    (
        Ipv4Addr::new(203, 0, 113, 0),
        24,
        "documentation (203.0.113.0/24)",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (224.0.0.0/4)"),
    (
        Ipv4Addr::new(255, 255, 255, 255),
        32,
        "broadcast (255.255.255.255)",
    ),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved (240.0.0.0/4)"),
];

/// IPv6 ranges that are not public (those embedding IPv4 addresses aside).
const V6_RANGES: &[(Ipv6Addr, u32, &str)] = &[
    (Ipv6Addr::UNSPECIFIED, 128, "unspecified (::)"),
    (Ipv6Addr::LOCALHOST, 128, "loopback (::1)"),
    (
        Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0),
        64,
        "discard-only (100::/64)",
    ),
    (
        Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0),
        48,
        "local-use NAT64 (64:ff9b:1::/48)",
    ),
    (
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0),
        48,
        "benchmarking (2001:2::/48)",
    ),
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        "documentation (2001:db8::/32)",
    ),
    (
        Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        "documentation (3fff::/20)",
    ),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        "unique-local (fc00::/7)",
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "link-local (fe80::/10)",
    ),
    (
        Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        "site-local (fec0::/10)",
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "multicast (ff00::/8)",
    ),
];

/// What kind of address `ip` is if it is not public (see the [module docs](self)); `None` for
/// a public address.
pub fn non_public(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4).map(String::from),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let bits = ip.to_bits();
    V4_RANGES
        .iter()
        .find(|(net, len, _)| bits & (u32::MAX << (32 - len)) == net.to_bits())
        .map(|(_, _, what)| *what)
}

fn non_public_v6(ip: Ipv6Addr) -> Option<String> {
    let bits = ip.to_bits();
    let in_net = |net: Ipv6Addr, len: u32| bits & (u128::MAX << (128 - len)) == net.to_bits();
    if let Some((_, _, what)) = V6_RANGES.iter().find(|(net, len, _)| in_net(*net, *len)) {
        return Some((*what).to_string());
    }
    // `as u32` keeps the low 32 bits: the embedded IPv4 address.
    let embedded = if in_net(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
        Some(("IPv4-mapped", bits as u32))
    } else if in_net(Ipv6Addr::UNSPECIFIED, 96) {
        Some(("IPv4-compatible", bits as u32))
    } else if in_net(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        Some(("NAT64", bits as u32))
    } else if in_net(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16) {
        Some(("6to4", (bits >> 80) as u32))
    } else {
        None
    };
    let (kind, v4) = embedded?;
    let v4 = Ipv4Addr::from_bits(v4);
    non_public_v4(v4).map(|what| format!("{kind} {v4}, {what}"))
}

fn url_refused(detail: impl Into<String>) -> SendError {
    SendError::Permanent {
        code: "attachment_url_refused".into(),
        detail: detail.into(),
    }
}

fn unavailable(detail: String, retry_after: Option<Duration>) -> SendError {
    SendError::Retryable {
        code: "attachment_unavailable".into(),
        detail,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get as route_get;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PRIVATE_OK: UrlPolicy = UrlPolicy {
        max_bytes: 1000,
        allow_private: true,
    };
    const PUBLIC_ONLY: UrlPolicy = UrlPolicy {
        max_bytes: 1000,
        allow_private: false,
    };

    /// Serves `router` on 127.0.0.1; returns its port.
    async fn serve(router: Router) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await });
        port
    }

    /// A server answering every path with a few bytes, counting the requests it gets.
    async fn counting_server() -> (u16, Arc<Mutex<Vec<HeaderMap>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let router = Router::new().fallback(move |headers: HeaderMap| async move {
            seen2.lock().unwrap().push(headers);
            ([(header::CONTENT_TYPE, "text/plain")], "hello")
        });
        (serve(router).await, seen)
    }

    fn assert_refused(err: &SendError, needle: &str) {
        assert_eq!(err.code(), "attachment_url_refused", "{err:?}");
        assert!(!err.is_retryable(), "{err:?}");
        assert!(err.detail().contains(needle), "{needle:?} not in {err:?}");
    }

    #[tokio::test]
    async fn refuses_private_addresses_and_names_resolving_to_them() {
        let (port, seen) = counting_server().await;
        let cases = [
            (format!("http://127.0.0.1:{port}/a.txt"), "loopback"),
            (format!("http://localhost:{port}/a.txt"), "loopback"),
            // `url` reads the old numeric forms of IPv4 addresses, and so must the check.
            (format!("http://0x7f000001:{port}/a.txt"), "loopback"),
            (format!("http://2130706433:{port}/a.txt"), "loopback"),
            (format!("http://[::1]:{port}/a.txt"), "loopback"),
            (
                format!("http://[::ffff:127.0.0.1]:{port}/a.txt"),
                "IPv4-mapped 127.0.0.1, loopback",
            ),
            (
                "http://10.1.2.3/x?sig=s3cr3t".into(),
                "10.1.2.3 is private (10.0.0.0/8)",
            ),
            (
                "http://169.254.169.254/latest/meta-data/".into(),
                "link-local",
            ),
            ("https://[fd00::1]/x".into(), "unique-local"),
            ("https://[fe80::1]/x".into(), "link-local"),
            ("https://0.0.0.0/x".into(), "unspecified"),
            ("https://[::]/x".into(), "unspecified"),
            ("http://100.100.100.200/x".into(), "CGNAT"),
            ("http://192.168.1.1/x".into(), "private"),
            ("http://172.31.0.1/x".into(), "private"),
            ("http://224.0.0.1/x".into(), "multicast"),
            ("http://255.255.255.255/x".into(), "broadcast"),
            ("http://192.0.2.10/x".into(), "documentation"),
            ("http://[2001:db8::1]/x".into(), "documentation"),
        ];
        for (url, why) in &cases {
            let err = fetch(&PUBLIC_ONLY, url).await.unwrap_err();
            assert_refused(&err, why);
            assert!(!err.detail().contains("s3cr3t"), "{err:?}");
        }
        let err = fetch(&PUBLIC_ONLY, &format!("http://localhost:{port}/"))
            .await
            .unwrap_err();
        assert!(
            err.detail().contains("localhost resolves to 127.0.0.1"),
            "{err:?}"
        );
        assert!(seen.lock().unwrap().is_empty(), "a refused URL was fetched");

        // The same server, allowed.
        for url in [
            format!("http://127.0.0.1:{port}/a.txt"),
            format!("http://localhost:{port}/a.txt"),
        ] {
            let got = fetch(&PRIVATE_OK, &url).await.unwrap();
            assert_eq!(got.bytes, "hello");
        }
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn refuses_urls_that_are_not_plain_http_without_quoting_them() {
        let cases = [
            ("ftp://files.example.com/a.pdf", "scheme `ftp`"),
            ("file:///etc/passwd", "scheme `file`"),
            ("data:text/plain,hi", "scheme `data`"),
            ("/relative/a.pdf", "not a valid URL"),
            ("https://files.example.com:99999/a", "not a valid URL"),
            (
                "https://user:hunter2@files.example.com/a.pdf",
                "credentials",
            ),
            ("https://hunter2@files.example.com/a.pdf", "credentials"),
        ];
        for (url, why) in cases {
            let err = fetch(&PRIVATE_OK, url).await.unwrap_err();
            assert_refused(&err, why);
            assert!(!err.detail().contains("hunter2"), "{err:?}");
        }
    }

    #[test]
    fn classifies_addresses() {
        let private = [
            "0.1.2.3",
            "10.255.255.255",
            "100.64.0.0",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.0",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.0.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::1",
            "100::1",
            "2001:2::1",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "3fff::1",
            "fc00::1",
            "fdff:ffff::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
        ];
        for ip in private {
            assert!(non_public(ip.parse().unwrap()).is_some(), "{ip} passed");
        }
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.1",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "2001:db9::1",
            "4000::1",
        ];
        for ip in public {
            assert_eq!(non_public(ip.parse().unwrap()), None, "{ip} refused");
        }
        assert_eq!(
            non_public("::ffff:127.0.0.1".parse().unwrap()).as_deref(),
            Some("IPv4-mapped 127.0.0.1, loopback (127.0.0.0/8)")
        );
        assert_eq!(
            non_public("2002:a00:1::".parse().unwrap()).as_deref(),
            Some("6to4 10.0.0.1, private (10.0.0.0/8)")
        );
    }

    #[tokio::test]
    async fn fetches_the_body_its_type_and_a_file_name() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let body = bytes.clone();
        let router = Router::new().route(
            "/files/{name}",
            route_get(move |uri: axum::http::Uri, headers: HeaderMap| async move {
                seen2.lock().unwrap().push((uri.to_string(), headers));
                ([(header::CONTENT_TYPE, "application/pdf")], body)
            }),
        );
        let port = serve(router).await;
        let got = fetch(
            &PRIVATE_OK,
            &format!("http://127.0.0.1:{port}/files/Q3%20report%2Fv2.pdf?sig=abc#page=2"),
        )
        .await
        .unwrap();
        assert_eq!(got.bytes.as_ref(), bytes.as_slice());
        assert_eq!(got.content_type.as_deref(), Some("application/pdf"));
        assert_eq!(got.filename_from_url.as_deref(), Some("Q3 report_v2.pdf"));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        // The query goes to the server, the fragment does not.
        assert_eq!(seen[0].0, "/files/Q3%20report%2Fv2.pdf?sig=abc");
        assert_eq!(seen[0].1[header::HOST], format!("127.0.0.1:{port}"));
        assert!(
            seen[0].1[header::USER_AGENT]
                .to_str()
                .unwrap()
                .starts_with("herald/")
        );
    }

    #[test]
    fn file_names_come_from_the_last_path_segment() {
        let name = |u: &str| filename_from_url(&Url::parse(u).unwrap());
        assert_eq!(
            name("https://x.test/a/b/report.pdf").as_deref(),
            Some("report.pdf")
        );
        assert_eq!(
            name("https://x.test/%E6%8A%A5%E5%91%8A.pdf").as_deref(),
            Some("报告.pdf")
        );
        assert_eq!(
            name("https://x.test/a%0D%0Ab%5C.txt").as_deref(),
            Some("a__b_.txt")
        );
        assert_eq!(name("https://x.test/"), None);
        assert_eq!(name("https://x.test/dir/"), None);
        assert_eq!(name("https://x.test/%2E%2E"), None);
        assert_eq!(name("https://x.test/%20%20"), None);
    }

    #[tokio::test]
    async fn connects_only_to_the_checked_address() {
        let (port, seen) = counting_server().await;
        // `.test` names never resolve: a fresh DNS lookup at connect time would fail. The fetch
        // reaches the server because its client is pinned to the address that was checked.
        let url = Url::parse(&format!("http://files.herald.test:{port}/a.txt")).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let got = get(&PRIVATE_OK, &url, &[addr]).await.unwrap();
        assert_eq!(got.bytes, "hello");
        assert_eq!(
            seen.lock().unwrap()[0][header::HOST],
            format!("files.herald.test:{port}")
        );
        // Without the pin, the name does not resolve (so the test above shows the pin works).
        let err = fetch(&PRIVATE_OK, url.as_str()).await.unwrap_err();
        assert_eq!(err.code(), "attachment_unavailable", "{err:?}");
        assert!(
            err.detail().starts_with("cannot resolve files.herald.test"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn the_pinned_resolver_answers_only_the_checked_host() {
        let addr = SocketAddr::from(([203, 0, 113, 7], 443));
        let pinned = Pinned {
            name: "files.example.com".into(),
            addrs: vec![addr],
        };
        let got: Vec<SocketAddr> = pinned
            .resolve("FILES.example.com".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(got, [addr]);
        assert!(
            pinned
                .resolve("other.example.com".parse().unwrap())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn bodies_past_the_limit_are_refused_with_and_without_content_length() {
        fn chunked(total: usize) -> Body {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..total)
                .collect::<Vec<_>>()
                .chunks(300)
                .map(|c| Ok(vec![b'x'; c.len()]))
                .collect();
            Body::from_stream(futures::stream::iter(chunks))
        }
        let router = Router::new()
            .route("/exact", route_get(|| async { vec![b'x'; 1000] }))
            .route("/over", route_get(|| async { vec![b'x'; 1001] }))
            .route("/chunked-exact", route_get(|| async { chunked(1000) }))
            .route("/chunked-over", route_get(|| async { chunked(1001) }));
        let port = serve(router).await;
        let url = |path: &str| format!("http://127.0.0.1:{port}{path}");

        for path in ["/exact", "/chunked-exact"] {
            let got = fetch(&PRIVATE_OK, &url(path)).await.unwrap();
            assert_eq!(got.bytes.len(), 1000, "{path}");
        }
        let err = fetch(&PRIVATE_OK, &url("/over")).await.unwrap_err();
        assert_eq!(err.code(), "attachment_too_large", "{err:?}");
        assert!(!err.is_retryable());
        assert!(
            err.detail().contains("Content-Length is 1001 bytes"),
            "{err:?}"
        );
        let err = fetch(&PRIVATE_OK, &url("/chunked-over")).await.unwrap_err();
        assert_eq!(err.code(), "attachment_too_large", "{err:?}");
        assert!(err.detail().contains("longer than 1000 bytes"), "{err:?}");
    }

    /// A raw HTTP server that answers each connection with `head` and `body`, then holds the
    /// connection open without sending more.
    async fn raw_server(head: &'static str, body: Vec<u8>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
                held.push(socket);
            }
        });
        port
    }

    #[tokio::test]
    async fn a_large_content_length_is_refused_before_reading_the_body() {
        // The server announces 50 MB and sends 3 bytes: reading the body would wait forever.
        let port = raw_server(
            "HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n",
            b"abc".to_vec(),
        )
        .await;
        let started = std::time::Instant::now();
        let err = fetch_within(
            &PRIVATE_OK,
            &format!("http://127.0.0.1:{port}/big"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), "attachment_too_large", "{err:?}");
        assert!(
            err.detail().contains("Content-Length is 50000000"),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn redirects_are_refused_not_followed() {
        let (target, seen) = counting_server().await;
        let location = format!("http://127.0.0.1:{target}/a.txt");
        let router = Router::new()
            .fallback(move || async move { (StatusCode::FOUND, [(header::LOCATION, location)]) });
        let port = serve(router).await;
        let err = fetch(&PRIVATE_OK, &format!("http://127.0.0.1:{port}/r"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "attachment_redirect", "{err:?}");
        assert!(!err.is_retryable());
        assert!(err.detail().contains("302"), "{err:?}");
        assert!(seen.lock().unwrap().is_empty(), "the redirect was followed");
    }

    #[tokio::test]
    async fn statuses_and_failures_map_to_codes() {
        let router = Router::new().fallback(|uri: axum::http::Uri| async move {
            let status: u16 = uri.path()[1..].parse().unwrap();
            let mut response = (StatusCode::from_u16(status).unwrap(), "why").into_response();
            if status == 503 {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, "7".parse().unwrap());
            }
            response
        });
        let port = serve(router).await;
        let cases = [
            (404, "attachment_not_found", false),
            (410, "attachment_not_found", false),
            (403, "attachment_refused", false),
            (401, "attachment_refused", false),
            (408, "attachment_unavailable", true),
            (429, "attachment_unavailable", true),
            (500, "attachment_unavailable", true),
            (503, "attachment_unavailable", true),
        ];
        for (status, code, retryable) in cases {
            let err = fetch(&PRIVATE_OK, &format!("http://127.0.0.1:{port}/{status}"))
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{status}: {err:?}");
            assert_eq!(err.is_retryable(), retryable, "{status}: {err:?}");
            assert!(
                err.detail()
                    .starts_with(&format!("127.0.0.1:{port} answered HTTP {status}")),
                "{err:?}"
            );
            assert!(err.detail().ends_with(": why"), "{err:?}");
            if let SendError::Retryable { retry_after, .. } = &err {
                let expected = (status == 503).then(|| Duration::from_secs(7));
                assert_eq!(*retry_after, expected, "{status}");
            }
        }

        // Nothing listens on a port just freed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fetch(&PRIVATE_OK, &format!("http://127.0.0.1:{closed}/a"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "attachment_unavailable", "{err:?}");
        assert!(err.is_retryable());
        assert!(err.detail().contains("onnect"), "{err:?}");

        // A server that never answers.
        let silent = raw_server("", Vec::new()).await;
        let err = fetch_within(
            &PRIVATE_OK,
            &format!("http://127.0.0.1:{silent}/a"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), "attachment_unavailable", "{err:?}");
        assert!(err.is_retryable());
        assert!(err.detail().contains("within 300 ms"), "{err:?}");
    }
}
