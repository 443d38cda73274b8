//! Who is a client, for rate limits and stream caps.
//!
//! With API keys enabled the client is the key (`Authorization: Bearer <key>`), compared as a
//! SHA-256 digest in constant time and logged only as a short fingerprint. Without keys the client
//! is the peer IP; `X-Forwarded-For` / `Forwarded` are honoured only when the direct peer is a
//! trusted proxy (so a caller cannot pick its own identity), walking the chain from the right to
//! the first untrusted hop. IPv6 clients are keyed by their /64 (configurable), so one host cannot
//! escape its quota by rotating addresses.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::str::FromStr;

use actix_web::http::header::{self, HeaderMap};
use sha2::{Digest, Sha256};

/// The identity a quota is kept for. Small and cheap to hash: many of these live in the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The first 16 bytes of the key's SHA-256.
    ApiKey([u8; 16]),
    V4(u32),
    /// The address masked to the configured prefix.
    V6(u128),
}

impl ClientKey {
    /// What the log shows: a key fingerprint, or the (masked) address. Never the key itself.
    pub fn label(&self) -> String {
        match self {
            Self::ApiKey(d) => format!("key:{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3]),
            Self::V4(a) => Ipv4Addr::from(*a).to_string(),
            Self::V6(a) => Ipv6Addr::from(*a).to_string(),
        }
    }

    /// The whole identity as a short string that is the same on every replica: the key for the
    /// client's shared quota and the owner of its streams in the shared state backend. Holds a
    /// key's digest, never the key.
    pub fn stable_id(&self) -> String {
        match self {
            Self::ApiKey(d) => {
                let mut s = String::with_capacity(2 + 32);
                s.push_str("k:");
                for b in d {
                    let _ = write!(s, "{b:02x}");
                }
                s
            }
            Self::V4(a) => format!("4:{a:08x}"),
            Self::V6(a) => format!("6:{a:032x}"),
        }
    }
}

/// The configured API keys, as SHA-256 digests.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// Keys from the `API_KEYS` list and/or `API_KEYS_FILE` (one per line, `#` comments). `None`
    /// when neither gives a key (authentication off).
    pub fn load(list: &[String], file: Option<&Path>) -> Result<Option<Self>, String> {
        let mut keys: Vec<String> =
            list.iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        if let Some(short) = keys.iter().find(|k| k.len() < 16) {
            return Err(format!("API keys must be at least 16 characters (one has {})", short.len()));
        }
        Ok((!keys.is_empty())
            .then(|| Self { digests: keys.iter().map(|k| Sha256::digest(k.as_bytes()).into()).collect() }))
    }

    /// The client key for a presented bearer token, if it is one of ours. Every stored digest is
    /// compared, without early exit, in constant time.
    pub fn verify(&self, presented: &str) -> Option<ClientKey> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found: Option<[u8; 32]> = None;
        for stored in &self.digests {
            let diff = stored.iter().zip(digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(*stored);
            }
        }
        found.map(|d| {
            let mut short = [0u8; 16];
            short.copy_from_slice(&d[..16]);
            ClientKey::ApiKey(short)
        })
    }
}

/// The bearer token of a request, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// An address range like `10.0.0.0/8` or `fd00::/8` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let network: IpAddr = addr.parse().map_err(|_| format!("'{s}' is not an address or CIDR range"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{s}': bad prefix length"))?,
            None => max,
        };
        Ok(Self { network, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                mask_v4(u32::from(n), self.prefix) == mask_v4(u32::from(a), self.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                mask_v6(u128::from(n), self.prefix) == mask_v6(u128::from(a), self.prefix)
            }
            _ => false,
        }
    }
}

fn mask_v4(a: u32, prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { a & (u32::MAX << (32 - u32::from(prefix))) }
}

