//! The store against real databases: every test below runs on a SQLite file and on a fresh
//! PostgreSQL database (`tests/common/postgres.rs`: `TOONBOT_TEST_POSTGRES_URL`, else a
//! throwaway local cluster; skipped, with a `SKIPPED` line, where there is neither).

mod common;

use common::postgres::{self, TestDatabase};
use toonbot::store::{
    Backend, Database, GuildSettings, JobEnd, JobSource, NewGuildStyle, NewJob, NewRun, Preset,
    ReplyRef, RunFinish, RunProgressRecord, RunStatus, Store, StyleEval, StyleStatus,
};

fn job(user: u64, reply: Option<ReplyRef>) -> NewJob {
    NewJob {
        user_id: user,
        guild_id: Some(u64::MAX - 1),
        channel_id: 42,
        source: JobSource::Slash,
        image_sha256: Some("ab".repeat(32)),
        style: None,
        output: "both".into(),
        reply,
    }
}

/// One test's database: a file in a new folder, or a new PostgreSQL database.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

impl Db {
    /// `None` (with a message) for PostgreSQL where there is none.
    async fn new(backend: Backend, test: &str) -> Option<Self> {
        match backend {
            Backend::Sqlite => Some(Self::Sqlite(tempfile::tempdir().unwrap())),
            Backend::Postgres => postgres::database(test).await.map(Self::Postgres),
        }
    }

    fn location(&self) -> Database {
        match self {
            Self::Sqlite(dir) => Database::Sqlite(dir.path().join("db.sqlite")),
            Self::Postgres(db) => Database::Postgres(db.url().to_string()),
        }
    }

    /// Opens (again) the store on this database.
    async fn open(&self) -> Store {
        Store::connect(&self.location()).await.unwrap()
    }
}

/// A `sqlite` and a `postgres` test for each `async fn(Db)` named.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                let db = Db::new(Backend::Sqlite, "").await.unwrap();
                super::$test(db).await;
            }

            #[tokio::test]
            async fn postgres() {
                if let Some(db) =
                    Db::new(Backend::Postgres, concat!(stringify!($test), "::postgres")).await
                {
                    super::$test(db).await;
                }
            }
        }
    )*};
}

on_both_backends!(
    opens_and_migrates_once,
    presets_survive_reopening,
    guild_settings_default_and_are_audited,
    jobs_record_their_lifecycle,
    unfinished_jobs_are_marked_interrupted_on_restart,
    style_packs_record_runs_and_deleting_one_forgets_it_everywhere,
    recent_stickers_are_replaced_expire_and_are_capped_per_user,
);

#[tokio::test]
async fn sqlite_opens_in_wal_mode_and_migrates_once() {
    let dir = tempfile::tempdir().unwrap();
    // A folder to create, and a name the driver's URL must escape.
    let path = dir.path().join("sub dir/toon%bot #1?.sqlite");
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.journal_mode().await.unwrap(), "wal");
    store.close().await;
    // Opening again re-applies nothing and keeps working.
    let store = Store::open(&path).await.unwrap();
    assert!(store.preset(1).await.unwrap().is_none());
    assert!(path.exists());
}

async fn opens_and_migrates_once(db: Db) {
    let store = db.open().await;
    let backend = store.backend();
    assert_eq!(backend == Backend::Sqlite, matches!(db, Db::Sqlite(_)));
    assert_eq!(
        store.journal_mode().await.is_ok(),
        backend == Backend::Sqlite
    );
    store
        .set_preset(
            1,
            &Preset {
                style: None,
                output: "photo".into(),
                outline: true,
                round_avatar: false,
            },
        )
        .await
        .unwrap();
    store.close().await;
    // Opening again re-applies nothing and keeps the rows.
    let store = db.open().await;
    assert_eq!(store.preset(1).await.unwrap().unwrap().output, "photo");
}

#[test]
fn database_setting_is_a_path_or_a_url() {
    assert_eq!(
        Database::parse("data/toonbot.sqlite"),
        Database::Sqlite("data/toonbot.sqlite".into())
    );
    for url in ["postgres://bot@db/toonbot", "postgresql://db:5433/toonbot"] {
        assert_eq!(Database::parse(url), Database::Postgres(url.into()));
    }
    assert_eq!(
        Database::parse("postgres://bot:hunter2@db:5432/toonbot?sslmode=require").to_string(),
        "postgres://bot:***@db:5432/toonbot?sslmode=require"
    );
    assert_eq!(
        postgres::with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t1"),
        "postgres://u:p@h:5432/t1?sslmode=disable"
    );
    assert_eq!(
        postgres::with_database("postgresql://h", "t2"),
        "postgresql://h/t2"
    );
}

