//! Per-client rate limits (governor, keyed GCRA) and the per-client cap on open streams.
//!
//! Limits are on by default. A rule is `COUNT/PERIOD[:BURST]` (e.g. `60/min:20`) or `off`; the
//! default rule applies everywhere and `SCOPE=RULE` overrides it, where SCOPE is a version (`v1`),
//! a route kind (`stream`, `complete`, `other`) or both (`v1.stream`); the most specific wins.
//! Each (version, kind) has its own quota. A rate limiter counts requests; a stream that lasts
//! minutes is one request, which is why the concurrent-stream cap exists beside it.
//!
//! With a shared state backend (`--state redis://…`) every replica checks the same quota there
//! (a [`SharedQuota`]); while it does not answer, this replica's own limiter decides (and a
//! metric counts it), so a Redis outage never refuses or fails a request on its own.
//!
//! The middleware (after CORS) identifies the client (API key or address, see
//! [`client_identity`](crate::http::client_identity)), answers 401 / 429, and adds `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` to every limited response.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, web};
use governor::clock::{Clock, QuantaClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use prometheus::{IntCounter, IntCounterVec};

use crate::error::ApiError;
use crate::http::client_identity::{ApiKeys, ClientKey, ClientResolver, bearer_token};
use crate::http::paths::{
    GLOBAL_SCOPE, OPENAI_SCOPE, RouteKind, classify, error_response_for, is_public, matches_pattern,
};
use crate::http::request_log::RequestLog;

/// `COUNT/PERIOD[:BURST]`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateRule {
    Off,
    Limit { count: NonZeroU32, period: Duration, burst: Option<NonZeroU32> },
}

impl FromStr for RateRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        let bad = || format!("'{s}' is not a rate like 60/min or 60/min:20 (per s, min, hour) or off");
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b.parse::<NonZeroU32>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count = count.trim().parse::<NonZeroU32>().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Self::Limit { count, period, burst })
    }
}

impl RateRule {
    fn quota(self, default_burst: NonZeroU32) -> Option<Quota> {
        let Self::Limit { count, period, burst } = self else { return None };
        let per_cell = period / count.get();
        Quota::with_period(per_cell.max(Duration::from_nanos(1)))
            .map(|q| q.allow_burst(burst.unwrap_or(default_burst)))
    }
}

/// `SCOPE=RULE`, e.g. `v1.stream=120/min:30`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedRule {
    pub version: Option<String>,
    pub kind: Option<RouteKind>,
    pub rule: RateRule,
}

impl FromStr for ScopedRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scope, rule) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not SCOPE=RULE (e.g. v1.stream=120/min:30)"))?;
        let rule: RateRule = rule.parse()?;
        let parts: Vec<&str> = scope.trim().split('.').collect();
        let (version, kind) = match parts.as_slice() {
            [one] => match one.parse::<RouteKind>() {
                Ok(kind) => (None, Some(kind)),
                Err(_) => (Some((*one).to_owned()), None),
            },
            [v, k] => (Some((*v).to_owned()), Some(k.parse::<RouteKind>()?)),
            _ => return Err(format!("'{scope}' is not VERSION, KIND or VERSION.KIND")),
        };
        if version.as_deref().is_some_and(str::is_empty) {
            return Err(format!("'{scope}' has an empty version"));
        }
        Ok(Self { version, kind, rule })
    }
}

const KINDS: [RouteKind; 3] = [RouteKind::Stream, RouteKind::Complete, RouteKind::Other];

/// The outcome of one check, for the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst size (requests that may be made at once).
    pub limit: u32,
    pub remaining: u32,
    /// Until the quota is full again (allowed) / until the next request may pass (refused).
    pub reset: Duration,
}

/// One keyed limiter; a trait so tests can drive it with a fake clock.
pub trait KeyedLimiter: Send + Sync {
    fn check(&self, key: &ClientKey) -> Decision;
    /// The quota it enforces, for a shared store to enforce the same one.
    fn quota(&self) -> QuotaParams;
    /// Forget clients whose state is back to "fresh" (bounded memory with many clients).
    fn evict_idle(&self);
    fn tracked_clients(&self) -> usize;
}

/// A GCRA quota: one request per `interval`, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaParams {
    pub interval: Duration,
    pub burst: u32,
}

