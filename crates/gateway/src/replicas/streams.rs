//! Streams any replica can resume. The replica running a generation copies its events (as
//! rendered, in order) into a Redis stream — one entry per run of events the writer had queued,
//! its id `0-SEQ` of the run's last event and one field per event (`SEQ` → data) — beside a hash of what a
//! resume checks: the owner (the client identity), the version, the replica, whether events carry
//! ids, and the error events to send if that replica goes away. A resume that finds nothing
//! locally looks there and follows the stream with a blocking `XREAD` until `[DONE]`.
//!
//! Keys (after `--state-key-prefix`): `stream:ID:meta` (hash), `stream:ID:events` (stream),
//! `stream:ID:reader` (set while another replica reads it: the running replica then keeps the
//! generation going past the grace period), `chat:OWNER:VERSION:CHAT` (the AI SDK chat's latest
//! stream), `replica:ID` (each replica's heartbeat). A running stream's keys expire
//! `--stream-retention-secs` plus an hour after it started; a finished one's after the
//! retention (at least a few seconds, so a reader can still get `[DONE]`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web_lab::sse::Event;
use bytestring::ByteString;
use futures_core::Stream;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use prometheus::IntCounter;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadReply};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::http::client_identity::ClientKey;
use crate::replicas::backend::{MAX_QUEUED_EVENTS, MirrorOp, Replicas, WRITE_BATCH, millis, owner_id};
use crate::sse::{DONE, EventMirror, Replay, event};
use crate::streams::{RemoteReaders, StreamId};

/// How long one `XREAD` waits for the next event before the reader looks around.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// Copies one replay's events to the writer.
struct Mirror {
    id: StreamId,
    writes: mpsc::UnboundedSender<MirrorOp>,
    queued: Arc<AtomicUsize>,
    dropped: IntCounter,
}

impl EventMirror for Mirror {
    fn append(&mut self, seq: usize, data: &ByteString) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_EVENTS {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.inc();
            return;
        }
        if self.writes.send(MirrorOp::Event { id: self.id, seq, data: data.clone() }).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn cancelled(&mut self) {
        let _ = self.writes.send(MirrorOp::Cancelled { id: self.id });
    }
}

/// A stream found in the shared store.
#[derive(Debug, Clone)]
pub struct RemoteStream {
    pub id: StreamId,
    replica: String,
    /// The format's events carry ids.
    pub ids: bool,
    /// The format starts with a `retry:` hint.
    pub retry: bool,
    error: Vec<String>,
    pub done: bool,
    /// Events appended so far.
    pub len: usize,
}

impl RemoteStream {
    /// The events a client of this stream can have seen, given that it saw event `n`: those in
    /// the store and, while the stream runs, those its replica has sent but not copied yet (the
    /// copy follows the send; at most [`MAX_QUEUED_EVENTS`] behind). A reconnect right after a
    /// disconnect then follows from the client's event — the rest arrives — instead of a 404.
    pub fn seen_len(&self, n: usize) -> usize {
        if self.done { self.len } else { n.clamp(self.len, self.len + MAX_QUEUED_EVENTS) }
    }
}

/// `0-SEQ` → SEQ.
fn seq_of(entry: &str) -> Option<usize> {
    entry.strip_prefix("0-")?.parse().ok()
}

impl Replicas {
    /// Copy `replay`'s events (those so far, and every later one) to the shared store, under
    /// stream `id` of `owner` on `version` (and the AI SDK chat, if any).
    pub fn share(
        &self,
        id: StreamId,
        owner: Option<ClientKey>,
        version: &str,
        chat: Option<&str>,
        replay: &mut Replay,
    ) {
        let error =
            replay.error_payloads(&ApiError::Internal("the replica running this stream stopped".into()));
        let fields = vec![
            ("owner", owner_id(owner)),
            ("version", version.to_owned()),
            ("replica", self.replica.clone()),
            ("ids", u8::from(replay.event_ids()).to_string()),
            ("retry", u8::from(replay.retry_hint()).to_string()),
            ("error", serde_json::to_string(&error).unwrap_or_else(|_| "[]".into())),
        ];
        let chat = chat.map(|c| self.chat_key(owner, version, c));
        let _ = self.mirror.send(MirrorOp::Register { id, fields, chat });
        replay.set_mirror(Box::new(Mirror {
            id,
            writes: self.mirror.clone(),
            queued: Arc::clone(&self.queued),
            dropped: self.errors.with_label_values(&["stream_write_dropped"]),
        }));
    }