async fn presets_survive_reopening(db: Db) {
    // Snowflakes above i64::MAX round-trip.
    let user = u64::MAX - 5;
    let preset = Preset {
        style: Some("ink".into()),
        output: "sticker".into(),
        outline: false,
        round_avatar: true,
    };
    {
        let store = db.open().await;
        store.set_preset(user, &preset).await.unwrap();
        let changed = Preset {
            output: "avatar".into(),
            ..preset.clone()
        };
        store.set_preset(7, &changed).await.unwrap();
        store.close().await;
    }
    let store = db.open().await;
    assert_eq!(store.preset(user).await.unwrap(), Some(preset));
    assert_eq!(store.preset(7).await.unwrap().unwrap().output, "avatar");
    assert!(store.reset_preset(user).await.unwrap());
    assert!(!store.reset_preset(user).await.unwrap());
    assert_eq!(store.preset(user).await.unwrap(), None);
}

async fn guild_settings_default_and_are_audited(db: Db) {
    let store = db.open().await;
    assert_eq!(
        store.guild_settings(9).await.unwrap(),
        GuildSettings::default()
    );
    let settings = GuildSettings {
        default_style: Some("ink".into()),
        stickers_enabled: false,
    };
    store.set_guild_settings(9, &settings, 77).await.unwrap();
    assert_eq!(store.guild_settings(9).await.unwrap(), settings);
    let log = store.audit_log(9).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].0, log[0].1.as_str()), (77, "guild_settings"));
    assert!(log[0].2.contains("stickers_enabled=false"));
}

async fn jobs_record_their_lifecycle(db: Db) {
    let store = db.open().await;
    let reply = ReplyRef::Interaction {
        application_id: 100,
        token: "tok".into(),
    };
    let id = store
        .insert_job(&job(5, Some(reply.clone())))
        .await
        .unwrap();
    let row = store.job(id).await.unwrap().unwrap();
    assert_eq!(
        (row.status.as_str(), row.reply.clone()),
        ("queued", Some(reply))
    );
    assert_eq!(row.guild_id, Some(u64::MAX - 1));
    store.job_started(id).await.unwrap();
    assert_eq!(store.job(id).await.unwrap().unwrap().status, "running");
    let end = JobEnd {
        status: "done".into(),
        faces: Some(2),
        queue_ms: Some(1.5),
        render_ms: Some(20.0),
        total_ms: Some(30.0),
        style: Some("classic".into()),
        ..JobEnd::default()
    };
    store.finish_job(id, &end).await.unwrap();
    let row = store.job(id).await.unwrap().unwrap();
    assert_eq!(row.status, "done");
    assert_eq!(row.faces, Some(2));
    assert_eq!(row.style.as_deref(), Some("classic"));
    assert_eq!(row.render_ms, Some(20.0));
    assert!(row.started_at.is_some() && row.finished_at.is_some());
    assert_eq!(
        row.reply, None,
        "the reply token is forgotten once the job ends"
    );
    assert_eq!(store.recent_jobs(5, 10).await.unwrap().len(), 1);
}

async fn unfinished_jobs_are_marked_interrupted_on_restart(db: Db) {
    let (queued, running, finished);
    {
        let store = db.open().await;
        queued = store
            .insert_job(&job(1, Some(ReplyRef::Message { message_id: 55 })))
            .await
            .unwrap();
        running = store
            .insert_job(&job(
                2,
                Some(ReplyRef::Interaction {
                    application_id: 100,
                    token: "t".into(),
                }),
            ))
            .await
            .unwrap();
        store.job_started(running).await.unwrap();
        finished = store.insert_job(&job(3, None)).await.unwrap();
        store
            .finish_job(
                finished,
                &JobEnd {
                    status: "failed".into(),
                    error: Some("no_face".into()),
                    ..JobEnd::default()
                },
            )
            .await
            .unwrap();
        // No close: as if the process died.
    }
    let store = db.open().await;
    let lost = store.interrupt_unfinished().await.unwrap();
    assert_eq!(
        lost.iter().map(|j| j.id).collect::<Vec<_>>(),
        [queued, running]
    );
    assert_eq!(lost[0].reply, Some(ReplyRef::Message { message_id: 55 }));
    assert_eq!(lost[1].status, "running");
    for id in [queued, running] {
        let row = store.job(id).await.unwrap().unwrap();
        assert_eq!(
            (row.status.as_str(), row.error.as_deref(), row.reply),
            ("interrupted", Some("restart"), None)
        );
    }
    assert_eq!(store.job(finished).await.unwrap().unwrap().status, "failed");
    assert!(store.interrupt_unfinished().await.unwrap().is_empty());
}

