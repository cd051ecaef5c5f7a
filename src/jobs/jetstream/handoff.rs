//! Replies handed over from the processes that take requests (gateways) to the processes that
//! answer them (responders): one message per request on `{prefix}.reply`, work-queue stream
//! `{prefix}_REPLIES`, durable consumer `responders`.
//!
//! The payload is the caller's (the bot's reply target and the job's key); this module only
//! carries it. A responder holds a hand-off's lease while it follows the job and answers; one
//! that dies mid-answer leaves the hand-off to another after the lease.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, message::AckKind};
use bytes::Bytes;
use futures::StreamExt;

use super::{holding_lease, JetStreamQueue};
use crate::jobs::JobHandle;

const CONSUMER: &str = "responders";
/// Hand-offs a responder process works on at once.
const IN_HAND: i64 = 1024;
/// Times a hand-off is given to a responder before it is dropped.
const MAX_DELIVERIES: i64 = 5;
/// Attempts at handing a reply over (the broker stores a repeat of the same id once).
const HAND_OFF_ATTEMPTS: u32 = 3;

impl JetStreamQueue {
    /// Hands a reply over to the responders, trying again on a broker error. `id` names the
    /// request: the broker stores the tries of one id (within two minutes) once.
    pub async fn hand_off(&self, id: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        let broker = &self.broker;
        let payload = Bytes::from(payload);
        let mut attempt = 1;
        loop {
            let sent = async {
                broker
                    .js
                    .send_publish(
                        broker.config.reply_subject(),
                        jetstream::message::PublishMessage::build()
                            .payload(payload.clone())
                            .message_id(id),
                    )
                    .await?
                    .await
            }
            .await;
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if attempt >= HAND_OFF_ATTEMPTS => {
                    return Err(e).context("handing the reply over")
                }
                Err(e) => {
                    tracing::warn!("handing a reply over (attempt {attempt}): {e}");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Follows the job `key` that another process submitted ([`JobHandle::broker_key`]);
    /// `shared` as that process's [`JobHandle::is_shared`]. A job whose record is gone (kept
    /// `keep_results`) ends at once with an error.
    pub async fn attach(&self, key: &str, shared: bool) -> JobHandle {
        if let Ok(None) = self.broker.record(key).await {
            let (_, rx) = tokio::sync::watch::channel(super::gone());
            return JobHandle {
                id: 0,
                rx,
                shared,
                canceller: crate::jobs::Canceller::JetStream {
                    queue: self.clone(),
                    key: key.to_string(),
                },
            };
        }
        self.follow(key.to_string(), 0, shared)
    }

    /// The hand-offs for this responder process, in arrival order.
    pub async fn handoffs(&self) -> anyhow::Result<Handoffs> {
        let broker = &self.broker;
        let consumer: consumer::PullConsumer = broker
            .replies
            .get_or_create_consumer(
                CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: broker.config.ack_wait,
                    max_ack_pending: IN_HAND,
                    // An answer that keeps failing (a responder panicking on it) is dropped.
                    max_deliver: MAX_DELIVERIES,
                    ..Default::default()
                },
            )
            .await
            .context("creating the responder consumer")?;
        let lease = consumer.cached_info().config.ack_wait;
        let messages = consumer.messages().await.context("taking hand-offs")?;
        Ok(Handoffs { messages, lease })
    }
}

/// The stream of hand-offs a responder takes.
pub struct Handoffs {
    messages: consumer::pull::Stream,
    lease: Duration,
}

impl Handoffs {
    /// The next hand-off; `None` once the broker ends the stream (the consumer was deleted).
    pub async fn next(&mut self) -> Option<Handoff> {
        loop {
            match self.messages.next().await? {
                Ok(message) => {
                    return Some(Handoff {
                        message,
                        lease: self.lease,
                    })
                }
                Err(e) => {
                    tracing::warn!("receiving a hand-off: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// One reply to give.
pub struct Handoff {
    message: jetstream::Message,
    lease: Duration,
}

impl Handoff {
    /// What the gateway handed over.
    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// 1 the first time this hand-off is taken; more when a responder died with it.
    pub fn deliveries(&self) -> i64 {
        self.message.info().map_or(1, |info| info.delivered)
    }

    /// Runs `answer` while telling the broker every third of the lease that the hand-off is
    /// in hand, then acknowledges it: it is not given to anyone else.
    pub async fn answer<T>(self, answer: impl Future<Output = T>) -> T {
        let out = holding_lease(&self.message, self.lease, answer).await;
        if let Err(e) = self.message.ack().await {
            tracing::warn!("acknowledging a hand-off: {e}");
        }
        out
    }

    /// Drops a hand-off that cannot be answered (it does not parse): it is not redelivered.
    pub async fn discard(self) {
        let _ = self.message.ack_with(AckKind::Term).await;
    }
}
