"""transformers' generate on the prompts `distill generate --prompts` reads, for bench/generate.sh:
the same model folder, prompt file (chat template applied to every record, as `--chat` does), batch,
threads and length (greedy, EOS ignored: every answer max_new_tokens long). Prints one JSON line:
the generation time (model loading excluded), tokens/s, and the decoded answers."""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--prompts", required=True)
ap.add_argument("--batch", type=int, required=True)
ap.add_argument("--max-new-tokens", type=int, required=True)
ap.add_argument("--threads", type=int, required=True)
a = ap.parse_args()
torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.model)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
texts = []
for line in open(a.prompts):
    if not line.strip():
        continue
    r = json.loads(line)
    msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
    texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
answers = []
started = time.perf_counter()
with torch.inference_mode():
    for i in range(0, len(texts), a.batch):
        enc = tok(texts[i : i + a.batch], return_tensors="pt", padding=True, add_special_tokens=False)
        out = m.generate(
            **enc,
            do_sample=False,
            max_new_tokens=a.max_new_tokens,
            min_new_tokens=a.max_new_tokens,
            pad_token_id=tok.pad_token_id,
        )
        answers += out[:, enc["input_ids"].shape[1] :].tolist()
secs = time.perf_counter() - started
n = sum(len(x) for x in answers)
texts = [tok.decode(x, skip_special_tokens=True) for x in answers]
print(json.dumps({"seconds": secs, "tokens": n, "tokens_per_s": n / secs, "completions": texts}))
