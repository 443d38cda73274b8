//! Resumable streams on one replica: every streamed generation is registered under an
//! unguessable id (128 random bits) bound to the client that started it, so a client that lost
//! its connection can read on from the event after the last one it saw (`Last-Event-ID`,
//! `?after=N`, or the AI SDK's chat id).
//!
//! A generation whose client left keeps running for `--disconnect-grace-secs` (0: cancelled at
//! once, as before streams were resumable); a resume in time takes it over, otherwise it is
//! cancelled. Finished streams stay readable for `--stream-retention-secs`; at most
//! `--max-retained-streams` finished ones are kept, the oldest going first. During the grace
//! period the generation is driven by its grace timer, so its events keep reaching the log (and
//! the shared store, where another replica may be reading them: while one is, see
//! [`RemoteReaders`], the grace period is extended).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::http::client_identity::ClientKey;
use crate::sse::{DetachHook, SharedReplay, lock};

/// A stream's id: 128 random bits, written as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(u128);

impl StreamId {
    pub fn random() -> Self {
        Self(rand::rng().random())
    }

    /// 32 lowercase hex digits, nothing else.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| u128::from_str_radix(s, 16).ok().map(Self))
            .flatten()
    }

    /// `STREAM-SEQ` (an SSE event id) → the stream and the sequence number of that event.
    pub fn parse_event_id(s: &str) -> Option<(Self, usize)> {
        let (id, seq) = s.trim().rsplit_once('-')?;
        Some((Self::parse(id)?, seq.parse().ok()?))
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Whether a client is reading a stream on another replica (through the shared state backend).
pub trait RemoteReaders: Send + Sync {
    fn reading(&self, id: StreamId) -> futures_util::future::BoxFuture<'static, bool>;
}

struct Entry {
    owner: Option<ClientKey>,
    version: String,
    replay: SharedReplay,
}

#[derive(Default)]
struct Streams {
    by_id: HashMap<StreamId, Entry>,
    /// Ids in the order they were registered (streams mostly finish in that order too), so the
    /// cap is kept on every registration without a scan.
    order: VecDeque<StreamId>,
    /// The latest stream of an AI SDK chat: (owner, version, chat id) → stream.
    chats: HashMap<(Option<ClientKey>, String, String), StreamId>,
}

/// Every resumable stream of this replica.
pub struct StreamHub {
    streams: Mutex<Streams>,
    grace: Duration,
    retention: Duration,
    max_finished: usize,
    remote: Option<Arc<dyn RemoteReaders>>,
}

impl StreamHub {
    /// `remote`: where to ask whether another replica is reading a stream whose client left
    /// here (`None` with one replica).
    pub fn new(
        grace: Duration,
        retention: Duration,
        max_finished: usize,
        remote: Option<Arc<dyn RemoteReaders>>,
    ) -> Arc<Self> {
        Arc::new(Self { streams: Mutex::default(), grace, retention, max_finished, remote })
    }

    /// How long a generation keeps running without a reader.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// How long a finished stream stays readable.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Resume is off when there is neither a grace period nor a retention window: nothing is
    /// registered or kept, and events carry no ids.
    pub fn enabled(&self) -> bool {
        !(self.grace.is_zero() && self.retention.is_zero())
    }

    fn streams(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a new stream of `owner` on `version` (and its AI SDK chat, if any).
    pub fn register(
        &self,
        owner: Option<ClientKey>,
        version: &str,
        chat_id: Option<&str>,
        replay: SharedReplay,
    ) -> StreamId {
        let id = StreamId::random();
        let mut streams = self.streams();
        // Past the cap, drop the oldest finished streams (a few looks per registration: running
        // streams met on the way go to the back of the line).
        for _ in 0..4 {
            if streams.by_id.len() < self.max_finished {
                break;
            }
            let Some(oldest) = streams.order.pop_front() else { break };
            let finished = streams.by_id.get(&oldest).map(|e| lock(&e.replay).finished().is_some());
            match finished {
                Some(true) => {
                    streams.by_id.remove(&oldest);
                }
                Some(false) => streams.order.push_back(oldest),
                None => {}
            }
        }
        streams.by_id.insert(id, Entry { owner, version: version.to_owned(), replay });
        streams.order.push_back(id);
        if let Some(chat) = chat_id {
            streams.chats.insert((owner, version.to_owned(), chat.to_owned()), id);
        }
        id
    }

    /// The stream `id` of `owner` on `version`; `None` for an unknown id and for anyone else's
    /// stream alike.
    pub fn find(&self, id: StreamId, owner: Option<ClientKey>, version: &str) -> Option<SharedReplay> {
        let streams = self.streams();
        let entry = streams.by_id.get(&id)?;
        (entry.owner == owner && entry.version == version).then(|| Arc::clone(&entry.replay))
    }

    /// The latest stream of an AI SDK chat, if it is still kept.
    pub fn find_chat(
        &self,
        owner: Option<ClientKey>,
        version: &str,
        chat_id: &str,
    ) -> Option<(StreamId, SharedReplay)> {
        let streams = self.streams();
        let id = *streams.chats.get(&(owner, version.to_owned(), chat_id.to_owned()))?;
        streams.by_id.get(&id).map(|e| (id, Arc::clone(&e.replay)))
    }

    /// What happens when the reader driving stream `id` leaves before its end: cancel at once
    /// with no grace period, else keep the generation going for the grace period and cancel it
    /// then, unless a resume took over meanwhile (here, or on another replica).
    pub fn detach_hook(self: &Arc<Self>, id: StreamId) -> DetachHook {
        let hub = Arc::clone(self);
        Box::new(move |replay: &SharedReplay, epoch: u64| {
            let cancel_now = |hub: &StreamHub| {
                lock(replay).cancel();
                hub.forget(id);
            };
            if hub.grace.is_zero() {
                return cancel_now(&hub);
            }
            let (timer_hub, timer_replay) = (Arc::clone(&hub), Arc::clone(replay));
            let timer = async move {
                loop {
                    let driven = std::future::poll_fn(|cx| lock(&timer_replay).drive_detached(cx, epoch));
                    let deadline = actix_web::rt::time::sleep(timer_hub.grace);
                    futures_util::pin_mut!(deadline);
                    if let futures_util::future::Either::Left(_) =
                        futures_util::future::select(driven, deadline).await
                    {
                        return; // it ended, or a reader here took over
                    }
                    let remote = timer_hub.remote.as_ref().map(|r| r.reading(id));
                    if let Some(reading) = remote
                        && reading.await
                    {
                        continue; // read on another replica: keep it going
                    }
                    let abandoned = {
                        let mut r = lock(&timer_replay);
                        let abandoned = r.epoch() == epoch && r.finished().is_none();
                        if abandoned {
                            r.cancel();
                        }
                        abandoned
                    };
                    if abandoned {
                        timer_hub.forget(id);
                    }
                    return;
                }
            };
            // The timer runs on the actix system's arbiter; without one (or once it stopped)
            // there is nothing to wait on: cancel now.
            let spawned =
                actix_web::rt::System::try_current().is_some_and(|system| system.arbiter().spawn(timer));
            if !spawned {
                cancel_now(&hub);
            }
        })
    }

    fn forget(&self, id: StreamId) {
        let mut streams = self.streams();
        streams.by_id.remove(&id);
        streams.chats.retain(|_, s| *s != id);
    }

    /// Drop finished streams past the retention window, then the oldest finished ones beyond
    /// the cap. Returns how many streams are kept.
    pub fn evict(&self) -> usize {
        let now = Instant::now();
        let mut streams = self.streams();
        let mut finished: Vec<(Instant, StreamId)> = Vec::new();
        streams.by_id.retain(|id, entry| match lock(&entry.replay).finished_at() {
            Some(at) if now.duration_since(at) >= self.retention => false,
            Some(at) => {
                finished.push((at, *id));
                true
            }
            None => true,
        });
        if finished.len() > self.max_finished {
            finished.sort_unstable();
            for (_, id) in &finished[..finished.len() - self.max_finished] {
                streams.by_id.remove(id);
            }
        }
        let Streams { by_id, chats, order } = &mut *streams;
        chats.retain(|_, id| by_id.contains_key(id));
        order.retain(|id| by_id.contains_key(id));
        by_id.len()
    }

    pub fn len(&self) -> usize {
        self.streams().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;
    use crate::metrics::Metrics;
    use crate::sse::{EventFormat, Replay, StreamMetrics};
    use streamgate_inference::{FinishReason, Usage};

    struct Plain;

    impl EventFormat for Plain {
        fn token(&mut self, _: usize, text: &str) -> Option<String> {
            Some(text.to_owned())
        }
        fn reasoning(&mut self, text: &str) -> Vec<String> {
            vec![text.to_owned()]
        }
        fn finish(&mut self, _: FinishReason, _: Usage) -> Vec<String> {
            Vec::new()
        }
        fn error(&mut self, e: &ApiError) -> Vec<String> {
            vec![e.to_string()]
        }
    }

    fn replay(metrics: &Metrics) -> SharedReplay {
        let tokens = Box::pin(futures_util::stream::pending());
        Replay::new(tokens, Plain, StreamMetrics::new(metrics, "v1"), None, Instant::now(), true)
    }

    #[test]
    fn without_an_actix_system_a_detach_cancels_at_once_instead_of_panicking() {
        let metrics = Metrics::new().unwrap_or_else(|e| unreachable!("{e}"));
        let hub = StreamHub::new(Duration::from_secs(5), Duration::from_secs(300), 8, None);
        let r = replay(&metrics);
        let id = hub.register(None, "v1", None, Arc::clone(&r));
        let epoch = lock(&r).epoch();
        (hub.detach_hook(id))(&r, epoch);
        assert_eq!(lock(&r).finished(), Some("client_disconnected"));
        assert!(hub.is_empty());
    }

    #[test]
    fn the_finished_stream_cap_holds_on_every_registration() {
        let metrics = Metrics::new().unwrap_or_else(|e| unreachable!("{e}"));
        let hub = StreamHub::new(Duration::from_secs(5), Duration::from_secs(300), 3, None);
        let running = replay(&metrics);
        let first = hub.register(None, "v1", None, Arc::clone(&running));
        for _ in 0..50 {
            let r = replay(&metrics);
            hub.register(None, "v1", Some("chat"), Arc::clone(&r));
            lock(&r).cancel();
            assert!(hub.len() <= 4, "{} streams kept", hub.len());
        }
        assert!(hub.find(first, None, "v1").is_some(), "a running stream is never dropped for the cap");
        assert!(hub.find(first, Some(ClientKey::V4(1)), "v1").is_none(), "only its owner finds it");
        assert!(hub.find(first, None, "v2").is_none(), "only on its version");
        hub.evict();
        assert!(hub.find_chat(None, "v1", "chat").is_some_and(|(id, _)| id != first));
    }

    #[test]
    fn ids_are_32_hex_digits_and_event_ids_carry_a_sequence() {
        let id = StreamId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(StreamId::parse(&text), Some(id));
        assert_eq!(StreamId::parse_event_id(&format!("{text}-7")), Some((id, 7)));
        let upper = "0123456789ABCDEF0123456789abcdef";
        for bad in ["", "xyz", &text[1..], &format!("{text}0"), upper, "+0000000000000000000000000000001"] {
            assert_eq!(StreamId::parse(bad), None, "{bad}");
        }
        assert_eq!(StreamId::parse_event_id(&text), None);
        assert_eq!(StreamId::parse_event_id(&format!("{text}--1")), None);
        assert_ne!(StreamId::random(), StreamId::random());
    }
}
