//! The styles the workers render, as the workers published them: gateways load no models, yet
//! list the styles, check the names users ask for, and key jobs the way workers would.
//!
//! Each worker process writes its renderer's styles (names, descriptions, previews, weight
//! versions) to the object `catalog` of `{prefix}_styles` when it starts and whenever they
//! change (a style pack published); readers look for a new version every few seconds.
//! Workers are meant to carry the same styles: the last one to write sets the catalog.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{read_object, Broker, JetStreamConfig, StyleVersion};
use crate::jobs::{Renderer, StyleInfo};

const CATALOG: &str = "catalog";
/// How often readers look for a new catalog, and workers for changed styles.
const REFRESH: Duration = Duration::from_secs(5);
/// How often a worker writes its catalog even when unchanged: a worker that restarted with
/// other styles does not hold the catalog for long.
const REPUBLISH: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Catalog {
    styles: Vec<(StyleInfo, Option<String>)>,
}

impl Catalog {
    fn of(renderer: &dyn Renderer) -> Self {
        Self {
            styles: renderer
                .styles()
                .into_iter()
                .map(|info| {
                    let version = renderer.style_version(Some(&info.name));
                    (info, version)
                })
                .collect(),
        }
    }

    /// As [`Renderer::style_version`]: `None` asks for the default style.
    fn version(&self, style: Option<&str>) -> Option<String> {
        self.styles
            .iter()
            .find(|(info, _)| match style {
                Some(name) => info.name == name,
                None => info.is_default,
            })
            .and_then(|(_, version)| version.clone())
    }
}

/// Publishes `renderer`'s styles now, then again whenever they change, until `stop`.
pub(super) async fn publish_while_running(
    broker: &Broker,
    renderer: &dyn Renderer,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut published: Option<(Catalog, tokio::time::Instant)> = None;
    while !*stop.borrow() {
        let catalog = Catalog::of(renderer);
        let due = published
            .as_ref()
            .is_none_or(|(last, at)| *last != catalog || at.elapsed() >= REPUBLISH);
        if due {
            let bytes = serde_json::to_vec(&catalog).expect("a style catalog serialises");
            match broker.styles.put(CATALOG, &mut bytes.as_slice()).await {
                Ok(_) => published = Some((catalog, tokio::time::Instant::now())),
                Err(e) => tracing::warn!("publishing the style catalog: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = stop.changed() => {}
        }
    }
}

/// The workers' styles as last read from the broker (empty until a worker has published
/// them). Cheap to clone; reading is a snapshot, no I/O.
#[derive(Clone)]
pub struct StyleCatalog {
    current: Arc<RwLock<Catalog>>,
}

impl StyleCatalog {
    /// Reads the catalog and keeps it fresh in a background task for as long as a clone of
    /// this handle lives.
    pub async fn follow(config: &JetStreamConfig) -> anyhow::Result<Self> {
        let broker = Broker::connect(config).await?;
        let current = Arc::new(RwLock::new(Catalog::default()));
        let mut seen = refresh(&broker, &current, None).await;
        let weak = Arc::downgrade(&current);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                let Some(current) = weak.upgrade() else {
                    return;
                };
                seen = refresh(&broker, &current, seen).await;
            }
        });
        Ok(Self { current })
    }

    /// The styles, as [`Renderer::styles`].
    pub fn styles(&self) -> Vec<StyleInfo> {
        self.read()
            .styles
            .iter()
            .map(|(info, _)| info.clone())
            .collect()
    }

    /// As [`Renderer::style_version`], for [`JetStreamQueue::connect`](super::JetStreamQueue).
    pub fn style_version(&self) -> StyleVersion {
        let current = Arc::clone(&self.current);
        Arc::new(move |style| {
            current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .version(style)
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads the catalog into `current` if its object changed since `seen` (an object's nuid);
/// returns the nuid now read.
async fn refresh(
    broker: &Broker,
    current: &RwLock<Catalog>,
    seen: Option<String>,
) -> Option<String> {
    let Ok(info) = broker.styles.info(CATALOG).await else {
        return seen;
    };
    if seen.as_deref() == Some(info.nuid.as_str()) {
        return seen;
    }
    let parsed = read_object(&broker.styles, CATALOG, "style catalog")
        .await
        .and_then(|bytes| serde_json::from_slice::<Catalog>(&bytes).map_err(|e| e.to_string()));
    match parsed {
        Ok(catalog) => {
            *current.write().unwrap_or_else(|e| e.into_inner()) = catalog;
            Some(info.nuid)
        }
        Err(e) => {
            tracing::warn!("reading the style catalog: {e}");
            seen
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_looked_up_by_name_or_default() {
        let style = |name: &str, is_default: bool| StyleInfo {
            name: name.into(),
            description: String::new(),
            is_default,
            preview_png: Some(vec![1, 2]),
        };
        let catalog = Catalog {
            styles: vec![
                (style("ink", false), Some("v-ink".into())),
                (style("p2c", true), Some("v-p2c".into())),
            ],
        };
        assert_eq!(catalog.version(None).as_deref(), Some("v-p2c"));
        assert_eq!(catalog.version(Some("ink")).as_deref(), Some("v-ink"));
        assert_eq!(catalog.version(Some("gone")), None);
        let bytes = serde_json::to_vec(&catalog).unwrap();
        assert_eq!(serde_json::from_slice::<Catalog>(&bytes).unwrap(), catalog);
    }
}
