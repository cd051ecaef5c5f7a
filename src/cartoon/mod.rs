//! The inference pipeline: photo in, per-face cartoons, stickers and avatars out.

pub mod compose;
pub mod styles;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use candle_core::Device;
use image::{RgbImage, RgbaImage};

use crate::config::Config;
use crate::face::{self, Face, FacePipeline};
use crate::imageops::{self, DecodeError};
use crate::nets::generator::{self, Generator};
use compose::ComposeOptions;
use styles::{StyleError, StyleInfo, StyleRegistry};

/// Why a photo could not be cartoonised, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum CartoonError {
    /// The photo could not be decoded or is over the size limits.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The requested style is not installed or its name is invalid.
    #[error(transparent)]
    Style(#[from] StyleError),
    /// The face detector found no face in the photo.
    #[error("no face found in the photo: use a photo where a face is clearly visible")]
    NoFace,
    /// Anything else: reading weights, a model error.
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<candle_core::Error> for CartoonError {
    fn from(e: candle_core::Error) -> Self {
        Self::Internal(e.into())
    }
}

/// One face, cartoonised and composed.
#[derive(Debug, Clone)]
pub struct CartoonFace {
    /// The detected face, its alignment and its aligned crop and mask.
    pub face: Face,
    /// The generator's output on white, 256x256.
    pub cartoon: RgbImage,
    /// The 320x320 RGBA sticker.
    pub sticker: RgbaImage,
    /// The 512x512 avatar (round with transparent corners when asked).
    pub avatar: RgbaImage,
}

/// Step 8: the generator on the faces' whitened aligned crops, as one batch; its outputs
/// `(N, 3, 256, 256)` in `[-1, 1]`, f32 on the CPU.
pub fn generate(
    generator: &Generator,
    faces: &[Face],
    device: &Device,
) -> candle_core::Result<candle_core::Tensor> {
    let aligned: Vec<RgbImage> = faces.iter().map(|f| f.aligned.clone()).collect();
    let input = generator::normalize(&imageops::rgb_batch(&aligned, device)?)?;
    generator
        .forward(&input)?
        .0
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)
}

/// The generator's outputs `(N, 3, 256, 256)` for `faces` (in order) composed: each face's
/// cartoon on white, sticker and avatar, and the photo with the faces pasted back.
fn compose_faces(
    photo: &RgbImage,
    faces: Vec<Face>,
    output: &candle_core::Tensor,
    options: ComposeOptions,
) -> candle_core::Result<(RgbImage, Vec<CartoonFace>)> {
    let mut pasted = photo.clone();
    let mut composed = Vec::with_capacity(faces.len());
    for (i, face) in faces.into_iter().enumerate() {
        let values = output.get(i)?.flatten_all()?.to_vec1::<f32>()?;
        let cartoon = compose::cartoon_on_white(&values, &face.mask);
        // The three outputs are independent: one core pastes while another draws.
        let ((), (sticker, avatar)) = rayon::join(
            || compose::paste_back(&mut pasted, &cartoon, &face.mask, &face.alignment.to_crop),
            || {
                rayon::join(
                    || compose::sticker(&cartoon, &face.mask, options.outline),
                    || compose::avatar(&cartoon, options.round_avatar),
                )
            },
        );
        composed.push(CartoonFace {
            sticker,
            avatar,
            cartoon,
            face,
        });
    }
    Ok((pasted, composed))
}

/// Every face of a photo, largest first, and the photo with the faces replaced.
#[derive(Debug, Clone)]
pub struct CartoonPhoto {
    /// Name of the style used.
    pub style: String,
    /// The faces, largest first.
    pub faces: Vec<CartoonFace>,
    /// Faces found in the photo: more than `faces` when it has over `faces.max_faces`.
    pub faces_found: usize,
    /// The photo with every face replaced by its cartoon.
    pub photo: RgbImage,
    /// Milliseconds per stage.
    pub timings: BTreeMap<&'static str, f64>,
}

/// What a weights file was when it was last hashed: a file replaced under the same path
/// (a style deleted and published again under its name) differs in one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        })
    }
}

/// The face pipeline plus the generators of the styles used so far, kept loaded.
pub struct Cartoonizer {
    faces: FacePipeline,
    registry: StyleRegistry,
    default_style: String,
    /// Per style name: the version its generator was loaded from, and the generator.
    generators: Mutex<HashMap<String, (StyleVersion, Arc<Generator>)>>,
    /// Per weights file: its stamp when hashed, and the hash.
    versions: Mutex<HashMap<PathBuf, (FileStamp, StyleVersion)>>,
    device: Device,
}

/// The hex sha256 of a style's weights: what identifies the style's output, whatever its
/// name.
pub type StyleVersion = String;

