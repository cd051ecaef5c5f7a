//! `serve --role responder`: answers the requests that gateways queued and handed over. It
//! follows each job on the broker, edits the interaction's reply as the job goes, sends the
//! results, and records the job's end. It holds the bot token (REST only, no gateway
//! connection) and loads no models.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serenity::all::{ApplicationId, Http};

use super::cartoon::{self, Delivery};
use super::stylepack;
use super::{http_builder, BotConfig, ReplyTarget, Token};
use crate::jobs::{Handoff, JetStreamQueue, TrainingNews, TrainingQueue};
use crate::store::Store;
use crate::stylepack::PackNews;

/// How long a stopping responder lets the answers in hand finish.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Answers hand-offs, and tells the channels what the trainers report of queued style packs
/// (one piece of news at a time across the responders, in order), until `stop` completes or
/// the broker ends the stream. On `stop`, takes no more and lets the answers in hand finish
/// for a few seconds; those still waiting for their job then go to another responder after
/// their lease.
pub async fn respond(
    config: BotConfig,
    token: Token,
    queue: JetStreamQueue,
    training: TrainingQueue,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let store = Store::connect(&config.database).await?;
    let http = Arc::new(http_builder(&config, &token).build());
    let config = Arc::new(config);
    let mut handoffs = queue.handoffs().await?;
    let news = training.news().await?;
    let relay = tokio::spawn(relay_news(news, store.clone(), Arc::clone(&http), training));
    let mut stop = std::pin::pin!(stop);
    let mut in_hand = tokio::task::JoinSet::new();
    let ended = loop {
        let handoff = tokio::select! {
            handoff = handoffs.next() => handoff,
            Some(done) = in_hand.join_next(), if !in_hand.is_empty() => {
                log_panic(done);
                continue;
            }
            _ = &mut stop => break Ok(()),
        };
        let Some(handoff) = handoff else {
            break Err(anyhow::anyhow!("the broker connection ended"));
        };
        let delivery: Delivery = match serde_json::from_slice(handoff.payload()) {
            Ok(delivery) => delivery,
            Err(e) => {
                tracing::warn!("dropping a hand-off that does not parse: {e}");
                handoff.discard().await;
                continue;
            }
        };
        in_hand.spawn(answer(
            handoff,
            delivery,
            store.clone(),
            Arc::clone(&config),
            Arc::clone(&http),
            queue.clone(),
        ));
    };
    let finish = async {
        while let Some(done) = in_hand.join_next().await {
            log_panic(done);
        }
    };
    if tokio::time::timeout(STOP_GRACE, finish).await.is_err() {
        in_hand.shutdown().await;
    }
    // A piece of news cut short is told again by the next responder.
    relay.abort();
    store.close().await;
    ended.context("taking hand-offs")
}

async fn answer(
    handoff: Handoff,
    delivery: Delivery,
    store: Store,
    config: Arc<BotConfig>,
    http: Arc<Http>,
    queue: JetStreamQueue,
) {
    // A responder that died after answering but before acknowledging: do not answer twice.
    if handoff.deliveries() > 1 && answered(&store, delivery.job_id).await {
        handoff.answer(async {}).await;
        return;
    }
    if let ReplyTarget::Interaction { application_id, .. } = &delivery.target {
        if http.application_id().map(ApplicationId::get) != Some(*application_id) {
            http.set_application_id(ApplicationId::new(*application_id));
        }
    }
    let job = queue.attach(&delivery.key, delivery.shared).await;
    handoff
        .answer(cartoon::answer(&store, &config, &delivery, job, http))
        .await;
}

/// Tells each piece of training news in its channel, then takes the next.
async fn relay_news(
    mut news: TrainingNews,
    store: Store,
    http: Arc<Http>,
    training: TrainingQueue,
) {
    while let Some(item) = news.next().await {
        match serde_json::from_slice::<PackNews>(item.payload()) {
            Ok(told) => {
                item.tell(stylepack::relay_news(&http, &store, &training, told))
                    .await
            }
            Err(e) => {
                tracing::warn!("dropping training news that does not parse: {e}");
                item.tell(async {}).await;
            }
        }
    }
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!("answering a hand-off panicked: {e}");
        }
    }
}

async fn answered(store: &Store, job_id: i64) -> bool {
    match store.job(job_id).await {
        Ok(Some(job)) => job.finished_at.is_some(),
        _ => false,
    }
}
