"""Reference computations with PyTorch / transformers / gguf-py for the Rust test suite.

Each subcommand writes its result where the test asks, so the test compares numbers it did not
compute itself. Usage: python reference.py COMMAND ARGS...
"""
import json
import sys

import numpy as np
import torch


def logits(model_dir, ids_json, out):
    """float32 logits of transformers' AutoModelForCausalLM for one row of ids."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([json.load(open(ids_json))], dtype=torch.long)
    with torch.no_grad():
        out_logits = m(ids).logits[0].contiguous()
    save_file({"logits": out_logits}, out)


def perplexity(model_dir, text_file, window, max_tokens):
    """Perplexity over consecutive non-overlapping windows (the same definition as distill eval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(open(text_file, encoding="utf-8").read())["input_ids"][: int(max_tokens)]
    window = int(window)
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), window):
            chunk = ids[s : s + window]
            if len(chunk) < 2:
                continue
            x = torch.tensor([chunk])
            lp = torch.log_softmax(m(x).logits[0, :-1].float(), dim=-1)
            nll -= lp.gather(-1, x[0, 1:, None]).sum().item()
            count += len(chunk) - 1
    print(json.dumps({"perplexity": float(np.exp(nll / count)), "tokens": count}))


def tokenize(model_dir, texts_json):
    """transformers' token ids (add_special_tokens=True) for each text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = json.load(open(texts_json, encoding="utf-8"))
    print(json.dumps([tok(t)["input_ids"] for t in texts]))


def gguf_quant_file(out_gguf, out_expected):
    """A GGUF file with one random tensor per quantization type, and gguf-py's dequantization of each."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(out_gguf, "llama")
    expected = {}
    Q = gguf.GGMLQuantizationType
    for name, qt in [("Q4_0", Q.Q4_0), ("Q4_1", Q.Q4_1), ("Q5_0", Q.Q5_0), ("Q5_1", Q.Q5_1),
                     ("Q8_0", Q.Q8_0), ("Q4_K", Q.Q4_K), ("Q5_K", Q.Q5_K), ("Q6_K", Q.Q6_K)]:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
        rows, cols = 3, 2 * 256
        n_blocks = rows * cols // block_size
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        # keep every f16 scale finite: scales are the leading 2 or 4 bytes, Q6_K's d the last 2
        f16_pos = {"Q6_K": [type_size - 2]}.get(name, [0] if name in ("Q4_0", "Q5_0", "Q8_0") else [0, 2])
        for p in f16_pos:
            raw[:, p : p + 2] = np.frombuffer(
                rng.uniform(-2, 2, n_blocks).astype(np.float16).tobytes(), dtype=np.uint8).reshape(n_blocks, 2)
        raw = raw.reshape(rows, cols // block_size * type_size)
        w.add_tensor(f"t.{name}", raw, raw_dtype=qt)
        expected[f"t.{name}"] = dequantize(raw, qt).astype(np.float32).reshape(rows, cols)
    for name, dt, qt in [("F16", np.float16, Q.F16), ("F32", np.float32, Q.F32)]:
        x = rng.standard_normal((3, 64)).astype(dt)
        w.add_tensor(f"t.{name}", x, raw_dtype=qt)
        expected[f"t.{name}"] = x.astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    w.add_tensor("t.BF16", bf.view(np.uint8).reshape(3, 128), raw_dtype=Q.BF16)
    expected["t.BF16"] = (bf.astype(np.uint32) << 16).view(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(expected, out_expected)


def random_model_logits(model_dir, out):
    """Logits of a saved (random) model on fixed ids 0..15 — the ids the Rust test uses too."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = m.config.vocab_size
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(16)]])
    with torch.no_grad():
        save_file({"logits": m(ids).logits[0].contiguous()}, out)


def resave_config(model_dir, out_dir):
    """transformers' reading of model_dir/config.json, written to out_dir by its own save_pretrained
    (the layout the installed transformers writes); prints the RoPE parameters it read, as JSON."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    c.save_pretrained(out_dir)
    print(json.dumps(c.rope_parameters))


def activation_importance(model_dir, out):
    """Minitron activation importances of a saved model on the fixed ids 0..15 ((7i+3) mod V), in
    f64 from transformers' own modules through hooks: per layer the mean |down_proj input| per
    channel and the mean L2 norm of each head's slice of the o_proj input; the mean over tokens of
    every RMSNorm output's |channel|, summed over the norms."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    c = m.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    ids = torch.tensor([[(7 * i + 3) % c.vocab_size for i in range(16)]])
    found = {"hidden": torch.zeros(c.hidden_size, dtype=torch.float64)}

    def norm_hook(mod, inp, outp):
        found["hidden"] += outp.abs().mean(dim=(0, 1))

    for i, layer in enumerate(m.model.layers):
        def down(mod, inp, i=i):
            found[f"mlp.{i}"] = inp[0].abs().mean(dim=(0, 1))

        def o(mod, inp, i=i):
            b, t, _ = inp[0].shape
            found[f"heads.{i}"] = inp[0].view(b, t, -1, hd).norm(dim=-1).mean(dim=(0, 1))

        layer.mlp.down_proj.register_forward_pre_hook(down)
        layer.self_attn.o_proj.register_forward_pre_hook(o)
        layer.input_layernorm.register_forward_hook(norm_hook)
        layer.post_attention_layernorm.register_forward_hook(norm_hook)
    m.model.norm.register_forward_hook(norm_hook)
    with torch.no_grad():
        m(ids)
    save_file({k: v.float().contiguous() for k, v in found.items()}, out)


def angular_distances(model_dir, windows_json):
    """d(i, j) = mean over tokens of arccos(cos(h_i, h_j)) / pi for the residual stream h_0..h_L of
    transformers' model (output_hidden_states=True; the last one taken before the final norm), over
    every token of every window; printed as a JSON matrix (L+1) x (L+1). f64 from the f32 states."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # transformers replaces the last hidden state by the normed one unless told not to
    m.config.tie_last_hidden_states = False
    n = m.config.num_hidden_layers + 1
    sums = np.zeros((n, n))
    tokens = 0
    for w in json.load(open(windows_json)):
        with torch.no_grad():
            out = m.model(torch.tensor([w]), output_hidden_states=True)
        hs = [h[0].double().numpy() for h in out.hidden_states]
        assert len(hs) == n
        assert not np.allclose(hs[-1], out.last_hidden_state[0].double().numpy())
        for i in range(n):
            for j in range(n):
                a, b = hs[i], hs[j]
                cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
                sums[i, j] += np.arccos(np.clip(cos, -1.0, 1.0)).sum()
        tokens += len(w)
    print(json.dumps((sums / (np.pi * tokens)).tolist()))


def pruned_logits(model_dir, layers_json, out):
    """Logits of transformers' model with only the listed decoder layers (in that order), on the ids
    (7i + 3) mod vocab, i < 16."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = json.load(open(layers_json))
    m.model.layers = torch.nn.ModuleList([m.model.layers[i] for i in layers])
    m.config.num_hidden_layers = len(layers)
    vocab = m.config.vocab_size
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(16)]])
    with torch.no_grad():
        save_file({"logits": m(ids, use_cache=False).logits[0].contiguous()}, out)


if __name__ == "__main__":
    torch.set_num_threads(2)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"logits": logits, "perplexity": perplexity, "tokenize": tokenize,
     "gguf_quant_file": gguf_quant_file, "random_model_logits": random_model_logits,
     "resave_config": resave_config,
     "activation_importance": activation_importance, "angular_distances": angular_distances,
     "pruned_logits": pruned_logits}[cmd](*args)