fn mask_v6(a: u128, prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { a & (u128::MAX << (128 - u32::from(prefix))) }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are IPv4 clients.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Turns a connection (peer address + headers) into a client address and key.
#[derive(Debug, Clone)]
pub struct ClientResolver {
    trusted_proxies: Vec<Cidr>,
    ipv6_prefix: u8,
}

impl ClientResolver {
    pub fn new(trusted_proxies: Vec<Cidr>, ipv6_prefix: u8) -> Self {
        Self { trusted_proxies, ipv6_prefix: ipv6_prefix.min(128) }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// The client's address: the peer, or — only when the peer is a trusted proxy — the first
    /// untrusted hop from the right of `X-Forwarded-For` (else `Forwarded: for=`).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        let chain = forwarded_chain(headers);
        let mut client = peer;
        for hop in chain.iter().rev() {
            match hop {
                Some(ip) => {
                    client = canonical(*ip);
                    if !self.is_trusted(client) {
                        return client;
                    }
                }
                // Garbage in the chain: stop at the last address a trusted proxy vouched for.
                None => return client,
            }
        }
        client
    }

    pub fn key_for(&self, ip: IpAddr) -> ClientKey {
        match canonical(ip) {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6(mask_v6(u128::from(v6), self.ipv6_prefix)),
        }
    }
}

/// Addresses listed by `X-Forwarded-For` (all headers, in order), else by `Forwarded: for=`.
/// `None` marks an entry that is not an address.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let xff: Vec<Option<IpAddr>> = headers
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| parse_hop(s.trim()))
        .collect();
    if !xff.is_empty() {
        return xff;
    }
    headers
        .get_all(header::FORWARDED)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then(|| parse_hop(v.trim().trim_matches('"')))
            })
        })
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:443`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']').and_then(|(a, _)| a.parse().ok());
    }
    s.rsplit_once(':').and_then(|(a, port)| {
        port.parse::<u16>().ok().and_then(|_| a.parse::<Ipv4Addr>().ok()).map(IpAddr::V4)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    fn resolver() -> ClientResolver {
        ClientResolver::new(vec!["10.0.0.0/8".parse().unwrap_or_else(|e| unreachable!("{e}"))], 64)
    }

    #[test]
    fn untrusted_peers_cannot_pick_their_identity() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(resolver().client_ip(ip("203.0.113.9"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn trusted_proxies_forward_the_first_untrusted_hop_from_the_right() {
        let r = resolver();
        // The client claims 6.6.6.6, the edge proxy appended the real 198.51.100.7, then an inner proxy.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.2.3")]);
        assert_eq!(r.client_ip(ip("10.0.0.5"), &h), ip("198.51.100.7"));
        let fwd = headers(&[("forwarded", r#"for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.9"#)]);
        assert_eq!(r.client_ip(ip("10.0.0.5"), &fwd), ip("2001:db8:cafe::17"));
        assert_eq!(r.client_ip(ip("10.0.0.5"), &headers(&[])), ip("10.0.0.5"));
        let garbage = headers(&[("x-forwarded-for", "1.2.3.4, not-an-ip, 10.0.0.8")]);
        assert_eq!(r.client_ip(ip("10.0.0.5"), &garbage), ip("10.0.0.8"));
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let r = resolver();
        assert_eq!(r.key_for(ip("2001:db8:1:2::1")), r.key_for(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(r.key_for(ip("2001:db8:1:2::1")), r.key_for(ip("2001:db8:1:3::1")));
        assert_eq!(r.key_for(ip("::ffff:192.0.2.1")), r.key_for(ip("192.0.2.1")));
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c: Cidr = "192.168.0.0/16".parse().unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.contains(ip("192.168.44.1")) && !c.contains(ip("192.169.0.1")));
        let host: Cidr = "127.0.0.1".parse().unwrap_or_else(|e| unreachable!("{e}"));
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn api_keys_verify_and_log_only_a_fingerprint() {
        let keys =
            ApiKeys::load(&["sk-test-0123456789abcdef".into(), "sk-other-0123456789abcd".into()], None)
                .unwrap_or_default()
                .unwrap_or_default();
        let key = keys.verify("sk-test-0123456789abcdef");
        assert!(matches!(key, Some(ClientKey::ApiKey(_))));
        assert_ne!(key, keys.verify("sk-other-0123456789abcd"));
        assert_eq!(keys.verify("sk-test-0123456789abcdeX"), None);
        let label = key.map(|k| k.label()).unwrap_or_default();
        assert!(label.starts_with("key:") && !label.contains("sk-test"));
        assert!(ApiKeys::load(&["short".into()], None).is_err());
        assert!(ApiKeys::load(&[], None).is_ok_and(|k| k.is_none()));
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer_token(&headers(&[("authorization", "Bearer abc")])), Some("abc"));
        assert_eq!(bearer_token(&headers(&[("authorization", "bearer  abc ")])), Some("abc"));
        assert_eq!(bearer_token(&headers(&[("authorization", "Basic abc")])), None);
        assert_eq!(bearer_token(&headers(&[])), None);
    }
}
