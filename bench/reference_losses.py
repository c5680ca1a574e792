"""PyTorch reference for `distill bench losses`: each divergence written the straightforward way
(log_softmax, exp, sums over the vocabulary), forward + backward over random logits of one shape;
median ms and the memory high-water mark above what was resident before. Prints JSON.

usage: reference_losses.py [--shape 4,512,49152] [--reps 2] [--threads N]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from rss import peak_rss_mib, reset_peak


def kl(la, lb):
    return (la.exp() * (la - lb)).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4,512,49152")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = [int(x) for x in a.shape.split(",")]
    torch.manual_seed(0)
    t = torch.randn(shape) * 2
    s0 = torch.randn(shape) * 2
    labels = torch.randint(shape[-1], shape[:-1])
    half = torch.log(torch.tensor(0.5))

    def lp(x, T=1.0):
        return F.log_softmax(x / T, dim=-1)

    def adaptive_kl(s):
        p, q = lp(t).exp(), lp(s).exp()
        sp, idx = p.sort(-1, descending=True)
        head = torch.zeros_like(p).scatter(-1, idx, ((sp.cumsum(-1) - sp) < 0.5).float())
        gap = (p - q).abs().detach()
        gh, gt = (gap * head).sum(-1), (gap * (1 - head)).sum(-1)
        return ((gh * kl(lp(t), lp(s)) + gt * kl(lp(s), lp(t))) / (gh + gt)).mean()

    cases = {
        "forward_kl": lambda s: kl(lp(t), lp(s)).mean(),
        "reverse_kl": lambda s: kl(lp(s), lp(t)).mean(),
        "jsd": lambda s: (0.5 * kl(lp(t), torch.logaddexp(lp(t) + half, lp(s) + half))
                          + 0.5 * kl(lp(s), torch.logaddexp(lp(t) + half, lp(s) + half))).mean(),
        "skew_kl": lambda s: kl(lp(t), torch.log(0.1 * lp(t).exp() + 0.9 * lp(s).exp())).mean(),
        "skew_reverse_kl": lambda s: kl(lp(s), torch.log(0.1 * lp(s).exp() + 0.9 * lp(t).exp())).mean(),
        "tvd": lambda s: (0.5 * (lp(t).exp() - lp(s).exp()).abs().sum(-1)).mean(),
        "adaptive_kl": adaptive_kl,
        "taid": lambda s: kl(lp(0.5 * s.detach() + 0.5 * t), lp(s)).mean(),
        "hinton": lambda s: 0.5 * 4.0 * kl(lp(t, 2.0), lp(s, 2.0)).mean()
                            + 0.5 * F.cross_entropy(s.reshape(-1, shape[-1]), labels.reshape(-1)),
    }
    out = []
    for name, f in cases.items():
        times = []
        reset_peak()
        base = peak_rss_mib()
        for _ in range(a.reps):
            s = s0.detach().requires_grad_(True)
            t0 = time.perf_counter()
            f(s).backward()
            times.append((time.perf_counter() - t0) * 1e3)
        out.append({"loss": name, "ms": statistics.median(times), "peak_rss_mib": peak_rss_mib() - base})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
