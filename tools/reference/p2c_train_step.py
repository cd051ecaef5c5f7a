#!/usr/bin/env python3
"""Times one photo2cartoon training step in PyTorch (the reference for toonbot's candle
training step, src/train/step.rs), on CPU or CUDA.

The step is UgatitSadalinHourglass.train's loop body (minivision-ai/photo2cartoon
models/UGATIT_sadalin_hourglass.py): discriminator update (8 discriminator passes, LSGAN on
logits and CAM logits), generator update (6 generator passes, 4 discriminator passes, cycle
L1 x50, identity L1 x10, CAM BCE x1000, face-ID 1-cos through a frozen MobileFaceNet on the
reference crop), Adam(lr 1e-4, betas (0.5, 0.999), weight_decay 1e-4) for both, rho/w
clipping. Networks come from p2c_reference.py (same architecture and state_dict keys); the
face embedder is photo2cartoon's MobileFaceNet with batch norms folded (random weights:
timing only). Prints one JSON line: {"runtime", "device", "size", "ms_per_step": {batch: ms}}.

Run: /work/venv/bin/python tools/reference/p2c_train_step.py [--size 256] [--batch 1 8]
     [--device cpu|cuda] [--steps 5]
"""
import argparse
import importlib.util
import itertools
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("p2c_reference", os.path.join(HERE, "p2c_reference.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)


def conv_prelu(cin, cout, k=1, s=1, p=0, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p, groups=groups), nn.PReLU(cout))


class DepthWise(nn.Module):
    def __init__(self, cin, cout, groups, stride, residual):
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(conv_prelu(cin, groups), conv_prelu(groups, groups, 3, stride, 1, groups),
                                  nn.Conv2d(groups, cout, 1))

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(nn.Module):
    """photo2cartoon's models/mobilefacenet.py with batch norms folded into the convs."""

    def __init__(self, dim=192):
        super().__init__()
        layers = [conv_prelu(3, 64, 3, 2, 1), conv_prelu(64, 64, 3, 1, 1, 64)]
        for cin, cout, groups, n in ((64, 64, 128, 4), (64, 128, 256, 6), (128, 128, 512, 2)):
            layers.append(DepthWise(cin, cout, groups, 2, False))
            layers += [DepthWise(cout, cout, 256 if groups == 512 else groups, 1, True) for _ in range(n)]
        layers += [conv_prelu(128, 512), nn.Conv2d(512, 512, 7, groups=512), nn.Flatten(),
                   nn.Linear(512, dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def face_crop(x):
    h, w = x.shape[2:]
    top, bottom = int(h / 2.1 * (0.8 - 0.33)), int(h - (h / 2.1 * 0.3))
    size = bottom - top
    left = int(w / 2 - size / 2)
    x = x[:, :, top:bottom, left:left + size]
    return F.interpolate(x, size=[112, 112], mode="bilinear", align_corners=True)


def build(device, size):
    nets = ref.nets(32, 32)
    for n in nets.values():
        n.to(device).train()
    face = MobileFaceNet().to(device).eval()
    for p in face.parameters():
        p.requires_grad_(False)
    g_opt = torch.optim.Adam(itertools.chain(nets["genA2B"].parameters(), nets["genB2A"].parameters()),
                             lr=1e-4, betas=(0.5, 0.999), weight_decay=1e-4)
    d_opt = torch.optim.Adam(itertools.chain(*(nets[k].parameters() for k in ("disGA", "disGB", "disLA", "disLB"))),
                             lr=1e-4, betas=(0.5, 0.999), weight_decay=1e-4)
    return nets, face, g_opt, d_opt


def step(nets, face, g_opt, d_opt, real_A, real_B):
    mse, l1, bce = nn.MSELoss(), nn.L1Loss(), nn.BCEWithLogitsLoss()
    gA2B, gB2A, dGA, dGB, dLA, dLB = (nets[k] for k in ("genA2B", "genB2A", "disGA", "disGB", "disLA", "disLB"))

    def d_terms(d, real, fake):
        rl, rc, _ = d(real)
        fl, fc, _ = d(fake)
        return (mse(rl, torch.ones_like(rl)) + mse(fl, torch.zeros_like(fl))
                + mse(rc, torch.ones_like(rc)) + mse(fc, torch.zeros_like(fc)))

    d_opt.zero_grad()
    fake_A2B, _, _ = gA2B(real_A)
    fake_B2A, _, _ = gB2A(real_B)
    d_loss = (d_terms(dGA, real_A, fake_B2A) + d_terms(dLA, real_A, fake_B2A)
              + d_terms(dGB, real_B, fake_A2B) + d_terms(dLB, real_B, fake_A2B))
    d_loss.backward()
    d_opt.step()

    g_opt.zero_grad()
    fake_A2B, cam_A2B, _ = gA2B(real_A)
    fake_B2A, cam_B2A, _ = gB2A(real_B)
    fake_A2B2A, _, _ = gB2A(fake_A2B)
    fake_B2A2B, _, _ = gA2B(fake_B2A)
    fake_A2A, cam_A2A, _ = gB2A(real_A)
    fake_B2B, cam_B2B, _ = gA2B(real_B)

    def g_adv(d, fake):
        l, c, _ = d(fake)
        return mse(l, torch.ones_like(l)) + mse(c, torch.ones_like(c))

    def face_id(real, fake):
        return (1 - torch.cosine_similarity(face(face_crop(real)), face(face_crop(fake)))).mean()

    g_loss = (g_adv(dGA, fake_B2A) + g_adv(dLA, fake_B2A) + g_adv(dGB, fake_A2B) + g_adv(dLB, fake_A2B)
              + 50 * (l1(fake_A2B2A, real_A) + l1(fake_B2A2B, real_B))
              + 10 * (l1(fake_A2A, real_A) + l1(fake_B2B, real_B))
              + 1000 * (bce(cam_B2A, torch.ones_like(cam_B2A)) + bce(cam_A2A, torch.zeros_like(cam_A2A))
                        + bce(cam_A2B, torch.ones_like(cam_A2B)) + bce(cam_B2B, torch.zeros_like(cam_B2B)))
              + face_id(real_A, fake_A2B) + face_id(real_B, fake_B2A))
    g_loss.backward()
    g_opt.step()
    with torch.no_grad():
        for g in (gA2B, gB2A):
            for name, p in g.named_parameters():
                if name.endswith(("rho", "w_gamma", "w_beta")):
                    p.clamp_(0, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    nets, face, g_opt, d_opt = build(device, args.size)
    ms = {}
    for batch in args.batch:
        a = torch.rand(batch, 3, args.size, args.size, device=device) * 2 - 1
        b = torch.rand(batch, 3, args.size, args.size, device=device) * 2 - 1
        step(nets, face, g_opt, d_opt, a, b)
        times = []
        for _ in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(nets, face, g_opt, d_opt, a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        ms[batch] = sorted(times)[len(times) // 2]
    runtime = f"pytorch-{torch.__version__.split('+')[0]}-{device.type}-{torch.get_num_threads()}t"
    print(json.dumps({"runtime": runtime, "device": args.device, "size": args.size, "ms_per_step": ms}))


if __name__ == "__main__":
    main()
