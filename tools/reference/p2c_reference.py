#!/usr/bin/env python3
"""PyTorch reference for toonbot's candle photo2cartoon networks (src/nets/generator.rs,
src/nets/discriminator.rs).

A compact re-implementation of the photo2cartoon ResnetGenerator (light) and Discriminator
from DESIGN.md section 4, written so that `state_dict()` keys are exactly photo2cartoon's
(`ConvBlock1.1.weight`, `HourGlass1.HG.0.ConvBlock1_1.ConvBlock1.3.weight`,
`DecodeBlock1.norm1.c_gamma.0.weight`, `UpBlock1.3.rho`, `model.1.weight_orig`, ...).

Writes (all deterministic):
  tests/fixtures/p2c_reference_outputs.safetensors
      outputs of genA2B (ngf=32, light) at 64x64 and 256x256 and of disGA (n_layers=7) /
      disLA (n_layers=5) at 96x96, in training mode (one power iteration, updated u/v) and
      then in eval mode. Weights and inputs are NOT stored: they come from `formula()`, a
      splitmix64 stream keyed by the FNV-1a hash of the parameter's full name, which
      tests/parity_generator.rs implements bit-for-bit.
  tests/fixtures/p2c_tiny.pt
      a photo2cartoon-format checkpoint {'genA2B','genB2A','disGA','disGB','disLA','disLB'}
      (torch.save zip format) of a tiny configuration (ngf=4, ndf=2), torch-initialised with
      a fixed seed, rho/w/LIN parameters randomised and u/v advanced by power iterations.
  tests/fixtures/p2c_tiny_outputs.safetensors
      genA2B / disGA / disLA outputs for that checkpoint plus gradients of a fixed loss.
  --checkpoint PATH: a full-size (ngf=32) photo2cartoon-format checkpoint with the formula
      weights (about 150 MB, not committed); TOONBOT_P2C_CHECKPOINT=PATH runs the test that
      loads it.

Run: /work/venv/bin/python tools/reference/p2c_reference.py [--time] [--checkpoint PATH]
(torch 2.15.0 from PyPI, numpy, safetensors).
"""
import argparse
import copy
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# --------------------------------------------------------------------------------------
# Deterministic values shared with the Rust test.

M64 = (1 << 64) - 1


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def uniform01(name, n):
    """n values in [0, 1): splitmix64 outputs seed + k*golden (k = 1..n), top 53 bits."""
    seed = np.uint64(fnv1a64(name))
    k = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = seed + k * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def value_range(name, shape):
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("rho", "w_gamma", "w_beta"):
        return 0.0, 1.0
    if leaf == "gamma":
        return 0.5, 1.5
    if leaf == "beta":
        return -0.5, 0.5
    if leaf in ("weight_u", "weight_v", "input"):
        return -1.0, 1.0
    if leaf == "bias":
        return -0.1, 0.1
    if leaf in ("weight", "weight_orig"):
        fan_in = int(np.prod(shape[1:]))
        b = 1.0 / np.sqrt(np.float64(fan_in))
        return -b, b
    raise ValueError(f"no formula for {name}")


def formula(name, shape):
    """The f32 tensor for `name`: lo + (hi - lo) * u, computed in f64, rounded to f32."""
    lo, hi = value_range(name, shape)
    n = int(np.prod(shape))
    vals = lo + (hi - lo) * uniform01(name, n)
    return torch.from_numpy(vals.astype(np.float32).reshape(shape))


def fill_formula(module, prefix):
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            t.copy_(formula(prefix + name, tuple(t.shape)))


# --------------------------------------------------------------------------------------
# The networks (DESIGN.md section 4). Sequential indices matter: they are the key names.


def refl_conv(cin, cout, k, stride=1, bias=False):
    return [nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride, 0, bias=bias)]


def unbiased_stats(x, dims):
    return x.mean(dim=dims, keepdim=True), x.var(dim=dims, keepdim=True)


