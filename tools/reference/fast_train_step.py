#!/usr/bin/env python3
"""Times the fast recipe's adversarial training step in PyTorch (the reference for
`toonbot bench --train --recipe fast`, src/train/bench.rs and src/train/fast/step.rs), on
CPU (default, f32, 2 threads) or CUDA.

The step, as FastStep::adversarial runs it with the bench's settings (FastSpec::new, batch
4 by default, ADA p = 0.5):
  - generator A->B (photo2cartoon's light ResnetGenerator, ngf 32) on the photos, once;
  - the cartoons edge-smoothed (CartoonGAN: Sobel edges of the luminance dilated by 2, a
    5x5 Gaussian there), as the bench computes them inside its timed step;
  - DiffAugment (brightness, saturation, contrast, translation, cutout; each with
    probability p per sample, draws from toonbot's SplitMix64 streams, so the same
    transforms as the candle step) of the real cartoons, the detached translations and the
    smoothed cartoons;
  - discriminator update: the projected discriminator (frozen EfficientNet-Lite0, batch
    norms folded, TF SAME padding, ReLU6, taps at blocks 2, 4, 10, 15; fixed random 1x1
    mixing to 64-512 channels; spectral-norm heads, one power iteration a forward) on the
    real and the fake images, hinge loss; photo2cartoon's local discriminator (n_layers 5)
    on real, fake and smoothed, LSGAN on logits and CAM logits; one backward, Adam;
    ADA's controller fed sign(D(real));
  - generator update on the augmented translation: -mean(projected logits) and LSGAN
    against the local discriminator (times the adversarial ramp), face-ID 1 - cos through
    the frozen MobileFaceNet (real and fake embedded as one batch, the real half detached),
    L1 of the 8x8-block luminance (x10) and colour (x0, computed as the Rust step does),
    L1 of the backbone's first feature (x0.1; gradients only to the input), CAM BCE x1000;
    one backward; every 4th step also the identity term (the generator on the cartoons, L1
    x10 and CAM BCE towards 0 x1000) with a second backward; Adam (lr 1e-4, betas (0.5,
    0.999), no weight decay) on both; rho / w clipped.
Each timed run is one whole identity cycle (4 steps) after one warm-up step, the time per
step being the run's time over 4, as the bench times the candle step; the median over the
runs is printed.

Networks: generator and local discriminator from p2c_reference.py, the face embedder from
p2c_train_step.py plus the two 1x1 convolutions toonbot's (tflite) MobileFaceNet has
beyond photo2cartoon's (after the stem, and before the embedding: 1,292,992 parameters,
as models/face_embedder.safetensors); the backbone loads models/efficientnet_lite0.
safetensors when present (--models), else random; everything else is random (timing
only). `--check CHECKPOINT` compares the state_dict shapes with a toonbot fast checkpoint.

Where it differs from the candle step, all small next to the convolutions:
  - the face crop is resized with F.interpolate (the candle step: two matmuls), and the
    embedder's stride-2 convolutions pad 1 on each side, not TF SAME's (0, 1): the same
    shapes;
  - the backbone's convolutions pass symmetric SAME padding to the convolution and pad
    only the asymmetric (stride-2) ones with F.pad (candle fuses the padding into its
    kernels); PyTorch's best ordinary form of the same network;
  - PyTorch's Adam (per-tensor loop on the CPU) in place of toonbot's Adam, and
    zero_grad before each backward pass where candle gets fresh gradients.
As in the candle step, the generator update's backward also computes the discriminators'
weight gradients (their parameters still require grad; skipping them in the candle step
made no measurable difference at 128 px: after/before 1.00, 1.03, 0.97 in three
alternating runs), and the backbone's weights never get one.

Prints one JSON line: {"runtime", "device", "size", "ms_per_step": {batch: ms},
"steps_per_run", "backbone"}.

Run: /work/venv/bin/python tools/reference/fast_train_step.py [--size 256] [--batch 4]
     [--device cpu|cuda] [--runs 3] [--threads 2] [--models models] [--check CKPT]
"""
import argparse
import importlib.util
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load("p2c_reference")
p2c_step = _load("p2c_train_step")

