"""PyTorch reference of the step `distill bench step` times: the same HF folders loaded with
transformers (float32, SDPA attention), the same batch (ids b*7919 + t*104729 mod V), the same
threads, the teacher under torch.no_grad(), the same loss written the straightforward way, AdamW.
Prints one JSON report, shaped like distill's.

usage: reference_step.py --teacher DIR --student DIR [--batch 4] [--seq 512] [--loss forward_kl]
                         [--steps 3] [--warmup 1] [--threads N] [--device cpu|cuda]
On CUDA every time mark waits for the device (torch.cuda.synchronize) and the report adds the peak
of allocated GPU memory.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from rss import peak_rss_mib, reset_peak


def loss_fn(kind, s, t, mask):
    """Per-position divergence at T = 1, mean over counted positions (as distill's)."""
    lq = F.log_softmax(s.float(), dim=-1)
    lp = F.log_softmax(t.float(), dim=-1)
    if kind == "forward_kl":  # KL(p||q)
        per = (lp.exp() * (lp - lq)).sum(-1)
    elif kind == "reverse_kl":  # KL(q||p)
        per = (lq.exp() * (lq - lp)).sum(-1)
    elif kind == "jsd":  # beta = 0.5
        lm = torch.logaddexp(lp + torch.log(torch.tensor(0.5)), lq + torch.log(torch.tensor(0.5)))
        per = 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
    else:
        raise SystemExit(f"unknown loss {kind}")
    return (per * mask).sum() / mask.sum().clamp_min(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    def now():
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32, attn_implementation="sdpa").to(dev).eval()
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32, attn_implementation="sdpa").to(dev).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    vocab = min(teacher.config.vocab_size, student.config.vocab_size)
    ids = torch.tensor([[(b * 7919 + t * 104729) % vocab for t in range(a.seq)] for b in range(a.batch)], device=dev)
    mask = torch.ones(a.batch, a.seq, device=dev)
    mask[:, -1] = 0
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    names = ["teacher_forward", "student_forward", "loss", "backward", "optimizer"]
    phases = {n: [] for n in names}
    totals = []
    reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(a.steps + a.warmup):
        opt.zero_grad(set_to_none=True)
        t0 = now()
        with torch.no_grad():
            t_logits = teacher(ids).logits
        t1 = now()
        s_logits = student(ids).logits
        t2 = now()
        loss = loss_fn(a.loss, s_logits[..., :vocab], t_logits[..., :vocab], mask)
        loss.item()
        t3 = now()
        loss.backward()
        t4 = now()
        opt.step()
        t5 = now()
        if i >= a.warmup:
            for n, (x, y) in zip(names, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)]):
                phases[n].append((y - x) * 1e3)
            totals.append(t5 - t0)
    sec = statistics.median(totals)
    print(json.dumps({
        "implementation": f"PyTorch {torch.__version__} + transformers",
        "batch": a.batch, "seq": a.seq, "threads": torch.get_num_threads(), "steps": a.steps,
        "ms_per_step": sec * 1e3, "tokens_per_s": a.batch * a.seq / sec, "peak_rss_mib": peak_rss_mib(),
        "phases": [[n, statistics.median(v)] for n, v in phases.items()],
        "device": a.device,
        **({"peak_gpu_mib": torch.cuda.max_memory_allocated(dev) / 2**20} if cuda else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