/// A quota kept outside this process, shared by every replica (the Redis backend).
pub trait SharedQuota: Send + Sync {
    /// Check (and count) one request of `client` against the quota of (`scope`, `kind`) — the
    /// same names on every replica; `None` when the store cannot answer now (the caller then
    /// asks this replica's own limiter).
    fn check<'a>(
        &'a self,
        scope: &'a str,
        kind: RouteKind,
        client: &'a ClientKey,
        quota: QuotaParams,
    ) -> futures_util::future::BoxFuture<'a, Option<Decision>>;
}

/// A governor keyed limiter on a DashMap, with state snapshots for the headers.
pub struct GovernorLimiter<K: Hash + Eq + Clone, C: Clock> {
    limiter: RateLimiter<K, DashMapStateStore<K>, C, StateInformationMiddleware>,
    replenish: Duration,
    burst: u32,
}

impl<K: Hash + Eq + Clone, C: Clock> GovernorLimiter<K, C> {
    pub fn new(quota: Quota, clock: C) -> Self {
        Self {
            replenish: quota.replenish_interval(),
            burst: quota.burst_size().get(),
            limiter: RateLimiter::dashmap_with_clock(quota, clock)
                .with_middleware::<StateInformationMiddleware>(),
        }
    }

    pub fn check_key(&self, key: &K) -> Decision {
        match self.limiter.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit: self.burst,
                    remaining,
                    reset: self.replenish * (self.burst - remaining),
                }
            }
            Err(not_until) => Decision {
                allowed: false,
                limit: self.burst,
                remaining: 0,
                reset: not_until.wait_time_from(self.limiter.clock().now()),
            },
        }
    }

    pub fn evict(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

impl<C: Clock + Send + Sync> KeyedLimiter for GovernorLimiter<ClientKey, C>
where
    C::Instant: Send + Sync,
{
    fn check(&self, key: &ClientKey) -> Decision {
        self.check_key(key)
    }

    fn quota(&self) -> QuotaParams {
        QuotaParams { interval: self.replenish, burst: self.burst }
    }

    fn evict_idle(&self) {
        self.evict();
    }

    fn tracked_clients(&self) -> usize {
        self.len()
    }
}

/// Every quota of the gateway: one limiter per (version, kind), `None` where limits are off.
pub struct RateLimits {
    by_version: HashMap<String, [Option<Arc<dyn KeyedLimiter>>; 3]>,
    exempt: Vec<String>,
}

impl RateLimits {
    /// Build the limiters for `versions` (plus `openai` and `*` for unversioned routes).
    pub fn new(
        versions: impl Iterator<Item = String>,
        default: RateRule,
        default_burst: NonZeroU32,
        rules: &[ScopedRule],
        exempt: Vec<String>,
    ) -> Self {
        let mut by_version = HashMap::new();
        for version in versions.chain([OPENAI_SCOPE.to_owned(), GLOBAL_SCOPE.to_owned()]) {
            let limiters = KINDS.map(|kind| {
                let rule = resolve(&version, kind, default, rules);
                rule.quota(default_burst).map(|q| {
                    Arc::new(GovernorLimiter::<ClientKey, _>::new(q, QuantaClock::default()))
                        as Arc<dyn KeyedLimiter>
                })
            });
            by_version.insert(version, limiters);
        }
        Self { by_version, exempt }
    }

    pub fn is_exempt(&self, path: &str) -> bool {
        self.exempt.iter().any(|p| matches_pattern(p, path))
    }

    /// Check one request; `None` when that scope is not limited.
    pub fn check(&self, path: &str, key: &ClientKey) -> Option<Decision> {
        self.limiter(path).map(|(_, _, l)| l.check(key))
    }

    /// The quota a path is under: its scope (a version, `openai` or `*`) and kind, and this
    /// replica's limiter for it; `None` when that scope is not limited.
    pub fn limiter(&self, path: &str) -> Option<(&str, RouteKind, &dyn KeyedLimiter)> {
        let (version, kind) = classify(path);
        let (scope, limiters) = match self.by_version.get_key_value(version) {
            Some(found) => found,
            None => self.by_version.get_key_value(GLOBAL_SCOPE)?,
        };
        let index = KINDS.iter().position(|k| *k == kind).unwrap_or(2);
        let limiter = limiters[index].as_deref()?;
        Some((scope.as_str(), kind, limiter))
    }

    /// Drop idle clients from every limiter (called on a timer).
    pub fn evict_idle(&self) -> usize {
        let mut tracked = 0;
        for limiter in self.by_version.values().flatten().flatten() {
            limiter.evict_idle();
            tracked += limiter.tracked_clients();
        }
        tracked
    }
}

/// The most specific rule for (version, kind): `v.k` > `v` > `k` > default.
fn resolve(version: &str, kind: RouteKind, default: RateRule, rules: &[ScopedRule]) -> RateRule {
    let find = |v: Option<&str>, k: Option<RouteKind>| {
        rules.iter().rev().find(|r| r.version.as_deref() == v && r.kind == k).map(|r| r.rule)
    };
    find(Some(version), Some(kind))
        .or_else(|| find(Some(version), None))
        .or_else(|| find(None, Some(kind)))
        .unwrap_or(default)
}

/// Per-client count of open streams, capped.
pub struct StreamSlots {
    max: usize,
    open: Mutex<HashMap<ClientKey, usize>>,
}

/// Held by an open stream; releases its slot when dropped.
pub struct StreamPermit {
    slots: Arc<StreamSlots>,
    key: ClientKey,
}

impl StreamSlots {
    /// `max` = 0 means no cap.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, open: Mutex::new(HashMap::new()) })
    }

    pub fn acquire(self: &Arc<Self>, key: ClientKey) -> Result<StreamPermit, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key).or_insert(0);
        if self.max > 0 && *count >= self.max {
            return Err(ApiError::TooManyStreams { max: self.max });
        }
        *count += 1;
        Ok(StreamPermit { slots: Arc::clone(self), key })
    }

    pub fn open_for(&self, key: &ClientKey) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Seconds, rounded up, at least 1 when not zero.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Write the `RateLimit-*` headers (and `Retry-After` when refused).
