//! One per-client quota for every replica: the same GCRA that governor runs in-process, as a Lua
//! script Redis runs atomically (sent once, then called by its SHA with `EVALSHA`). The state is
//! one key per (scope, client) holding the theoretical arrival time in microseconds of Redis'
//! own clock, so the replicas' clocks do not matter; it expires when the quota is full again.

use std::sync::LazyLock;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::http::client_identity::ClientKey;
use crate::http::paths::RouteKind;
use crate::http::rate_limit::{Decision, QuotaParams, SharedQuota};
use crate::replicas::backend::Replicas;

/// `KEYS[1]`: the client's quota key. `ARGV[1]`: microseconds per request (the emission
/// interval), `ARGV[2]`: the burst. Returns `{allowed, remaining, microseconds}`, the last
/// being until the quota is full again (allowed) or until the next request may pass (refused).
const GCRA: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, 0, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, math.floor((now - allow_at) / interval), new_tat - now}
";

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(GCRA));

impl SharedQuota for Replicas {
    fn check<'a>(
        &'a self,
        scope: &'a str,
        kind: RouteKind,
        client: &'a ClientKey,
        quota: QuotaParams,
    ) -> BoxFuture<'a, Option<Decision>> {
        Box::pin(async move {
            if !self.healthy() {
                return None;
            }
            let key = self.key(format_args!("quota:{scope}.{}:{}", kind.as_str(), client.stable_id()));
            let interval = u64::try_from(quota.interval.as_micros()).unwrap_or(u64::MAX).max(1);
            let (allowed, remaining, micros): (i64, i64, i64) = self
                .run("quota", |mut conn| async move {
                    SCRIPT.key(key).arg(interval).arg(quota.burst).invoke_async(&mut conn).await
                })
                .await?;
            Some(Decision {
                allowed: allowed == 1,
                limit: quota.burst,
                remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX).min(quota.burst),
                reset: Duration::from_micros(u64::try_from(micros.max(0)).unwrap_or(0)),
            })
        })
    }
}