    /// Stream `id` of `owner` on `version`, if the shared store has it; `None` for an unknown id
    /// and for anyone else's stream alike (and while Redis is down).
    pub async fn find(&self, id: StreamId, owner: Option<ClientKey>, version: &str) -> Option<RemoteStream> {
        if !self.healthy() {
            return None;
        }
        let (meta, events) = (self.stream_key(id, "meta"), self.stream_key(id, "events"));
        let (fields, last): (HashMap<String, String>, StreamRangeReply) = self
            .run("stream_find", |mut conn| async move {
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(meta)
                    .cmd("XREVRANGE")
                    .arg(events)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let field = |name: &str| fields.get(name).map(String::as_str);
        if field("owner") != Some(owner_id(owner).as_str()) || field("version") != Some(version) {
            return None;
        }
        Some(RemoteStream {
            id,
            replica: field("replica")?.to_owned(),
            ids: field("ids") == Some("1"),
            retry: field("retry") == Some("1"),
            error: field("error").and_then(|e| serde_json::from_str(e).ok()).unwrap_or_default(),
            done: field("done") == Some("1"),
            len: last.ids.first().and_then(|e| seq_of(&e.id)).unwrap_or(0),
        })
    }

    /// The latest stream of an AI SDK chat in the shared store.
    pub async fn find_chat(&self, owner: Option<ClientKey>, version: &str, chat: &str) -> Option<StreamId> {
        if !self.healthy() {
            return None;
        }
        let key = self.chat_key(owner, version, chat);
        let id: Option<String> =
            self.run("stream_find", |mut conn| async move {
                redis::cmd("GET").arg(key).query_async(&mut conn).await
            })
            .await?;
        StreamId::parse(&id?)
    }

    /// Follow `stream` from the event after `after` to `[DONE]`, on a connection of its own. If
    /// the replica running it goes away (or Redis does) first, the stream ends with its format's
    /// error event and `[DONE]`, like a stream that fails where it runs.
    pub fn follow(
        self: &Arc<Self>,
        stream: RemoteStream,
        after: usize,
    ) -> impl Stream<Item = Result<Event, Infallible>> + 'static {
        let follower = Follower {
            replicas: Arc::clone(self),
            name: stream.id.to_string(),
            stream,
            last: after,
            conn: None,
        };
        futures_util::stream::unfold(Some(follower), |follower| async move {
            let mut follower = follower?;
            let (events, more) = follower.next_events().await;
            Some((futures_util::stream::iter(events), more.then_some(follower)))
        })
        .flatten()
    }
}

/// One reader of a stream that runs on another replica.
struct Follower {
    replicas: Arc<Replicas>,
    stream: RemoteStream,
    name: String,
    /// The last event sent.
    last: usize,
    conn: Option<MultiplexedConnection>,
}

impl Follower {
    /// The next events (possibly none yet), and whether more may follow.
    async fn next_events(&mut self) -> (Vec<Result<Event, Infallible>>, bool) {
        match self.read().await {
            Ok(Some(events)) => {
                let ended = events.iter().any(|(_, data)| &**data == DONE);
                (self.render(events), !ended)
            }
            Ok(None) => (Vec::new(), true),
            Err(lost) => {
                if let Lost::Redis(e) = lost {
                    self.replicas.failed("stream_follow", &e);
                }
                let mut events: Vec<(usize, ByteString)> = Vec::new();
                for data in self.stream.error.iter().map(String::as_str).chain([DONE]) {
                    events.push((self.last + events.len() + 1, ByteString::from(data)));
                }
                (self.render(events), false)
            }
        }
    }

    fn render(&self, events: Vec<(usize, ByteString)>) -> Vec<Result<Event, Infallible>> {
        let id = self.stream.ids.then_some(self.name.as_str());
        events.into_iter().map(|(seq, data)| Ok(event(data, id, seq))).collect()
    }