pub fn set_headers(headers: &mut HeaderMap, d: &Decision) {
    let set = |h: &mut HeaderMap, name: &'static str, v: u64| {
        h.insert(HeaderName::from_static(name), HeaderValue::from(v));
    };
    set(headers, "ratelimit-limit", u64::from(d.limit));
    set(headers, "ratelimit-remaining", u64::from(d.remaining));
    set(headers, "ratelimit-reset", whole_seconds(d.reset));
    if !d.allowed {
        set(headers, "retry-after", whole_seconds(d.reset).max(1));
    }
}

/// The client of a request, as identified by the middleware.
pub fn client_of(req: &actix_web::HttpRequest) -> Option<ClientKey> {
    req.extensions().get::<ClientKey>().copied()
}

/// Who a client is and how much it may ask: what the client middleware reads (its own
/// `Data<ClientGate>`, installed by `create_app`).
pub struct ClientGate {
    /// `None`: API keys are off and clients are addresses.
    pub api_keys: Option<ApiKeys>,
    pub resolver: ClientResolver,
    pub limits: RateLimits,
    /// Every replica's quota, when a shared state backend is configured.
    pub shared: Option<Arc<dyn SharedQuota>>,
    /// `rate_limited_total` by reason, counted here for `rate` refusals.
    pub refused: IntCounterVec,
    /// Checks this replica answered alone because the shared quota was down.
    pub fallbacks: IntCounter,
}

impl ClientGate {
    /// Check one request of `key` on `path`: against the shared quota when there is one and it
    /// answers, else against this replica's own. `None` when the path is not limited.
    pub async fn check(&self, path: &str, key: &ClientKey) -> Option<Decision> {
        let (scope, kind, local) = self.limits.limiter(path)?;
        if let Some(shared) = &self.shared {
            if let Some(decision) = shared.check(scope, kind, key, local.quota()).await {
                return Some(decision);
            }
            self.fallbacks.inc();
        }
        Some(local.check(key))
    }
}

