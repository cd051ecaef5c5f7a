#!/usr/bin/env python3
"""Import face-api's FaceLandmark68Net (68 iBUG landmarks) from npm @vladmandic/face-api@1.7.15.

Converts `package/model/face_landmark_68_model.bin` + `face_landmark_68_model-weights_manifest.json`
(tfjs weights, every tensor uint8-quantised: value = q * scale + min, dequantised exactly as
tfjs does: in double, then rounded to float32) to models/landmarks68.safetensors:
  dense0.conv0.{weight,bias}                      <- dense0/conv0/{filters,bias}      (OIHW)
  denseK.convJ.depthwise.weight                   <- denseK/convJ/depthwise_filter    (C,1,3,3)
  denseK.convJ.pointwise.{weight,bias}            <- denseK/convJ/{pointwise_filter,bias} (O,I,1,1)
  fc.{weight,bias}                                <- fc/{weights,bias}                (out,in)
(tfjs' separableConv2d has no depthwise bias; the block's bias follows the pointwise conv.)

With --fixture, also writes tests/fixtures/landmarks68.safetensors, all from the package's own
runtime in node (tools/import/landmarks68_reference.mjs; tfjs 4.22.0, cpu backend):
  input           u8  (2, 3, 112, 112) NCHW RGB face crops (the exact network input, pre-normalisation)
  raw             f32 (2, 136) raw network outputs for `input` (one batch of 2)
  crop            u8  (1, 3, 175, 136) NCHW RGB non-square face crop
  crop_input      f32 (1, 3, 112, 112) face-api's padded + resized tensor for `crop` (0..255)
  crop_raw        f32 (1, 136) raw outputs for `crop` (through face-api's preprocessing)
  crop_positions  f32 (1, 68, 2) face-api's landmark positions (x, y) in `crop` pixels

Run (from the repo root, in the venv that tools/import-models.sh makes): python tools/import/landmarks68.py [--fixture] [--cache DIR]
"""

import argparse
from pathlib import Path
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile

import numpy as np
from safetensors.numpy import save_file

PACKAGE = "@vladmandic/face-api"
VERSION = "1.7.15"
TFJS_VERSION = "4.22.0"  # what face-api 1.7.15 was built against (dist/tfjs.version.js)
MODEL_DIR = "package/model"
MANIFEST = "face_landmark_68_model-weights_manifest.json"
WEIGHTS = "face_landmark_68_model.bin"
SHA256 = {
    MANIFEST: "ca4886639f86e99b39fed0c155f81b63317225773bd9616716e887b0153389c9",
    WEIGHTS: "4611ef65c87d836d03d684b30eec4d195d8b219fa1dd58fc58945831c6b9299b",
}
# (photo, (top, left, size)) square face boxes, resized to 112 with PIL; and one non-square box.
SQUARE_CROPS = [("000174.jpg", (52, 56, 150)), ("000127.jpg", (56, 60, 140))]
RECT_CROP = ("000095.jpg", (50, 60, 175, 136))  # top, left, height, width

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PHOTOS = str(Path(__file__).resolve().parents[3] / "shared/data/photos/celeba")
SIZE = 112


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_model(cache: str) -> str:
    """Unpacks the verified manifest and weights into CACHE/model; returns that dir."""
    os.makedirs(cache, exist_ok=True)
    tgz = os.path.join(cache, f"vladmandic-face-api-{VERSION}.tgz")
    if not os.path.exists(tgz):
        subprocess.run(["npm", "pack", "--loglevel=error", f"{PACKAGE}@{VERSION}"], cwd=cache, check=True)
    model_dir = os.path.join(cache, "model")
    os.makedirs(model_dir, exist_ok=True)
    with tarfile.open(tgz, "r:gz") as tar:
        for name, want in SHA256.items():
            data = tar.extractfile(f"{MODEL_DIR}/{name}").read()
            if sha256(data) != want:
                raise SystemExit(f"sha256 mismatch for {name}: {sha256(data)}")
            with open(os.path.join(model_dir, name), "wb") as f:
                f.write(data)
    return model_dir