async fn style_packs_record_runs_and_deleting_one_forgets_it_everywhere(db: Db) {
    let store = db.open().await;
    let guild = u64::MAX - 3;
    let style = NewGuildStyle {
        name: "anime".into(),
        guild_id: guild,
        base: "classic".into(),
        images: 9,
        held_out: 1,
        created_by: 77,
    };
    let run = NewRun {
        user_id: 77,
        channel_id: 400,
        total_steps: 100,
    };
    let run_id = store.create_guild_style(&style, &run).await.unwrap();
    store.set_run_message(run_id, u64::MAX - 9).await.unwrap();
    store.record_prepared("anime", 4).await.unwrap();
    let progress = RunProgressRecord {
        step: 40,
        losses: vec![("g_adv".into(), 0.75), ("cycle".into(), 0.25)],
        images_per_sec: Some(3.5),
        train_ms: 1200.0,
    };
    store.record_run_progress(run_id, &progress).await.unwrap();
    let unfinished = store.unfinished_runs().await.unwrap();
    assert_eq!(unfinished.len(), 1);
    assert_eq!(
        (
            unfinished[0].message_id,
            unfinished[0].step,
            &unfinished[0].losses
        ),
        (Some(u64::MAX - 9), 40, &progress.losses)
    );

    let eval = StyleEval {
        kid_x100_mean: 3.5,
        kid_x100_std: 0.25,
        identity_cosine: 0.75,
    };
    let end = RunFinish {
        status: RunStatus::Done,
        error: None,
        progress: RunProgressRecord {
            step: 100,
            ..progress
        },
        eval_ms: Some(50.0),
        style_status: StyleStatus::Draft,
        eval: Some(eval),
        eval_error: None,
    };
    store.finish_run(run_id, "anime", &end).await.unwrap();
    assert!(store.unfinished_runs().await.unwrap().is_empty());
    let row = store.guild_style("anime").await.unwrap().unwrap();
    assert_eq!(
        (row.guild_id, row.status, row.faces_found, row.eval),
        (guild, StyleStatus::Draft, Some(4), Some(eval))
    );
    let run = store.latest_run("anime").await.unwrap().unwrap();
    assert_eq!(
        (run.status, run.step, run.eval_ms),
        (RunStatus::Done, 100, Some(50.0))
    );
    assert!(run.finished_at.is_some());

    store.publish_guild_style("anime", guild, 78).await.unwrap();
    assert_eq!(
        store.published_guild_styles().await.unwrap()[0].name,
        "anime"
    );
    let settings = GuildSettings {
        default_style: Some("anime".into()),
        stickers_enabled: true,
    };
    store
        .set_guild_settings(guild, &settings, 78)
        .await
        .unwrap();
    store.delete_guild_style("anime", guild, 78).await.unwrap();
    assert!(store.guild_styles(guild).await.unwrap().is_empty());
    assert!(
        store.latest_run("anime").await.unwrap().is_none(),
        "runs go too"
    );
    assert_eq!(
        store.guild_settings(guild).await.unwrap().default_style,
        None
    );
    let actions: Vec<(u64, String)> = store
        .audit_log(guild)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .map(|(user, action, _, _)| (user, action))
        .collect();
    assert_eq!(
        actions,
        [
            (77, "stylepack_upload".to_string()),
            (78, "stylepack_publish".to_string()),
            (78, "guild_settings".to_string()),
            (78, "stylepack_delete".to_string()),
        ]
    );
}