/// actix middleware (`from_fn`): identify, authenticate, rate-limit.
pub async fn client_middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static>>, actix_web::Error> {
    let Some(gate) = req.app_data::<web::Data<ClientGate>>().cloned() else {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    };
    let path = req.path().to_owned();
    if gate.limits.is_exempt(&path) {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    }
    let key = match &gate.api_keys {
        Some(keys) if !is_public(&path) => match bearer_token(req.headers()).and_then(|t| keys.verify(t)) {
            Some(key) => key,
            None => {
                let response = error_response_for(req.path(), ApiError::Unauthorized);
                return Ok(req.into_response(response).map_into_right_body());
            }
        },
        _ => {
            let peer = req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            gate.resolver.key_for(gate.resolver.client_ip(peer, req.headers()))
        }
    };
    if let Some(log) = req.extensions().get::<Arc<RequestLog>>() {
        log.set_client(key.label());
    }
    req.extensions_mut().insert(key);
    let decision = gate.check(&path, &key).await;
    if let Some(d) = decision.filter(|d| !d.allowed) {
        gate.refused.with_label_values(&["rate"]).inc();
        let mut response = error_response_for(&path, ApiError::RateLimited);
        set_headers(response.headers_mut(), &d);
        return Ok(req.into_response(response).map_into_right_body());
    }
    let mut res = next.call(req).await?;
    if let Some(d) = decision {
        set_headers(res.headers_mut(), &d);
    }
    Ok(res.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rule(s: &str) -> RateRule {
        s.parse().unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn limiter(s: &str, clock: &FakeRelativeClock) -> GovernorLimiter<ClientKey, FakeRelativeClock> {
        let quota = rule(s).quota(NonZeroU32::MIN.saturating_add(19)).unwrap_or_else(|| unreachable!());
        GovernorLimiter::new(quota, clock.clone())
    }

    #[test]
    fn exactly_the_burst_passes_then_the_reset_time_frees_one() {
        let clock = FakeRelativeClock::default();
        let l = limiter("60/min:5", &clock);
        let client = ClientKey::V4(1);
        for i in 0..5 {
            let d = l.check_key(&client);
            assert!(d.allowed, "request {i} within the burst");
            assert_eq!((d.limit, d.remaining), (5, 4 - i));
        }
        let refused = l.check_key(&client);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset, Duration::from_secs(1), "one request per second replenishes");
        clock.advance(refused.reset);
        assert!(l.check_key(&client).allowed, "passes again after the reset time");
        assert!(!l.check_key(&client).allowed);
    }

    #[test]
    fn clients_do_not_share_a_quota() {
        let clock = FakeRelativeClock::default();
        let l = limiter("1/min:1", &clock);
        assert!(l.check_key(&ClientKey::V4(1)).allowed);
        assert!(!l.check_key(&ClientKey::V4(1)).allowed);
        assert!(l.check_key(&ClientKey::V4(2)).allowed);
        assert!(l.check_key(&ClientKey::ApiKey([7; 16])).allowed);
    }

    #[test]
    fn idle_clients_are_evicted_a_million_at_a_time() {
        let clock = FakeRelativeClock::default();
        let l = limiter("60/min:20", &clock);
        for i in 0..1_000_000u32 {
            l.check_key(&ClientKey::V4(i));
        }
        assert_eq!(l.len(), 1_000_000);
        l.evict();
        assert_eq!(l.len(), 1_000_000, "recent clients stay");
        clock.advance(Duration::from_secs(2));
        l.evict();
        assert!(l.is_empty(), "clients back to a full quota are forgotten");
    }

    #[test]
    fn rules_parse_and_the_most_specific_wins() {
        assert_eq!(rule("off"), RateRule::Off);
        assert!("60".parse::<RateRule>().is_err() && "0/min".parse::<RateRule>().is_err());
        assert!("10/week".parse::<RateRule>().is_err());
        let rules: Vec<ScopedRule> = ["stream=10/min", "v2=30/min", "v2.stream=off"]
            .iter()
            .map(|s| s.parse().unwrap_or_else(|e: String| unreachable!("{e}")))
            .collect();
        let default = rule("60/min");
        assert_eq!(resolve("v1", RouteKind::Stream, default, &rules), rule("10/min"));
        assert_eq!(resolve("v1", RouteKind::Complete, default, &rules), default);
        assert_eq!(resolve("v2", RouteKind::Complete, default, &rules), rule("30/min"));
        assert_eq!(resolve("v2", RouteKind::Stream, default, &rules), RateRule::Off);
        assert!("v1.bogus=1/s".parse::<ScopedRule>().is_err());
    }

    #[test]
    fn stream_slots_cap_and_release() {
        let slots = StreamSlots::new(2);
        let k = ClientKey::V4(9);
        let a = slots.acquire(k);
        let b = slots.acquire(k);
        assert!(a.is_ok() && b.is_ok());
        assert!(matches!(slots.acquire(k), Err(ApiError::TooManyStreams { max: 2 })));
        assert!(slots.acquire(ClientKey::V4(10)).is_ok(), "another client has its own slots");
        drop(a);
        assert_eq!(slots.open_for(&k), 1);
        assert!(slots.acquire(k).is_ok());
    }

    #[test]
    fn headers_round_up_and_say_when_to_retry() {
        let mut h = HeaderMap::new();
        set_headers(
            &mut h,
            &Decision { allowed: false, limit: 20, remaining: 0, reset: Duration::from_millis(1500) },
        );
        assert_eq!(h.get("ratelimit-limit").and_then(|v| v.to_str().ok()), Some("20"));
        assert_eq!(h.get("ratelimit-reset").and_then(|v| v.to_str().ok()), Some("2"));
        assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
    }
}