/// The generator of the style in `dir` (its `generator.safetensors`, f16 or f32).
pub fn load_generator(dir: &std::path::Path, device: &Device) -> anyhow::Result<Generator> {
    let vb = face::load_weights(dir, "generator", device)?;
    Ok(Generator::new(generator::Config::default(), vb)?)
}

impl Cartoonizer {
    /// Loads the face networks from `models.dir` and finds the styles; generators are loaded on
    /// first use.
    pub fn load(config: &Config, device: &Device) -> anyhow::Result<Self> {
        Ok(Self {
            faces: FacePipeline::load(config, device)?,
            registry: StyleRegistry::from_config(config),
            default_style: config.styles.default.clone(),
            generators: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
            device: device.clone(),
        })
    }

    /// The installed styles, sorted by name.
    pub fn styles(&self) -> Vec<StyleInfo> {
        self.registry.list()
    }

    /// The face pipeline (detection, landmarks, alignment, segmentation).
    pub fn faces(&self) -> &FacePipeline {
        &self.faces
    }

    /// Where the styles are looked up.
    pub fn registry(&self) -> &StyleRegistry {
        &self.registry
    }

    /// The named style's generator (or the default style's), loaded once per version of its
    /// weights.
    pub fn generator(
        &self,
        style: Option<&str>,
    ) -> Result<(StyleInfo, Arc<Generator>), CartoonError> {
        let (info, version) = self.resolve(style)?;
        let mut loaded = self.generators.lock().expect("generator cache lock");
        if let Some((_, g)) = loaded.get(&info.name).filter(|(v, _)| *v == version) {
            return Ok((info, g.clone()));
        }
        let g = Arc::new(load_generator(&info.dir, &self.device).with_context(|| {
            format!("loading style {:?} from {}", info.name, info.dir.display())
        })?);
        loaded.insert(info.name.clone(), (version, g.clone()));
        Ok((info, g))
    }

    /// The version of the weights the named style (or the default style) resolves to now.
    /// The weights are hashed again only when their file changed.
    pub fn style_version(&self, style: Option<&str>) -> Result<StyleVersion, CartoonError> {
        Ok(self.resolve(style)?.1)
    }

    fn resolve(&self, style: Option<&str>) -> Result<(StyleInfo, StyleVersion), CartoonError> {
        let info = self.registry.find(style.unwrap_or(&self.default_style))?;
        let path = info.weights();
        let read = |e: std::io::Error| {
            CartoonError::Internal(anyhow::Error::new(e).context(format!(
                "reading style {:?}'s weights {}",
                info.name,
                path.display()
            )))
        };
        let stamp = FileStamp::of(&path).map_err(read)?;
        let mut versions = self.versions.lock().expect("style versions lock");
        if let Some((_, version)) = versions.get(&path).filter(|(s, _)| *s == stamp) {
            return Ok((info, version.clone()));
        }
        let version = crate::sha256_hex(&std::fs::read(&path).map_err(read)?);
        versions.insert(path, (stamp, version.clone()));
        Ok((info, version))
    }

    /// Decodes photo bytes with the configured limits and cartoonises them.
    pub fn cartoonize_bytes(
        &self,
        bytes: &[u8],
        limits: &crate::config::Limits,
        style: Option<&str>,
        options: ComposeOptions,
    ) -> Result<CartoonPhoto, CartoonError> {
        let started = Instant::now();
        let photo = imageops::decode_photo(bytes, limits)?;
        let decode_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut result = self.cartoonize(&photo, style, options)?;
        result.timings.insert("decode", decode_ms);
        Ok(result)
    }

    /// Every face of the photo through the style's generator (one batch), then composed.
    pub fn cartoonize(
        &self,
        photo: &RgbImage,
        style: Option<&str>,
        options: ComposeOptions,
    ) -> Result<CartoonPhoto, CartoonError> {
        let (info, generator) = self.generator(style)?;
        self.cartoonize_with(info.name, &generator, photo, options)
    }

    /// [`Cartoonizer::cartoonize`] with a given generator, reported as style `style`.
    pub fn cartoonize_with(
        &self,
        style: String,
        generator: &Generator,
        photo: &RgbImage,
        options: ComposeOptions,
    ) -> Result<CartoonPhoto, CartoonError> {
        let found = self.faces.find_faces(photo)?;
        let faces_found = found.faces_found;
        if found.faces.is_empty() {
            return Err(CartoonError::NoFace);
        }
        let mut timings = found.timings.as_map();
        let started = Instant::now();
        let output = generate(generator, &found.faces, &self.device)?;
        timings.insert("generator", started.elapsed().as_secs_f64() * 1e3);

        let started = Instant::now();
        let (pasted, faces) = compose_faces(photo, found.faces, &output, options)?;
        timings.insert("compose", started.elapsed().as_secs_f64() * 1e3);
        Ok(CartoonPhoto {
            style,
            faces,
            faces_found,
            photo: pasted,
            timings,
        })
    }
}