async fn recent_stickers_are_replaced_expire_and_are_capped_per_user(db: Db) {
    use std::time::Duration;
    let store = db.open().await;
    let ttl = Duration::from_secs(1800);
    let guild = u64::MAX - 7;
    let (a, b, c) = (u64::MAX - 1, 2, 3);
    let stickers = vec![vec![1u8, 2, 3], vec![4u8; 100_000]];
    assert!(store
        .recent_stickers(a, guild, ttl)
        .await
        .unwrap()
        .is_empty());
    store
        .remember_stickers(a, guild, &stickers, ttl, 2)
        .await
        .unwrap();
    store.close().await;

    // Kept across a reopening, for the guild it was made in only, face 1 first.
    let store = db.open().await;
    assert_eq!(
        store.recent_stickers(a, guild, ttl).await.unwrap(),
        stickers
    );
    assert!(store.recent_stickers(a, 1, ttl).await.unwrap().is_empty());

    // A newer result replaces the older one.
    store
        .remember_stickers(a, guild, &stickers[1..], ttl, 2)
        .await
        .unwrap();
    assert_eq!(
        store.recent_stickers(a, guild, ttl).await.unwrap(),
        &stickers[1..]
    );

    // Past the time to live they are gone.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let short = Duration::from_millis(10);
    assert!(store
        .recent_stickers(a, guild, short)
        .await
        .unwrap()
        .is_empty());

    // Beyond the user cap the user with the oldest result is dropped.
    store
        .remember_stickers(b, guild, &stickers, ttl, 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .remember_stickers(c, guild, &stickers, ttl, 2)
        .await
        .unwrap();
    assert!(store
        .recent_stickers(a, guild, ttl)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.recent_stickers(b, guild, ttl).await.unwrap(),
        stickers
    );
    assert_eq!(
        store.recent_stickers(c, guild, ttl).await.unwrap(),
        stickers
    );
}

/// Two gateway processes on one PostgreSQL database: each sees what the other writes, at once.
#[tokio::test]
async fn two_stores_on_one_postgres_database_share_their_state() {
    let test = "two_stores_on_one_postgres_database_share_their_state";
    let Some(pg) = postgres::database(test).await else {
        return;
    };
    let location = Database::Postgres(pg.url().to_string());
    // Both start at once: the migrations run once, under PostgreSQL's advisory lock.
    let (a, b) = tokio::join!(Store::connect(&location), Store::connect(&location));
    let (a, b) = (a.unwrap(), b.unwrap());
    let guild = u64::MAX - 11;

    // A user's preset saved through one is the other's, and so is its reset.
    let preset = Preset {
        style: Some("ink".into()),
        output: "avatar".into(),
        outline: true,
        round_avatar: true,
    };
    a.set_preset(u64::MAX, &preset).await.unwrap();
    assert_eq!(b.preset(u64::MAX).await.unwrap(), Some(preset));
    assert!(b.reset_preset(u64::MAX).await.unwrap());
    assert_eq!(a.preset(u64::MAX).await.unwrap(), None);

    // Guild settings changed on one apply on the other.
    let settings = GuildSettings {
        default_style: Some("classic".into()),
        stickers_enabled: false,
    };
    b.set_guild_settings(guild, &settings, 70).await.unwrap();
    assert_eq!(a.guild_settings(guild).await.unwrap(), settings);

    // A pack uploaded through one, published through the other, is published for both.
    let style = NewGuildStyle {
        name: "shared".into(),
        guild_id: guild,
        base: "classic".into(),
        images: 10,
        held_out: 2,
        created_by: 71,
    };
    let run = NewRun {
        user_id: 71,
        channel_id: 9,
        total_steps: 6,
    };
    let run_id = a.create_guild_style(&style, &run).await.unwrap();
    assert_eq!(b.unfinished_runs().await.unwrap()[0].id, run_id);
    b.publish_guild_style("shared", guild, 72).await.unwrap();
    for store in [&a, &b] {
        let published = store.published_guild_styles().await.unwrap();
        assert_eq!(
            published
                .iter()
                .map(|s| (s.name.as_str(), s.status))
                .collect::<Vec<_>>(),
            [("shared", StyleStatus::Published)]
        );
    }

    // One audit log, newest first, whichever process wrote each entry.
    for store in [&a, &b] {
        let log: Vec<(u64, String)> = store
            .audit_log(guild)
            .await
            .unwrap()
            .into_iter()
            .map(|(user, action, _, _)| (user, action))
            .collect();
        assert_eq!(
            log,
            [
                (72, "stylepack_publish".to_string()),
                (71, "stylepack_upload".to_string()),
                (70, "guild_settings".to_string()),
            ]
        );
    }

    // Ids of rows inserted by both at once never collide.
    let (one, two) = (job(1, None), job(2, None));
    let (x, y) = tokio::join!(a.insert_job(&one), b.insert_job(&two));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_ne!(x, y);
    assert_eq!(b.job(x).await.unwrap().unwrap().user_id, 1);
    assert_eq!(a.job(y).await.unwrap().unwrap().user_id, 2);

    // The same user's stickers remembered through both at once: no error, one result kept.
    let ttl = std::time::Duration::from_secs(1800);
    let (one, two) = (vec![vec![1u8; 10]; 2], vec![vec![2u8; 10]; 2]);
    for _ in 0..20 {
        let (x, y) = tokio::join!(
            a.remember_stickers(5, guild, &one, ttl, 10),
            b.remember_stickers(5, guild, &two, ttl, 10)
        );
        x.unwrap();
        y.unwrap();
        let kept = a.recent_stickers(5, guild, ttl).await.unwrap();
        assert!(kept == one || kept == two, "{kept:?}");
    }
    a.close().await;
    b.close().await;
}
