//! A flood: 1,000 `/cartoon` interactions from 50 users within 10 s against the fake Discord,
//! with a 20 ms test renderer. Every interaction must be answered (a result, or "queue full" /
//! "already have N photos") well within the 15-minute token lifetime, the bot's memory must
//! stay bounded, and the users must be served fairly (every one of them, about equally). The figures are printed
//! (`cargo test --test flood -- --nocapture`) and listed in `docs/hostile.md`.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::harness::Harness;
use support::memory::{own_mb, reset_peak};
use support::renderer::{photo, Trigger};

const USERS: u64 = 50;
const REQUESTS: u64 = 1_000;
const SPREAD: Duration = Duration::from_secs(10);
const RENDER: Duration = Duration::from_millis(20);
/// Discord's interaction tokens last 15 minutes.
const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// The most the bot's process (with the fake Discord and its recordings) may grow by.
const GROWTH_MB: f64 = 300.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Result,
    QueueFull,
    UserLimit,
    Error,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_from_fifty_users_are_all_answered_fairly() {
    let h = Harness::new(|c| c.progress_interval_ms = 1_000).await;
    h.renderer.set_delay(RENDER);
    let photos: Vec<Vec<u8>> = (0..REQUESTS)
        .map(|i| photo(1, Trigger::Normal, i as u32))
        .collect();
    let attachments: Vec<_> = photos
        .into_iter()
        .map(|p| h.fake.attachment("photo.png", "image/png", p, None))
        .collect();
    reset_peak();
    let before = own_mb("VmRSS:");

    let started = Instant::now();
    let mut sent: HashMap<String, (u64, Instant)> = HashMap::new();
    let gap = SPREAD / REQUESTS as u32;
    for (i, attachment) in attachments.into_iter().enumerate() {
        let user = 1 + i as u64 % USERS;
        let token = h.cartoon_with(user, attachment, None, Some("sticker"));
        sent.insert(token, (user, Instant::now()));
        tokio::time::sleep_until((started + gap * (i as u32 + 1)).into()).await;
    }
    let flood_s = started.elapsed().as_secs_f64();

    let mut answers: HashMap<String, (Answer, Duration, String)> = HashMap::new();
    let mut finals: HashMap<String, usize> = HashMap::new();
    let mut seen = 0;
    let deadline = Instant::now() + TOKEN_LIFETIME;
    // Watched for a second after the last answer, for any second answer.
    let mut all_answered: Option<Instant> = None;
    while all_answered.is_none_or(|at| at.elapsed() < Duration::from_secs(1)) {
        assert!(
            Instant::now() < deadline,
            "{} of {} answered",
            answers.len(),
            sent.len()
        );
        let new = h.fake.requests_from(seen);
        seen += new.len();
        for r in new {
            let Some(token) = r.path.split('/').find(|part| sent.contains_key(*part)) else {
                continue;
            };
            let content = r.content();
            // Refusals come at once, or as an ephemeral follow-up after the deferral.
            let answer = if content.contains("queue is full") {
                Answer::QueueFull
            } else if content.contains("already have") {
                Answer::UserLimit
            } else if r.method == "PATCH" && !r.files.is_empty() {
                Answer::Result
            } else if r.callback_type() == Some(4)
                || (r.method == "POST" && !r.path.ends_with("/callback"))
            {
                Answer::Error
            } else {
                continue;
            };
            *finals.entry(token.to_string()).or_default() += 1;
            let at = r.at.duration_since(sent[token].1);
            answers
                .entry(token.to_string())
                .or_insert((answer, at, content));
        }
        if answers.len() == sent.len() && all_answered.is_none() {
            all_answered = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total_s = all_answered.unwrap().duration_since(started).as_secs_f64();
    let peak = own_mb("VmHWM:");

    let count = |a: Answer| answers.values().filter(|(x, _, _)| *x == a).count();
    let mut results_per_user: HashMap<u64, usize> = HashMap::new();
    for (token, (answer, _, _)) in &answers {
        if *answer == Answer::Result {
            *results_per_user.entry(sent[token].0).or_default() += 1;
        }
    }
    let served: Vec<usize> = (1..=USERS)
        .map(|u| results_per_user.get(&u).copied().unwrap_or(0))
        .collect();
    let (min, max) = (*served.iter().min().unwrap(), *served.iter().max().unwrap());
    // Jain's index: 1 when every user got as many results, 1/n when one user got them all.
    let sum: f64 = served.iter().map(|&x| x as f64).sum();
    let squares: f64 = served.iter().map(|&x| (x as f64).powi(2)).sum();
    let jain = sum * sum / (USERS as f64 * squares);
    let mut waits: Vec<f64> = answers
        .values()
        .filter(|(a, _, _)| *a == Answer::Result)
        .map(|(_, d, _)| d.as_secs_f64())
        .collect();
    waits.sort_by(f64::total_cmp);
    let p = |q: f64| waits[((waits.len() - 1) as f64 * q).round() as usize];
    let slowest = answers
        .values()
        .map(|(_, d, _)| d.as_secs_f64())
        .fold(0.0, f64::max);
    println!(
        "flood: {REQUESTS} requests from {USERS} users in {flood_s:.1} s, all answered after \
         {total_s:.1} s; results {}, queue full {}, over the per-user limit {}, errors {}; \
         results per user {min}..{max} (Jain's index {jain:.3}); result latency p50 {:.2} s, p99 {:.2} s, slowest \
         answer {slowest:.2} s; RSS {before:.0} MB before, peak {peak:.0} MB",
        count(Answer::Result),
        count(Answer::QueueFull),
        count(Answer::UserLimit),
        count(Answer::Error),
        p(0.5),
        p(0.99),
    );
    assert_eq!(
        answers.len(),
        REQUESTS as usize,
        "every interaction answered"
    );
    assert_eq!(count(Answer::Error), 0);
    let duplicated = finals.values().filter(|&&n| n > 1).count();
    assert_eq!(duplicated, 0, "interactions answered twice");
    assert!(slowest < TOKEN_LIFETIME.as_secs_f64());
    assert!(peak - before < GROWTH_MB, "grew {:.0} MB", peak - before);
    // Fair: every user was served, about equally (all send at the same rate; which of them
    // find the queue full is the luck of their timing).
    assert!(min >= 1, "a user got no result");
    assert!(
        jain >= 0.85,
        "Jain's index {jain:.3}, results per user {min}..{max}"
    );
}