    /// Events after `last` (waiting up to a second for them): `Ok(None)` when none came but the
    /// stream goes on; `Err` when it cannot go on.
    async fn read(&mut self) -> Result<Option<Vec<(usize, ByteString)>>, Lost> {
        let replicas = Arc::clone(&self.replicas);
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(replicas.config.timeout))
                    .set_response_timeout(Some(READ_BLOCK + replicas.config.timeout));
                let conn = replicas
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(Lost::Redis)?;
                self.conn.insert(conn)
            }
        };
        let id = self.stream.id;
        // Tell the running replica someone reads (it keeps the generation going meanwhile).
        let reader_ttl = millis(replicas.config.grace + READ_BLOCK * 3);
        let _: () = redis::cmd("SET")
            .arg(replicas.stream_key(id, "reader"))
            .arg(1)
            .arg("PX")
            .arg(reader_ttl)
            .query_async(conn)
            .await
            .map_err(Lost::Redis)?;
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(WRITE_BATCH)
            .arg("BLOCK")
            .arg(millis(READ_BLOCK))
            .arg("STREAMS")
            .arg(replicas.stream_key(id, "events"))
            .arg(format!("0-{}", self.last))
            .query_async(conn)
            .await
            .map_err(Lost::Redis)?;
        // Each entry holds a run of events, one field per event (`SEQ` → data).
        let mut entries: Vec<(usize, ByteString)> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .flat_map(|e| e.map.into_iter())
            .filter_map(|(seq, data)| {
                let data: Vec<u8> = redis::from_redis_value(data).ok()?;
                Some((seq.parse().ok()?, ByteString::try_from(data).ok()?))
            })
            .filter(|(seq, _)| *seq > self.last)
            .collect();
        entries.sort_unstable_by_key(|(seq, _)| *seq);
        if let Some((seq, _)) = entries.last() {
            // Events the running replica could not write (Redis was down meanwhile) leave a gap:
            // end the stream as failed rather than skip them.
            let contiguous = entries.iter().zip(self.last + 1..).all(|((seq, _), expected)| *seq == expected);
            if !contiguous {
                return Err(Lost::Gone);
            }
            self.last = *seq;
            return Ok(Some(entries));
        }
        // Nothing new: is the stream still there, and its replica alive?
        let (meta, alive): (bool, bool) = redis::pipe()
            .cmd("EXISTS")
            .arg(replicas.stream_key(id, "meta"))
            .cmd("EXISTS")
            .arg(replicas.key(format_args!("replica:{}", self.stream.replica)))
            .query_async(conn)
            .await
            .map_err(Lost::Redis)?;
        if meta && alive { Ok(None) } else { Err(Lost::Gone) }
    }
}

/// Why a followed stream cannot go on.
enum Lost {
    /// Redis did not answer.
    Redis(redis::RedisError),
    /// The stream was cancelled or expired, the replica running it stopped, or some of its
    /// events never reached Redis.
    Gone,
}

impl RemoteReaders for Replicas {
    fn reading(&self, id: StreamId) -> BoxFuture<'static, bool> {
        let key = self.stream_key(id, "reader");
        let (conn, timeout, healthy) = (self.conn.clone(), self.config.timeout, self.healthy());
        Box::pin(async move {
            if !healthy {
                return false;
            }
            let (mut conn, mut exists) = (conn, redis::cmd("EXISTS"));
            let exists = exists.arg(key).query_async::<bool>(&mut conn);
            matches!(actix_web::rt::time::timeout(timeout, exists).await, Ok(Ok(true)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(len: usize, done: bool) -> RemoteStream {
        RemoteStream {
            id: StreamId::random(),
            replica: "r".into(),
            ids: true,
            retry: false,
            error: vec![],
            done,
            len,
        }
    }

    #[test]
    fn a_running_stream_counts_the_events_its_replica_sent_but_has_not_copied_yet() {
        // The client saw event 5; the store has 3 so far: follow from 5.
        assert_eq!(stream(3, false).seen_len(5), 5);
        assert_eq!(stream(7, false).seen_len(5), 7);
        // Never further than the copy can lag, and nothing beyond the end of a finished stream.
        assert_eq!(stream(3, false).seen_len(usize::MAX), 3 + MAX_QUEUED_EVENTS);
        assert_eq!(stream(3, true).seen_len(5), 3);
    }
}