# FastWeights::default() and FastSpec::new (src/train/fast/mod.rs).
W = dict(adv_global=1.0, adv_local=1.0, adv_ramp_steps=200, face_id=1.0, content_luma=10.0,
         content_feature=0.1, content_colour=0.0, identity=10.0, identity_every=4, cam=1000.0)
SEED, EDGE_THRESHOLD, ADA_TARGET, ADA_SPEED_IMAGES, ADA_P = 0, 2.0, 0.6, 20_000.0, 0.5

# --------------------------------------------------------------------------------------
# toonbot's SplitMix64 (src/rng.rs), for DiffAugment's draws.

M64 = (1 << 64) - 1


class SplitMix64:
    def __init__(self, state):
        self.state = state

    @classmethod
    def keyed(cls, seed, key):
        h = 0xCBF29CE484222325
        for b in key.encode():
            h = ((h ^ b) * 0x100000001B3) & M64
        mixer = cls(seed ^ (((h << 32) | (h >> 32)) & M64))
        return cls(mixer.next_u64())

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def next_f64(self):
        return (self.next_u64() >> 11) / float(1 << 53)

    def below(self, bound):
        return (self.next_u64() * bound) >> 64


# --------------------------------------------------------------------------------------
# src/train/fast/augment.rs


def draws(rng, n, size, p):
    """Draws::new: per sample (brightness, saturation, contrast, (dx, dy), cutout corner)."""
    out = []
    max_shift, cut = size // 8, size // 2
    for _ in range(n):
        b, s, c, t, k = (rng.next_f64() < p for _ in range(5))
        brightness, saturation, contrast = ((rng.next_f64() - 0.5) * scale for scale in (0.2, 0.4, 0.4))
        dx = rng.below(2 * max_shift + 1) - max_shift
        dy = rng.below(2 * max_shift + 1) - max_shift
        corner = (rng.below(size - cut + 1), rng.below(size - cut + 1))
        out.append((brightness if b else 0.0, 1.0 + saturation if s else 1.0,
                    1.0 + contrast if c else 1.0, (dx, dy) if t else (0, 0), corner if k else None))
    return out


def translate(x, dx, dy):
    """`x` (1, C, H, W) shifted by (dx, dy) pixels, zeros where it moved in from outside."""
    if (dx, dy) == (0, 0):
        return x
    h, w = x.shape[2:]
    if dx > 0:
        x = F.pad(x[..., :w - dx], (dx, 0))
    elif dx < 0:
        x = F.pad(x[..., -dx:], (0, -dx))
    if dy > 0:
        x = F.pad(x[:, :, :h - dy], (0, 0, dy, 0))
    elif dy < 0:
        x = F.pad(x[:, :, -dy:], (0, 0, 0, -dy))
    return x


def diff_augment(x, p, seed, key):
    if p <= 0:
        return x
    n, _, h, w = x.shape
    d = draws(SplitMix64.keyed(seed, key), n, min(h, w), p)
    per_sample = lambda i: torch.tensor([v[i] for v in d], dtype=x.dtype, device=x.device).view(n, 1, 1, 1)
    x = x + per_sample(0)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * per_sample(1) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * per_sample(2) + mean
    x = torch.cat([translate(x[i:i + 1], *d[i][3]) for i in range(n)], 0)
    if all(v[4] is None for v in d):
        return x
    cut = min(h, w) // 2
    mask = torch.ones(n, 1, h, w, dtype=x.dtype, device=x.device)
    for i, v in enumerate(d):
        if v[4] is not None:
            cx, cy = v[4]
            mask[i, :, cy:cy + cut, cx:cx + cut] = 0
    return x * mask


class AdaptiveProbability:
    def __init__(self, p, target, speed_images, interval=4):
        self.p, self.target, self.speed, self.interval = p, target, speed_images, interval
        self.sum, self.count = 0.0, 0

    def observe(self, sign_mean, batch):
        self.sum += sign_mean
        self.count += 1
        if self.count >= self.interval:
            r_t = self.sum / self.count
            delta = math.copysign(1.0, r_t - self.target) * self.count * batch / self.speed
            self.p = min(max(self.p + delta, 0.0), 1.0)
            self.sum, self.count = 0.0, 0


