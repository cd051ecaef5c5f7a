//! The render queue: bounds, fairness, positions, cache, failures, cancellation, and a burst.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::renderer::{photo, TestRenderer, Trigger};
use toonbot::jobs::{
    JobHandle, JobQueue, JobStatus, OutputKind, QueueConfig, RenderError, RenderRequest,
    SubmitError,
};

const T: Duration = Duration::from_secs(10);

fn request(tag: u32) -> RenderRequest {
    RenderRequest {
        image: photo(1, Trigger::Normal, tag),
        style: None,
        output: OutputKind::Sticker,
        outline: true,
        round_avatar: false,
    }
}

fn queue(renderer: &Arc<TestRenderer>, config: QueueConfig) -> JobQueue {
    JobQueue::new(Arc::clone(renderer) as Arc<_>, config)
}

fn config(capacity: usize, per_user: usize, workers: usize) -> QueueConfig {
    QueueConfig {
        capacity,
        per_user_limit: per_user,
        workers,
        cache_entries: 16,
    }
}

/// Waits (bounded) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn position(h: &JobHandle) -> Option<usize> {
    match h.status() {
        JobStatus::Queued { position, .. } => Some(position),
        _ => None,
    }
}

async fn done(h: JobHandle) -> toonbot::jobs::JobOutcome {
    tokio::time::timeout(T, h.wait())
        .await
        .expect("job finished in time")
        .expect("job not cancelled")
}

#[tokio::test]
async fn one_users_burst_does_not_starve_another_user() {
    let r = Arc::new(TestRenderer::new());
    r.close_gate();
    let q = queue(&r, config(100, 20, 1));
    let a: Vec<_> = (0..20)
        .map(|i| q.submit(1, request(100 + i)).unwrap())
        .collect();
    until("the first job to start", || r.active() == 1).await;
    let b = q.submit(2, request(200)).unwrap();
    // A's first job is running; B has not been served yet, so B goes next.
    assert_eq!(position(&b), Some(1));
    assert_eq!(position(&a[1]), Some(2));
    assert_eq!(position(&a[19]), Some(20));
    r.open_gate();
    for h in a {
        done(h).await;
    }
    done(b).await;
    let order: Vec<u32> = r.log().iter().map(|c| c.tag.unwrap()).collect();
    assert_eq!(order[0], 100);
    assert_eq!(order[1], 200, "user 2's photo ran second: {order:?}");
}

#[tokio::test]
async fn users_are_served_round_robin() {
    let r = Arc::new(TestRenderer::new());
    r.close_gate();
    let q = queue(&r, config(100, 10, 1));
    let mut handles = Vec::new();
    // User 1 submits first (its first job starts at once), then users 2 and 3.
    for user in 1..=3u64 {
        for i in 0..4 {
            handles.push(q.submit(user, request(user as u32 * 100 + i)).unwrap());
        }
    }
    r.open_gate();
    for h in handles {
        done(h).await;
    }
    let users: Vec<u32> = r.log().iter().map(|c| c.tag.unwrap() / 100).collect();
    assert_eq!(users, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]);
}

#[tokio::test]
async fn queue_is_bounded_per_user_and_overall() {
    let r = Arc::new(TestRenderer::new());
    r.close_gate();
    let q = queue(&r, config(2, 2, 1));
    let a1 = q.submit(1, request(1)).unwrap();
    until("the first job to start", || r.active() == 1).await;
    let a2 = q.submit(1, request(2)).unwrap();
    assert_eq!(
        q.submit(1, request(3)).err(),
        Some(SubmitError::UserLimit { limit: 2 })
    );
    assert_eq!(
        q.check_admission(1),
        Err(SubmitError::UserLimit { limit: 2 })
    );
    let b1 = q.submit(2, request(4)).unwrap();
    // Two waiting (a2, b1), one running: full.
    assert_eq!(
        q.submit(3, request(5)).err(),
        Some(SubmitError::QueueFull { capacity: 2 })
    );
    assert_eq!(q.stats().waiting, 2);
    r.open_gate();
    for h in [a1, a2, b1] {
        assert!(done(h).await.result.is_ok());
    }
    // Room again.
    done(q.submit(3, request(5)).unwrap()).await;
    assert_eq!(q.stats().renders, 4);
}

#[tokio::test]
async fn positions_count_down_while_waiting() {
    let r = Arc::new(TestRenderer::new());
    r.set_delay(Duration::from_millis(20));
    let q = queue(&r, config(10, 10, 1));
    let handles: Vec<_> = (0..4).map(|i| q.submit(1, request(i)).unwrap()).collect();
    let mut last = handles.into_iter().last().unwrap();
    let mut seen = Vec::new();
    loop {
        match last.status() {
            JobStatus::Queued { position, .. } => seen.push(position),
            JobStatus::Done(_) => break,
            _ => {}
        }
        if tokio::time::timeout(T, last.changed())
            .await
            .unwrap()
            .is_none()
        {
            break;
        }
    }
    seen.dedup();
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "positions only go down: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&1));
}

#[tokio::test]
async fn identical_requests_are_rendered_once() {
    let r = Arc::new(TestRenderer::new());
    r.close_gate();
    let q = queue(&r, config(10, 10, 1));
    let first = q.submit(1, request(7)).unwrap();
    // Same request while the first is queued or running: shares its render.
    let twin = q.submit(2, request(7)).unwrap();
    assert!(twin.is_shared());
    r.open_gate();
    let a = done(first).await;
    let b = done(twin).await;
    assert!(!a.cached && b.cached);
    assert_eq!(
        a.result.as_ref().unwrap().files,
        b.result.as_ref().unwrap().files
    );
    // Later: served from the cache.
    let again = done(q.submit(3, request(7)).unwrap()).await;
    assert!(again.cached);
    assert_eq!(r.calls(), 1);
    // Different options: a new render.
    let other = RenderRequest {
        output: OutputKind::Both,
        ..request(7)
    };
    assert!(!done(q.submit(3, other).unwrap()).await.cached);
    assert_eq!(r.calls(), 2);
    let s = q.stats();
    assert_eq!((s.renders, s.cache_hits, s.coalesced), (2, 1, 1));
}