def dequantise(model_dir: str) -> dict:
    with open(os.path.join(model_dir, MANIFEST)) as f:
        manifest = json.load(f)
    out = {}
    for group in manifest:
        blob = b"".join(open(os.path.join(model_dir, p), "rb").read() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            q = spec["quantization"]
            assert spec["dtype"] == "float32" and q["dtype"] == "uint8", spec
            n = int(np.prod(spec["shape"]))
            raw = np.frombuffer(blob, dtype=np.uint8, count=n, offset=offset)
            offset += n
            values = (raw.astype(np.float64) * q["scale"] + q["min"]).astype(np.float32)
            out[spec["name"]] = values.reshape(spec["shape"])
        assert offset == len(blob), "trailing bytes in weights file"
    return out


def convert(weights: dict) -> dict:
    out = {}
    for name, w in weights.items():
        parts = name.split("/")
        scope, leaf = ".".join(parts[:-1]), parts[-1]
        if leaf == "filters":  # HWIO -> OIHW
            out[f"{scope}.weight"] = w.transpose(3, 2, 0, 1)
        elif leaf == "depthwise_filter":  # HWC1 -> C1HW
            out[f"{scope}.depthwise.weight"] = w.transpose(2, 3, 0, 1)
        elif leaf == "pointwise_filter":  # 11IO -> OI11
            out[f"{scope}.pointwise.weight"] = w.transpose(3, 2, 0, 1)
        elif leaf == "bias":
            separable = f"{'/'.join(parts[:-1])}/pointwise_filter" in weights
            out[f"{scope}.pointwise.bias" if separable else f"{scope}.bias"] = w
        elif leaf == "weights":  # dense (in, out) -> (out, in)
            out[f"{scope}.weight"] = w.T
        else:
            raise SystemExit(f"unexpected weight {name}")
    return {k: np.ascontiguousarray(v) for k, v in sorted(out.items())}


def ensure_node_runtime(cache: str) -> str:
    prefix = os.path.join(cache, "node")
    marker = os.path.join(prefix, "node_modules", "@vladmandic", "face-api", "package.json")
    if not os.path.exists(marker):
        os.makedirs(prefix, exist_ok=True)
        with open(os.path.join(prefix, "package.json"), "w") as f:
            f.write('{"name": "landmarks68-reference", "private": true}\n')
        subprocess.run(
            ["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund",
             f"{PACKAGE}@{VERSION}", f"@tensorflow/tfjs@{TFJS_VERSION}",
             f"@tensorflow/tfjs-backend-wasm@{TFJS_VERSION}"],
            cwd=prefix, check=True,
        )
    return prefix


def load_photo(name: str):
    from PIL import Image

    return Image.open(os.path.join(PHOTOS, name)).convert("RGB")


def run_reference(cache: str, model_dir: str, batches: list) -> list:
    """Runs face-api in node on batches of HWC u8 images; returns its per-batch results."""
    prefix = ensure_node_runtime(cache)
    script = os.path.join(ROOT, "tools", "import", "landmarks68_reference.mjs")
    with tempfile.TemporaryDirectory() as tmp:
        request = []
        for b, images in enumerate(batches):
            entries = []
            for i, img in enumerate(images):
                name = f"b{b}_{i}.u8"
                np.ascontiguousarray(img).tofile(os.path.join(tmp, name))
                entries.append({"file": name, "height": img.shape[0], "width": img.shape[1]})
            request.append(entries)
        req_path = os.path.join(tmp, "request.json")
        with open(req_path, "w") as f:
            json.dump({"batches": request}, f)
        out = subprocess.run(
            ["node", script, prefix, model_dir, req_path], check=True, capture_output=True, text=True
        ).stdout
    result = json.loads(out)
    print(f"reference: face-api {result['faceapi']}, tfjs {result['tfjs']}, backend {result['backend']}")
    assert result["tfjs"] == TFJS_VERSION and result["backend"] == "cpu"
    return result["batches"]


def make_fixture(cache: str, model_dir: str) -> dict:
    from PIL import Image

    faces = []
    for name, (top, left, size) in SQUARE_CROPS:
        img = load_photo(name).crop((left, top, left + size, top + size))
        faces.append(np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8))
    name, (top, left, h, w) = RECT_CROP
    crop = np.asarray(load_photo(name), dtype=np.uint8)[top : top + h, left : left + w]

    square, rect = run_reference(cache, model_dir, [faces, [crop]])
    faces = np.stack(faces)
    # A 112x112 input passes face-api's pad/resize untouched: the net saw exactly `faces`.
    seen = np.asarray(square["input"], dtype=np.float32).reshape(square["input_shape"])
    assert np.array_equal(seen, faces.astype(np.float32))
    raw = np.asarray(square["raw"], dtype=np.float32).reshape(square["raw_shape"])
    crop_input = np.asarray(rect["input"], dtype=np.float32).reshape(rect["input_shape"])
    crop_raw = np.asarray(rect["raw"], dtype=np.float32).reshape(rect["raw_shape"])
    positions = np.asarray(rect["positions"], dtype=np.float32).reshape(1, 68, 2)
    print("raw range:", raw.min(), raw.max())
    return {
        "input": np.ascontiguousarray(faces.transpose(0, 3, 1, 2)),
        "raw": raw,
        "crop": np.ascontiguousarray(crop[None].transpose(0, 3, 1, 2)),
        "crop_input": np.ascontiguousarray(crop_input.transpose(0, 3, 1, 2)),
        "crop_raw": crop_raw,
        "crop_positions": positions,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(Path.home() / ".cache/toonbot-import/landmarks68"))
    ap.add_argument("--fixture", action="store_true", help="also write the parity fixture")
    args = ap.parse_args()

    model_dir = fetch_model(args.cache)
    tensors = convert(dequantise(model_dir))
    n_params = sum(t.size for t in tensors.values())
    out = os.path.join(ROOT, "models", "landmarks68.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata={"source": f"npm {PACKAGE}@{VERSION} {MODEL_DIR}/{WEIGHTS}"})
    print(f"{out}: {len(tensors)} tensors, {n_params} parameters")
    print(f"sha256 {sha256(open(out, 'rb').read())}")

    if args.fixture:
        fixture = make_fixture(args.cache, model_dir)
        path = os.path.join(ROOT, "tests", "fixtures", "landmarks68.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(fixture, path)
        print(f"{path}: {os.path.getsize(path)} bytes, sha256 {sha256(open(path, 'rb').read())}")


if __name__ == "__main__":
    main()