def sign_mean(logits):
    return float((logits.detach() >= 0).float().mean() * 2 - 1)


def gaussian5(device):
    taps = torch.tensor([math.exp(-(i * i) / 2.0) for i in range(-2, 3)], device=device)
    taps = taps / taps.sum()
    return (taps[:, None] * taps[None, :]).view(1, 1, 5, 5)


@torch.no_grad()
def edge_smoothed(x, threshold, sobel, blur):
    n, c, h, w = x.shape
    lum = x.mean(1, keepdim=True)
    g = F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), sobel)
    edges = (g.square().sum(1, keepdim=True).sqrt() >= threshold).float()
    dilated = F.max_pool2d(F.pad(edges, (2, 2, 2, 2)), 5, 1)
    planes = F.pad(x.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="replicate")
    blurred = F.conv2d(planes, blur).view(n, c, h, w)
    return x * (1 - dilated) + blurred * dilated


# --------------------------------------------------------------------------------------
# src/nets/backbone.rs: EfficientNet-Lite0 (batch norms folded), up to block 15.


def same_padding(size, k, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """A convolution with TF SAME padding (the odd pixel after), with a bias."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride, 0, groups=groups)

    def forward(self, x):
        k, s = self.kernel_size[0], self.stride[0]
        (top, bottom), (left, right) = same_padding(x.shape[2], k, s), same_padding(x.shape[3], k, s)
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, s, (top, left), groups=self.groups)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, s, groups=self.groups)


def lite0_blocks():
    """(in, out, expand, kernel, stride) of the 16 blocks (backbone::Config::lite0)."""
    stages = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
              (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
    blocks, cin = [], 32
    for repeats, k, stride, expand, out in stages:
        for r in range(repeats):
            blocks.append((cin, out, expand, k, stride if r == 0 else 1))
            cin = out
    return blocks


class Block(nn.Module):
    def __init__(self, cin, cout, expand, k, stride):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid)
        self._project_conv = SameConv(mid, cout, 1)

    def forward(self, x):
        h = F.relu6(self._expand_conv(x)) if hasattr(self, "_expand_conv") else x
        h = self._project_conv(F.relu6(self._depthwise_conv(h)))
        return h + x if self.residual else h


class Backbone(nn.Module):
    TAPS = (2, 4, 10, 15)

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2)
        self._blocks = nn.ModuleList(Block(*b) for b in lite0_blocks())

    def run(self, x, count):
        h = F.relu6(self._conv_stem(x * (127.5 / 128) + 0.5 / 128))
        out = []
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self.TAPS[:count]:
                out.append(h)
                if len(out) == count:
                    break
        return out

    def features(self, x):
        return self.run(x, 4)

    def low_level(self, x):
        return self.run(x, 1)[0]


# --------------------------------------------------------------------------------------
# src/nets/projected_discriminator.rs

MAX_DOWN, HEAD_SIZE = (3, 2, 1, 0), 8


class Head(nn.Module):
    def __init__(self, c, depth):
        super().__init__()
        self.down = nn.ModuleList(ref.sn(nn.Conv2d(c, c, 4, 2, 1)) for _ in range(depth))
        self.out = ref.sn(nn.Conv2d(c, 1, 4, 1, 0, bias=False))

    def forward(self, x):
        layers = iter(self.down)
        while x.shape[2] > HEAD_SIZE:
            x = F.leaky_relu(next(layers)(x), 0.2)
        return self.out(x)


class ProjectedDiscriminator(nn.Module):
    def __init__(self, feature_channels=(24, 40, 112, 320), mixed=(64, 128, 256, 512)):
        super().__init__()
        self.scratch = nn.Module()
        for i, (cin, c) in enumerate(zip(feature_channels, mixed)):
            mix = nn.Conv2d(cin, c, 1)
            mix.requires_grad_(False)  # fixed random mixing, never trained
            setattr(self.scratch, f"layer{i}_ccm", mix)
        self.heads = nn.ModuleList(Head(c, d) for c, d in zip(mixed, MAX_DOWN))

    def trainable(self):
        return list(self.heads.parameters())

    def forward(self, backbone, x):
        n = x.shape[0]
        return torch.cat([head(getattr(self.scratch, f"layer{i}_ccm")(f)).reshape(n, -1)
                          for i, (f, head) in enumerate(zip(backbone.features(x), self.heads))], 1)


# --------------------------------------------------------------------------------------
# src/train/face_id.rs through toonbot's MobileFaceNet


def face_embedder():
    """p2c_train_step's MobileFaceNet plus toonbot's stem pointwise and Logits.Conv."""
    net = p2c_step.MobileFaceNet()
    layers = list(net.net)
    flatten = next(i for i, m in enumerate(layers) if isinstance(m, nn.Flatten))
    layers.insert(flatten, nn.Conv2d(512, 512, 1))
    layers.insert(2, nn.Conv2d(64, 64, 1))
    net.net = nn.Sequential(*layers)
    return net


def face_id(face, real, fake):
    n = real.shape[0]
    e = face(p2c_step.face_crop(torch.cat([real.detach(), fake])) * (127.5 / 128))
    return (1 - torch.cosine_similarity(e[:n].detach(), e[n:])).mean()


# --------------------------------------------------------------------------------------
# the step (src/train/fast/step.rs, FastStep::adversarial)


class Fast:
    def __init__(self, device, models):
        self.gen = ref.ResnetGenerator(32, 256, True).to(device).train()
        self.local = ref.Discriminator(3, 32, 5).to(device).train()
        self.projected = ProjectedDiscriminator().to(device).train()
        self.backbone, self.backbone_source = Backbone(), "random"
        path = os.path.join(models, "efficientnet_lite0.safetensors") if models else None
        if path and os.path.exists(path):
            from safetensors.torch import load_file
            self.backbone.load_state_dict(load_file(path), strict=True)
            self.backbone_source = path
        self.backbone.to(device).eval().requires_grad_(False)
        self.face = face_embedder().to(device).eval().requires_grad_(False)
        adam = dict(lr=1e-4, betas=(0.5, 0.999), weight_decay=0.0)
        self.g_opt = torch.optim.Adam(self.gen.parameters(), **adam)
        self.d_opt = torch.optim.Adam(self.projected.trainable() + list(self.local.parameters()), **adam)
        self.ada = AdaptiveProbability(ADA_P, ADA_TARGET, ADA_SPEED_IMAGES)
        self.sobel = torch.tensor([[[[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]]],
                                   [[[-1., -2., -1.], [0., 0., 0.], [1., 2., 1.]]]], device=device)
        self.blur = gaussian5(device)
        self.steps = 0

    def step(self, photos, cartoons):
        self.steps += 1
        step, p = self.steps, self.ada.p
        mse = lambda x, t: (x - t).square().mean()
        l1 = lambda a, b: (a - b).abs().mean()
        bce = lambda x, t: F.binary_cross_entropy_with_logits(x, torch.full_like(x, t))
        smoothed = edge_smoothed(cartoons, EDGE_THRESHOLD, self.sobel, self.blur)
        fake, fake_cam, _ = self.gen(photos)

        aug = lambda x, what: diff_augment(x, p, SEED, f"{what}.{step}")
        real, fakes, smooth = aug(cartoons, "real"), aug(fake.detach(), "fake"), aug(smoothed, "smoothed")
        self.d_opt.zero_grad()
        real_logits = self.projected(self.backbone, real)
        fake_logits = self.projected(self.backbone, fakes)
        self.ada.observe(sign_mean(real_logits), real.shape[0])
        hinge = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        local = []
        for x, target in ((real, 1.0), (fakes, 0.0), (smooth, 0.0)):
            logit, cam, _ = self.local(x)
            local += [mse(logit, target), mse(cam, target)]
        (hinge + sum(local)).backward()
        self.d_opt.step()

        self.g_opt.zero_grad()
        fake_aug = aug(fake, "generated")
        g_global = -self.projected(self.backbone, fake_aug).mean()
        logit, cam, _ = self.local(fake_aug)
        g_local = mse(logit, 1.0) + mse(cam, 1.0)
        ramp = min(step / W["adv_ramp_steps"], 1.0)
        luma = lambda x: F.avg_pool2d(x.mean(1, keepdim=True), 8)
        target = self.backbone.low_level(photos).detach()
        loss = (ramp * (W["adv_global"] * g_global + W["adv_local"] * g_local)
                + W["face_id"] * face_id(self.face, photos, fake)
                + W["content_luma"] * l1(luma(fake), luma(photos))
                + W["content_colour"] * l1(F.avg_pool2d(fake, 8), F.avg_pool2d(photos, 8))
                + W["content_feature"] * l1(self.backbone.low_level(fake), target)
                + W["cam"] * bce(fake_cam, 1.0))
        loss.backward()
        if W["identity_every"] > 0 and step % W["identity_every"] == 0:
            same, same_cam, _ = self.gen(cartoons)
            (W["identity"] * l1(same, cartoons) + W["cam"] * bce(same_cam, 0.0)).backward()
        self.g_opt.step()
        with torch.no_grad():
            for name, param in self.gen.named_parameters():
                if name.endswith(("rho", "w_gamma", "w_beta")):
                    param.clamp_(0, 1)


# --------------------------------------------------------------------------------------


def safetensors_shapes(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check(fast, path):
    """Compares the networks' state_dict shapes with a toonbot fast checkpoint's; prints the
    trainable parameter counts. Returns whether everything matched."""
    theirs = safetensors_shapes(path)
    ok = True
    for prefix, net in (("genA2B", fast.gen), ("disP", fast.projected), ("disLB", fast.local)):
        ours = {f"{prefix}.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
        want = {k: v for k, v in theirs.items() if k.startswith(prefix + ".")}
        diff = sorted(set(ours.items()) ^ set(want.items()))
        trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
        print(f"{prefix}: {len(ours)} tensors, {sum(map(math.prod, ours.values()))} values "
              f"({trainable} trainable); checkpoint: {len(want)} tensors, "
              f"{sum(map(math.prod, want.values()))} values; {'same shapes' if not diff else 'DIFFERENT'}",
              file=sys.stderr)
        for k, shape in diff[:10]:
            print(f"  {k} {shape} only in {'ours' if ours.get(k) == shape else 'the checkpoint'}",
                  file=sys.stderr)
        ok &= not diff
    print(f"face embedder: {sum(q.numel() for q in fast.face.parameters())} parameters; backbone: "
          f"{sum(q.numel() for q in fast.backbone.parameters())} ({fast.backbone_source})", file=sys.stderr)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[4])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", "--steps", dest="runs", type=int, default=3,
                    help="timed runs, each a whole identity cycle of 4 steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--models", default=os.path.join(HERE, "..", "..", "models"),
                    help="folder with efficientnet_lite0.safetensors (random backbone without it)")
    ap.add_argument("--check", metavar="CHECKPOINT",
                    help="compare the networks' shapes with this toonbot fast checkpoint first")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    fast = Fast(device, args.models)
    if args.check and not check(fast, args.check):
        sys.exit(1)
    cycle = max(W["identity_every"], 1)
    ms = {}
    for batch in args.batch:
        photos = torch.rand(batch, 3, args.size, args.size, device=device) * 2 - 1
        cartoons = torch.rand(batch, 3, args.size, args.size, device=device) * 2 - 1
        fast.step(photos, cartoons)
        times = []
        for _ in range(args.runs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(cycle):
                fast.step(photos, cartoons)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000 / cycle)
        ms[batch] = sorted(times)[len(times) // 2]
    runtime = f"pytorch-{torch.__version__.split('+')[0]}-{device.type}-{torch.get_num_threads()}t"
    print(json.dumps({"runtime": runtime, "device": args.device, "size": args.size, "ms_per_step": ms,
                      "steps_per_run": cycle, "backbone": "loaded" if fast.backbone_source != "random" else "random"}))


if __name__ == "__main__":
    main()