#[tokio::test]
async fn failing_jobs_do_not_block_the_queue() {
    let r = Arc::new(TestRenderer::new());
    let q = queue(&r, config(10, 10, 1));
    let bad = |trigger, faces| RenderRequest {
        image: photo(faces, trigger, 1),
        ..request(0)
    };
    let panics = q.submit(1, bad(Trigger::Panic, 1)).unwrap();
    let internal = q.submit(1, bad(Trigger::Internal, 1)).unwrap();
    let no_face = q.submit(1, bad(Trigger::Normal, 0)).unwrap();
    let good = q.submit(2, request(2)).unwrap();
    assert!(
        matches!(done(panics).await.result, Err(RenderError::Internal(m)) if m.contains("panicked"))
    );
    assert!(matches!(
        done(internal).await.result,
        Err(RenderError::Internal(_))
    ));
    assert_eq!(done(no_face).await.result.unwrap_err(), RenderError::NoFace);
    assert!(done(good).await.result.is_ok());
    let not_image = RenderRequest {
        image: b"GIF89a not really".to_vec(),
        ..request(0)
    };
    assert_eq!(
        done(q.submit(3, not_image).unwrap())
            .await
            .result
            .unwrap_err(),
        RenderError::NotAnImage
    );
    assert_eq!(q.stats().failed, 4);
    // Failed results are not cached: the same request renders again.
    let again = q.submit(1, bad(Trigger::Normal, 0)).unwrap();
    assert!(!again.is_shared());
    done(again).await;
}

#[tokio::test]
async fn renders_run_on_worker_threads() {
    let r = Arc::new(TestRenderer::new());
    let q = queue(&r, config(10, 10, 2));
    done(q.submit(1, request(1)).unwrap()).await;
    assert!(r.log()[0].thread.starts_with("toonbot-render-"));
}

#[tokio::test]
async fn waiting_jobs_can_be_cancelled_and_shutdown_drops_the_rest() {
    let r = Arc::new(TestRenderer::new());
    r.close_gate();
    let q = queue(&r, config(10, 10, 1));
    let running = q.submit(1, request(1)).unwrap();
    until("the first job to start", || r.active() == 1).await;
    let second = q.submit(1, request(2)).unwrap();
    let third = q.submit(1, request(3)).unwrap();
    assert_eq!(position(&third), Some(2));
    assert!(second.cancel().await);
    assert!(!running.cancel().await, "a running job cannot be cancelled");
    assert_eq!(position(&third), Some(1));
    assert!(tokio::time::timeout(T, second.wait())
        .await
        .unwrap()
        .is_none());
    q.shutdown();
    assert!(tokio::time::timeout(T, third.wait())
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        q.submit(2, request(9)).err(),
        Some(SubmitError::ShuttingDown)
    );
    r.open_gate();
    assert!(
        done(running).await.result.is_ok(),
        "the running job still finishes"
    );
}

/// 200 jobs from 10 users at once: everything finishes, and service stays fair all along.
/// Prints throughput and waits (not asserted: timings depend on the machine).
#[tokio::test]
async fn burst_of_200_jobs_from_10_users() {
    let r = Arc::new(TestRenderer::new());
    r.set_delay(Duration::from_millis(2));
    let workers = 2;
    let q = queue(
        &r,
        QueueConfig {
            capacity: 200,
            per_user_limit: 20,
            workers,
            cache_entries: 64,
        },
    );
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..20u32 {
        for user in 0..10u32 {
            handles.push((
                user,
                q.submit(u64::from(user), request(user * 1000 + i)).unwrap(),
            ));
        }
    }
    let mut waits = Vec::new();
    let mut by_user: HashMap<u32, Vec<f64>> = HashMap::new();
    for (user, h) in handles {
        let o = done(h).await;
        assert!(o.result.is_ok());
        waits.push(o.wait_ms);
        by_user.entry(user).or_default().push(o.wait_ms);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let order: Vec<u32> = r.log().iter().map(|c| c.tag.unwrap() / 1000).collect();
    assert_eq!(order.len(), 200);
    // Fairness: after every 10k renders each user has had at least k - 1 (two workers
    // may take jobs slightly out of order).
    for k in 1..=20 {
        let mut counts = [0usize; 10];
        for &u in &order[..10 * k] {
            counts[u as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| c + 1 >= k),
            "after {} renders: {counts:?}",
            10 * k
        );
    }
    waits.sort_by(f64::total_cmp);
    let last: Vec<f64> = by_user
        .values()
        .map(|w| w.iter().cloned().fold(0.0, f64::max))
        .collect();
    let spread =
        last.iter().cloned().fold(0.0, f64::max) - last.iter().cloned().fold(f64::MAX, f64::min);
    let busy: f64 = r
        .log()
        .iter()
        .map(|c| (c.finished - c.started).as_secs_f64())
        .sum();
    println!(
        "burst: 200 jobs, 10 users, {workers} workers, 2 ms renders: {:.0} jobs/s \
         (renderer busy {:.0}% of worker time), wait p50 {:.0} ms, max {:.0} ms; the users' \
         last jobs started within {:.0} ms of each other",
        200.0 / elapsed,
        100.0 * busy / (workers as f64 * elapsed),
        waits[100],
        waits[199],
        spread
    );
}