def in_ln(x, eps):
    m, v = unbiased_stats(x, [2, 3])
    x_in = (x - m) / torch.sqrt(v + eps)
    m, v = unbiased_stats(x, [1, 2, 3])
    x_ln = (x - m) / torch.sqrt(v + eps)
    return x_in, x_ln


class adaLIN(nn.Module):
    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.full((1, c, 1, 1), 0.9))

    def forward(self, x, gamma, beta):
        x_in, x_ln = in_ln(x, self.eps)
        out = self.rho * x_in + (1 - self.rho) * x_ln
        return out * gamma[:, :, None, None] + beta[:, :, None, None]


class SoftAdaLIN(nn.Module):
    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.norm = adaLIN(c, eps)
        self.w_gamma = nn.Parameter(torch.zeros(1, c))
        self.w_beta = nn.Parameter(torch.zeros(1, c))
        self.c_gamma = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
        self.c_beta = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
        self.s_gamma = nn.Linear(c, c)
        self.s_beta = nn.Linear(c, c)

    def forward(self, x, content, style):
        gamma = (1 - self.w_gamma) * self.s_gamma(style) + self.w_gamma * self.c_gamma(content)
        beta = (1 - self.w_beta) * self.s_beta(style) + self.w_beta * self.c_beta(content)
        return self.norm(x, gamma, beta)


class LIN(nn.Module):
    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        x_in, x_ln = in_ln(x, self.eps)
        out = self.rho * x_in + (1 - self.rho) * x_ln
        return out * self.gamma + self.beta


class ResnetBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv_block = nn.Sequential(
            *refl_conv(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
            *refl_conv(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x):
        return x + self.conv_block(x)


class ResnetSoftAdaLINBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pad1 = nn.ReflectionPad2d(1)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 0, bias=False)
        self.norm1 = SoftAdaLIN(c)
        self.pad2 = nn.ReflectionPad2d(1)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 0, bias=False)
        self.norm2 = SoftAdaLIN(c)

    def forward(self, x, content, style):
        y = F.relu(self.norm1(self.conv1(self.pad1(x)), content, style))
        return x + self.norm2(self.conv2(self.pad2(y)), content, style)


