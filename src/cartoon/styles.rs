//! The style registry: a style is a directory holding a generator's weights
//! (`generator.safetensors`) and optionally `style.toml` and `preview.png`. Shipped styles
//! live under `models/styles/`, trained ones in the configured styles directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The generator's weights in a style directory (required).
pub const WEIGHTS_FILE: &str = "generator.safetensors";
/// The style's [`StyleManifest`] in a style directory (optional).
pub const MANIFEST_FILE: &str = "style.toml";
/// A small image showing the style, in a style directory (optional).
pub const PREVIEW_FILE: &str = "preview.png";

/// An installed style, as found in its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StyleInfo {
    /// The directory's name, which requests use to pick the style.
    pub name: String,
    /// From `style.toml`; empty when it has none.
    pub description: String,
    /// The style directory.
    pub dir: PathBuf,
    /// Shipped with toonbot (as opposed to trained on this host).
    pub shipped: bool,
}

impl StyleInfo {
    /// Path of the generator's weights.
    pub fn weights(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// Path of the preview image, if the style has one.
    pub fn preview(&self) -> Option<PathBuf> {
        Some(self.dir.join(PREVIEW_FILE)).filter(|p| p.is_file())
    }
}

/// Why a style could not be found; the messages are shown to users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StyleError {
    /// No style directory with weights exists yet.
    #[error(
        "no cartoon style is installed yet: train one with `toonbot train base` (or install a \
         style directory with a generator.safetensors under {dirs})"
    )]
    NoneInstalled {
        /// The directories searched, for the message.
        dirs: String,
    },
    /// No installed style has that name.
    #[error("there is no style called {name:?}; installed styles: {}", available.join(", "))]
    NotFound {
        /// The name asked for.
        name: String,
        /// The installed styles' names.
        available: Vec<String>,
    },
    /// The name is not 1-32 lowercase letters, digits, `-` or `_`.
    #[error("{0:?} is not a valid style name: use 1-32 lowercase letters, digits, '-' or '_'")]
    InvalidName(String),
}

/// `style.toml`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleManifest {
    /// One line about the style, shown in style lists.
    #[serde(default)]
    pub description: String,
    /// The style this one was fine-tuned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Training steps behind the generator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
}

/// Where styles are looked up, shipped ones first.
#[derive(Debug, Clone)]
pub struct StyleRegistry {
    shipped: PathBuf,
    trained: PathBuf,
}

/// Whether `name` is safe to use as a directory name and readable in Discord.
pub fn is_valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl StyleRegistry {
    /// Shipped styles in `shipped`, styles trained on this host in `trained`.
    pub fn new(shipped: impl Into<PathBuf>, trained: impl Into<PathBuf>) -> Self {
        Self {
            shipped: shipped.into(),
            trained: trained.into(),
        }
    }

    /// Shipped styles under `<models.dir>/styles`, trained ones under `styles.dir`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self::new(config.models.dir.join("styles"), &config.styles.dir)
    }

    /// Where trained styles are installed.
    pub fn trained_root(&self) -> &Path {
        &self.trained
    }

    /// Directory where a newly trained style called `name` is installed.
    pub fn trained_dir(&self, name: &str) -> Result<PathBuf, StyleError> {
        if !is_valid_name(name) {
            return Err(StyleError::InvalidName(name.to_string()));
        }
        Ok(self.trained.join(name))
    }

    /// Every installed style, sorted by name; a trained style never shadows a shipped one.
    pub fn list(&self) -> Vec<StyleInfo> {
        let mut styles: Vec<StyleInfo> = Vec::new();
        for (root, shipped) in [(&self.shipped, true), (&self.trained, false)] {
            for style in scan(root, shipped) {
                if !styles.iter().any(|s| s.name == style.name) {
                    styles.push(style);
                }
            }
        }
        styles.sort_by(|a, b| a.name.cmp(&b.name));
        styles
    }

    /// The style called `name`, shipped ones first; errors say what is installed.
    pub fn find(&self, name: &str) -> Result<StyleInfo, StyleError> {
        if !is_valid_name(name) {
            return Err(StyleError::InvalidName(name.to_string()));
        }
        // The style's own folder, shipped first: no listing of every style (this runs for
        // every request); the list only for the error.
        let found = [(&self.shipped, true), (&self.trained, false)]
            .into_iter()
            .find_map(|(root, shipped)| style_at(root.join(name), name.to_string(), shipped));
        if let Some(style) = found {
            return Ok(style);
        }
        let styles = self.list();
        if styles.is_empty() {
            return Err(StyleError::NoneInstalled {
                dirs: format!("{} or {}", self.shipped.display(), self.trained.display()),
            });
        }
        Err(StyleError::NotFound {
            name: name.to_string(),
            available: styles.into_iter().map(|s| s.name).collect(),
        })
    }
}

fn scan(root: &Path, shipped: bool) -> Vec<StyleInfo> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            style_at(entry.path(), name, shipped)
        })
        .collect()
}

/// The style in `dir` called `name`, when the name is valid and the folder holds weights.
fn style_at(dir: PathBuf, name: String, shipped: bool) -> Option<StyleInfo> {
    if !is_valid_name(&name) || !dir.join(WEIGHTS_FILE).is_file() {
        return None;
    }
    let manifest: StyleManifest = std::fs::read_to_string(dir.join(MANIFEST_FILE))
        .ok()
        .and_then(|text| toml::from_str(&text).ok())
        .unwrap_or_default();
    Some(StyleInfo {
        name,
        description: manifest.description,
        dir,
        shipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(root: &Path, name: &str, description: &str) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(WEIGHTS_FILE), b"weights").unwrap();
        std::fs::write(
            dir.join(MANIFEST_FILE),
            format!("description = {description:?}\n"),
        )
        .unwrap();
    }

    #[test]
    fn lists_and_finds_styles_shipped_first() {
        let tmp = tempfile::tempdir().unwrap();
        let (shipped, trained) = (tmp.path().join("shipped"), tmp.path().join("trained"));
        let registry = StyleRegistry::new(&shipped, &trained);
        assert!(matches!(
            registry.find("p2c"),
            Err(StyleError::NoneInstalled { .. })
        ));
        install(&shipped, "p2c", "photo2cartoon");
        install(&trained, "p2c", "an impostor");
        install(&trained, "anime", "anime faces");
        std::fs::create_dir_all(trained.join("empty")).unwrap();
        let names: Vec<String> = registry.list().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["anime", "p2c"]);
        let p2c = registry.find("p2c").unwrap();
        assert!(p2c.shipped);
        assert_eq!(p2c.description, "photo2cartoon");
        match registry.find("sketch") {
            Err(StyleError::NotFound { available, .. }) => assert_eq!(available, ["anime", "p2c"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn style_names_cannot_escape_their_directory() {
        let registry = StyleRegistry::new("a", "b");
        for bad in ["../etc", "", "Big", "a/b", "x".repeat(33).as_str()] {
            assert!(
                matches!(registry.find(bad), Err(StyleError::InvalidName(_))),
                "{bad}"
            );
            assert!(registry.trained_dir(bad).is_err());
        }
        assert_eq!(
            registry.trained_dir("my-style_2").unwrap(),
            PathBuf::from("b/my-style_2")
        );
    }
}