class ConvBlock(nn.Module):
    """Pre-activation IN-ReLU-conv x3 (widths out/2, out/4, out/4), concatenated, + residual."""

    def __init__(self, cin, cout):
        super().__init__()
        self.cout = cout

        def branch(a, b):
            return nn.Sequential(nn.InstanceNorm2d(a), nn.ReLU(), *refl_conv(a, b, 3))

        self.ConvBlock1 = branch(cin, cout // 2)
        self.ConvBlock2 = branch(cout // 2, cout // 4)
        self.ConvBlock3 = branch(cout // 4, cout // 4)
        self.ConvBlock4 = nn.Sequential(nn.InstanceNorm2d(cin), nn.ReLU(),
                                        nn.Conv2d(cin, cout, 1, 1, bias=False))

    def forward(self, x):
        x1 = self.ConvBlock1(x)
        x2 = self.ConvBlock2(x1)
        x3 = self.ConvBlock3(x2)
        res = x if x.shape[1] == self.cout else self.ConvBlock4(x)
        return res + torch.cat([x1, x2, x3], 1)


class HourGlassBlock(nn.Module):
    NAMES = ["ConvBlock1_1", "ConvBlock1_2", "ConvBlock2_1", "ConvBlock2_2", "ConvBlock3_1",
             "ConvBlock3_2", "ConvBlock4_1", "ConvBlock4_2", "ConvBlock5", "ConvBlock6",
             "ConvBlock7", "ConvBlock8", "ConvBlock9"]

    def __init__(self, cin, cout):
        super().__init__()
        for i, n in enumerate(self.NAMES):
            setattr(self, n, ConvBlock(cin if i == 0 else cout, cout))

    def forward(self, x):
        skips = []
        down = x
        for level in range(1, 5):
            skips.append(getattr(self, f"ConvBlock{level}_1")(down))
            down = getattr(self, f"ConvBlock{level}_2")(F.avg_pool2d(down, 2))
        up = self.ConvBlock5(down)
        for level, name in zip(range(4, 0, -1), ["ConvBlock6", "ConvBlock7", "ConvBlock8",
                                                  "ConvBlock9"]):
            up = skips[level - 1] + F.interpolate(getattr(self, name)(up), scale_factor=2,
                                                  mode="nearest")
        return up


class HourGlass(nn.Module):
    def __init__(self, cin, cout, use_res=True):
        super().__init__()
        self.use_res = use_res
        self.HG = nn.Sequential(HourGlassBlock(cin, cout), ConvBlock(cout, cout),
                                nn.Conv2d(cout, cout, 1, 1, bias=False), nn.InstanceNorm2d(cout),
                                nn.ReLU())
        self.Conv1 = nn.Conv2d(cout, 3, 1, 1)
        if use_res:
            self.Conv2 = nn.Conv2d(cout, cout, 1, 1)
            self.Conv3 = nn.Conv2d(3, cout, 1, 1)

    def forward(self, x):
        ll = self.HG(x)
        tmp = self.Conv1(ll)
        if self.use_res:
            return x + self.Conv2(ll) + self.Conv3(tmp)
        return tmp


def cam(x, gap_fc, gmp_fc, gap_w, gmp_w):
    n = x.shape[0]
    gap_logit = gap_fc(F.adaptive_avg_pool2d(x, 1).view(n, -1))
    gmp_logit = gmp_fc(F.adaptive_max_pool2d(x, 1).view(n, -1))
    feats = torch.cat([x * gap_w[:, :, None, None], x * gmp_w[:, :, None, None]], 1)
    return torch.cat([gap_logit, gmp_logit], 1), feats


class ResnetGenerator(nn.Module):
    def __init__(self, ngf=32, img_size=256, light=True, n_blocks=4):
        super().__init__()
        self.light = light
        self.n_blocks = n_blocks
        c = ngf * 4
        self.ConvBlock1 = nn.Sequential(*refl_conv(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU())
        self.HourGlass1 = HourGlass(ngf, ngf)
        self.HourGlass2 = HourGlass(ngf, ngf)
        self.DownBlock1 = nn.Sequential(*refl_conv(ngf, ngf * 2, 3, 2), nn.InstanceNorm2d(ngf * 2),
                                        nn.ReLU())
        self.DownBlock2 = nn.Sequential(*refl_conv(ngf * 2, c, 3, 2), nn.InstanceNorm2d(c),
                                        nn.ReLU())
        for i in range(1, n_blocks + 1):
            setattr(self, f"EncodeBlock{i}", ResnetBlock(c))
        self.gap_fc = nn.Linear(c, 1)
        self.gmp_fc = nn.Linear(c, 1)
        self.conv1x1 = nn.Conv2d(2 * c, c, 1, 1)
        fc_in = c if light else (img_size // 4) ** 2 * c
        self.FC = nn.Sequential(nn.Linear(fc_in, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU())
        for i in range(1, n_blocks + 1):
            setattr(self, f"DecodeBlock{i}", ResnetSoftAdaLINBlock(c))
        self.UpBlock1 = nn.Sequential(nn.Upsample(scale_factor=2), *refl_conv(c, ngf * 2, 3),
                                      LIN(ngf * 2), nn.ReLU())
        self.UpBlock2 = nn.Sequential(nn.Upsample(scale_factor=2), *refl_conv(ngf * 2, ngf, 3),
                                      LIN(ngf), nn.ReLU())
        self.HourGlass3 = HourGlass(ngf, ngf)
        self.HourGlass4 = HourGlass(ngf, ngf, False)
        self.ConvBlock2 = nn.Sequential(*refl_conv(3, 3, 7), nn.Tanh())

    def forward(self, x):
        x = self.HourGlass2(self.HourGlass1(self.ConvBlock1(x)))
        x = self.DownBlock2(self.DownBlock1(x))
        content = []
        for i in range(1, self.n_blocks + 1):
            x = getattr(self, f"EncodeBlock{i}")(x)
            content.append(F.adaptive_avg_pool2d(x, 1).flatten(1))
        cam_logit, x = cam(x, self.gap_fc, self.gmp_fc, self.gap_fc.weight, self.gmp_fc.weight)
        x = F.relu(self.conv1x1(x))
        heatmap = x.sum(dim=1, keepdim=True)
        style_in = F.adaptive_avg_pool2d(x, 1).flatten(1) if self.light else x.flatten(1)
        style = self.FC(style_in)
        for i in range(1, self.n_blocks + 1):
            x = getattr(self, f"DecodeBlock{i}")(x, content[self.n_blocks - i], style)
        x = self.UpBlock2(self.UpBlock1(x))
        x = self.HourGlass4(self.HourGlass3(x))
        return self.ConvBlock2(x), cam_logit, heatmap


def sn(m):
    return nn.utils.spectral_norm(m)


class Discriminator(nn.Module):
    def __init__(self, input_nc=3, ndf=32, n_layers=5):
        super().__init__()
        chans = [input_nc] + [ndf * 2 ** i for i in range(n_layers - 1)]
        model = []
        for i in range(n_layers - 1):
            stride = 1 if i == n_layers - 2 else 2
            model += [nn.ReflectionPad2d(1),
                      sn(nn.Conv2d(chans[i], chans[i + 1], 4, stride, 0, bias=True)),
                      nn.LeakyReLU(0.2)]
        c = chans[-1]
        self.gap_fc = sn(nn.Linear(c, 1, bias=False))
        self.gmp_fc = sn(nn.Linear(c, 1, bias=False))
        self.conv1x1 = nn.Conv2d(2 * c, c, 1, 1, bias=True)
        self.pad = nn.ReflectionPad2d(1)
        self.conv = sn(nn.Conv2d(c, 1, 4, 1, 0, bias=False))
        self.model = nn.Sequential(*model)

    def forward(self, x):
        x = self.model(x)
        # As photo2cartoon: the CAM weighting uses the parameter itself (`weight_orig`, the
        # first of parameters()), the logits use the spectrally normalised weight.
        cam_logit, x = cam(x, self.gap_fc, self.gmp_fc, self.gap_fc.weight_orig,
                           self.gmp_fc.weight_orig)
        x = F.leaky_relu(self.conv1x1(x), 0.2)
        heatmap = x.sum(dim=1, keepdim=True)
        return self.conv(self.pad(x)), cam_logit, heatmap


def nets(ngf, ndf):
    return {
        "genA2B": ResnetGenerator(ngf, 256, True),
        "genB2A": ResnetGenerator(ngf, 256, True),
        "disGA": Discriminator(3, ndf, 7),
        "disGB": Discriminator(3, ndf, 7),
        "disLA": Discriminator(3, ndf, 5),
        "disLB": Discriminator(3, ndf, 5),
    }


# --------------------------------------------------------------------------------------


def np32(t):
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def disc_outputs(out, tag, d, x):
    """Training-mode forward (one power iteration) and then eval-mode forward."""
    d.train()
    o, c, h = d(x)
    out[f"{tag}.train.out"], out[f"{tag}.train.cam"], out[f"{tag}.train.heatmap"] = map(np32, (o, c, h))
    d.eval()
    with torch.no_grad():
        o, c, h = d(x)
    out[f"{tag}.eval.out"], out[f"{tag}.eval.cam"], out[f"{tag}.eval.heatmap"] = map(np32, (o, c, h))


def reference(args):
    torch.manual_seed(0)
    m = nets(32, 32)
    for name, net in m.items():
        fill_formula(net, name + ".")
    gen, dg, dl = m["genA2B"], m["disGA"], m["disLA"]
    gen.eval()
    print(f"generator parameters: {n_params(gen)} (ngf=32, light)")
    print(f"global D parameters: {n_params(dg)}, local D parameters: {n_params(dl)}")
    out = {}
    for size in (64, 256):
        x = formula(f"input{size}.input", (1, 3, size, size))
        with torch.no_grad():
            img, cam_logit, heat = gen(x)
            img64, cam64, heat64 = gen.double()(x.double())
            gen.float()
        out[f"gen{size}.image"], out[f"gen{size}.cam"], out[f"gen{size}.heatmap"] = map(
            np32, (img, cam_logit, heat))
        print(f"gen {size}: image {tuple(img.shape)} heatmap {tuple(heat.shape)}; "
              f"torch f32 vs f64 max abs: image {(img.double() - img64).abs().max():.2e} "
              f"cam {(cam_logit.double() - cam64).abs().max():.2e} "
              f"heatmap {(heat.double() - heat64).abs().max():.2e}")
    x = formula("input96.input", (1, 3, 96, 96))
    disc_outputs(out, "disGA", dg, x)
    disc_outputs(out, "disLA", dl, x)
    print(f"disGA out {out['disGA.eval.out'].shape}, disLA out {out['disLA.eval.out'].shape}")
    path = os.path.join(FIXTURES, "p2c_reference_outputs.safetensors")
    save_file(out, path, metadata={"generator_params": str(n_params(gen))})
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")

    if args.checkpoint:
        # The same weights as above (disGA/disLA with their u/v after the training-mode pass).
        torch.save({k: v.state_dict() for k, v in m.items()}, args.checkpoint)
        print(f"wrote {args.checkpoint}")

    if args.time:
        gen = m["genA2B"].eval()
        x = formula("input256.input", (1, 3, 256, 256))
        with torch.no_grad():
            gen(x)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                gen(x)
                times.append(time.perf_counter() - t0)
        print(f"PyTorch CPU forward 256x256 batch 1 ({torch.get_num_threads()} threads): "
              f"min {min(times) * 1000:.0f} ms, median {sorted(times)[2] * 1000:.0f} ms")


# Gradients stored for the tiny networks: every small parameter plus a few large ones.
BIG_GRADS = {"ConvBlock1.1.weight", "EncodeBlock1.conv_block.1.weight", "DecodeBlock4.conv2.weight",
             "conv1x1.weight", "FC.0.weight", "UpBlock1.2.weight", "model.1.weight_orig",
             "conv.weight_orig"}


def keep_grad(name, p):
    return p.grad is not None and (p.numel() <= 1024 or name in BIG_GRADS)


def tiny(args):
    """A photo2cartoon-format checkpoint of a tiny configuration with torch's own init.

    To stay small, genB2A/disGB/disLB share their tensors with genA2B/disGA/disLA (torch.save
    writes a shared storage once); the test loads every entry."""
    torch.manual_seed(1234)
    gen, dg, dl = ResnetGenerator(4, 256, True), Discriminator(3, 2, 7), Discriminator(3, 2, 5)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for net in (gen, dg, dl):
            for name, p in net.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("rho", "w_gamma", "w_beta"):
                    p.copy_(torch.rand(p.shape, generator=g))
                elif leaf == "gamma":
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
                elif leaf == "beta":
                    p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    x64 = formula("tiny64.input", (1, 3, 64, 64))
    x96 = formula("tiny96.input", (1, 3, 96, 96))
    dg.train()
    dl.train()
    for _ in range(3):  # advance u/v past their random init, as training would
        dg(x96)
        dl(x64)
    sd = {"gen": gen.state_dict(), "dg": dg.state_dict(), "dl": dl.state_dict()}
    ckpt = os.path.join(FIXTURES, "p2c_tiny.pt")
    torch.save({"genA2B": sd["gen"], "genB2A": sd["gen"].copy(), "disGA": sd["dg"],
                "disGB": sd["dg"].copy(), "disLA": sd["dl"], "disLB": sd["dl"].copy()}, ckpt)
    print(f"wrote {ckpt} ({os.path.getsize(ckpt)} bytes); params: generator {n_params(gen)} "
          f"({len(sd['gen'])} tensors), global D {n_params(dg)}, local D {n_params(dl)}")

    out = {}
    gen.eval()
    with torch.no_grad():
        img, cam_logit, heat = gen(x64)
    out["gen.image"], out["gen.cam"], out["gen.heatmap"] = map(np32, (img, cam_logit, heat))
    # Gradients of a fixed scalar, exercising every backward path used in training. In float64:
    # in float32 this tiny network's input gradient is only good to ~1% (torch f32 vs f64).
    gen64 = copy.deepcopy(gen).double()
    x = x64.double().requires_grad_(True)
    img, cam_logit, heat = gen64(x)
    r = {k: formula(f"tiny.r_{k}.input", tuple(t.shape)).double()
         for k, t in (("image", img), ("cam", cam_logit), ("heat", heat))}
    loss = ((img * r["image"]).sum() + (cam_logit * r["cam"]).sum()
            + 0.01 * (heat * r["heat"]).sum())
    loss.backward()
    out["gen.f64.loss"] = loss.detach().reshape(1).numpy()
    out["gen.f64.grad.input"] = np32(x.grad)
    for name, p in gen64.named_parameters():
        if keep_grad(name, p):
            out[f"gen.f64.grad.{name}"] = np32(p.grad)

    for tag, d, xd in (("disGA", dg, x96), ("disLA", dl, x64)):
        d.eval()
        with torch.no_grad():
            o, c, h = d(xd)
        out[f"{tag}.eval.out"], out[f"{tag}.eval.cam"], out[f"{tag}.eval.heatmap"] = map(
            np32, (o, c, h))
        d.train()
        o, c, h = d(xd)
        out[f"{tag}.train.out"], out[f"{tag}.train.cam"], out[f"{tag}.train.heatmap"] = map(
            np32, (o, c, h))
        for name, b in d.named_buffers():
            out[f"{tag}.train.{name}"] = np32(b)
        loss = (o * o).mean() + (c * c).mean() + 0.01 * h.mean()
        loss.backward()
        out[f"{tag}.loss"] = np32(loss.reshape(1))
        for name, p in d.named_parameters():
            if keep_grad(name, p):
                out[f"{tag}.grad.{name}"] = np32(p.grad)
    path = os.path.join(FIXTURES, "p2c_tiny_outputs.safetensors")
    save_file(out, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def bench_json(runs):
    """Times genA2B (ngf=32, light) at 256 on CPU at batch 1 and 4; prints one JSON line
    for `toonbot bench --reference-python` (the weights' values do not matter for time)."""
    import json
    gen = ResnetGenerator(32, 256, True).eval()
    ms_per_image = {}
    with torch.no_grad():
        for batch in (1, 4):
            x = torch.randn(batch, 3, 256, 256)
            gen(x)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                gen(x)
                times.append((time.perf_counter() - t0) * 1000 / batch)
            ms_per_image[batch] = sorted(times)[len(times) // 2]
    runtime = f"pytorch-{torch.__version__.split('+')[0]}-cpu-{torch.get_num_threads()}t"
    print(json.dumps({"runtime": runtime, "ms_per_image": ms_per_image}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", action="store_true", help="time the generator at 256 on CPU")
    ap.add_argument("--checkpoint", help="also write a full-size formula checkpoint here")
    ap.add_argument("--bench-json", action="store_true",
                    help="only time the generator at batch 1 and 4 and print a JSON line")
    ap.add_argument("--runs", type=int, default=5, help="runs per --bench-json measurement")
    args = ap.parse_args()
    if args.bench_json:
        bench_json(args.runs)
        return
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}")
    tiny(args)
    reference(args)


if __name__ == "__main__":
    main()
