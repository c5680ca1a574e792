"""The independent side of tests/gguf_write.rs: gguf-py (llama.cpp's Python package) reads the GGUF
files distill writes and quantises the same numbers; a plain port of ggml's Q4_K quantiser (gguf-py
has none); and, where llama.cpp's own library is installed (scripts/get-llama-cpp.sh), ggml's
quantiser and llama.cpp's loader, tokenizer and forward pass.

Commands:
  read GGUF OUT_DIR            gguf-py reads GGUF: OUT_DIR/dequant.safetensors (every tensor,
                               dequantised by gguf.quants, GGUF names), OUT_DIR/hf.safetensors (the
                               same under checkpoint names, q/k rows un-permuted here in numpy),
                               OUT_DIR/meta.json (metadata and tensor table)
  quantize TYPE IN OUT         gguf.quants.quantize of the f32 values in IN (raw little-endian)
  q4k_plain IN OUT             the plain port of ggml's quantize_row_q4_K_ref below
  q4k_ggml LIB_DIR IN OUT      ggml's quantize_row_q4_K_ref from llama.cpp's library
  llama_cpp LIB_DIR GGUF TEXT N OUT
                               llama.cpp loads GGUF, tokenizes TEXT (a file), runs the first N
                               ids: OUT.json (ids, metadata, chat template), OUT.f32 (N × vocab logits)
"""
import glob
import json
import os
import sys

import numpy as np


def read(path, out_dir):
    import gguf
    from safetensors.numpy import save_file

    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        meta[k] = {"types": [t.name for t in f.types], "value": f.contents()}
    heads = meta[f"{arch}.attention.head_count"]["value"]
    kv_heads = meta[f"{arch}.attention.head_count_kv"]["value"]
    table, dequant, hf = {}, {}, {}
    for t in r.tensors:
        table[t.name] = {
            "type": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],
            "offset": int(t.data_offset),
        }
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape([int(d) for d in reversed(t.shape)])
        dequant[t.name] = np.ascontiguousarray(x)
        hf[hf_name(t.name)] = np.ascontiguousarray(unpermute(t.name, x, arch, heads, kv_heads))
    os.makedirs(out_dir, exist_ok=True)
    save_file(dequant, os.path.join(out_dir, "dequant.safetensors"))
    save_file(hf, os.path.join(out_dir, "hf.safetensors"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"metadata": meta, "tensors": table}, f, default=lambda o: o.item())


def hf_name(name):
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in fixed:
        return fixed[name]
    _, layer, part, suffix = name.split(".")
    part = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }[part]
    return f"model.layers.{layer}.{part}.{suffix}"


def unpermute(name, x, arch, heads, kv_heads):
    """llama.cpp's converter wrote q/k rows of head h as (h, pair, half) = interleaved; the
    checkpoint has (h, half, pair) = rotate-half. Read row h·R/n + 2i + a back to h·R/n + a·R/n/2 + i."""
    if arch != "llama" or not (".attn_q." in name or ".attn_k." in name):
        return x
    n = heads if ".attn_q." in name else kv_heads
    rows = x.shape[0]
    half = rows // n // 2
    out = np.empty_like(x)
    for h in range(n):
        for i in range(half):
            for a in range(2):
                out[h * 2 * half + a * half + i] = x[h * 2 * half + 2 * i + a]
    return out


def quantize(ty, src, dst):
    import gguf

    x = np.fromfile(src, dtype="<f4")
    qtype = gguf.GGMLQuantizationType[ty]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    q = gguf.quants.quantize(x.reshape(-1, block), qtype)
    open(dst, "wb").write(np.ascontiguousarray(q).tobytes())


# --- ggml's quantize_row_q4_K_ref, ported plainly: every value a float32, every operation in the
# order ggml's C writes it (a, b, c for a + b + c are ((a + b) + c)).

F = np.float32


def nearest_int(v):
    # ggml's nearest_int: round to nearest, ties to even
    return int(np.rint(F(v)))


def make_qkx2_quants(x, w, nmax=15, rmin=F(-1.0), rdelta=F(0.1), nstep=20):
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = F(sum_w + w[i])
        sum_x = F(sum_x + F(w[i] * x[i]))
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return [0] * n, F(0), F(-mn)
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)
    L = []
    best = F(0)
    for i in range(n):
        l = max(0, min(nmax, nearest_int(F(iscale * F(x[i] - mn)))))
        L.append(l)
        diff = F(F(F(scale * F(l)) + mn) - x[i])
        best = F(best + F(w[i] * F(diff * diff)))
    for step in range(nstep + 1):
        iscale = F(F(F(rmin + F(rdelta * F(step))) + F(nmax)) / F(mx - mn))
        sum_l = sum_l2 = sum_xl = F(0)
        aux = []
        for i in range(n):
            l = max(0, min(nmax, nearest_int(F(iscale * F(x[i] - mn)))))
            aux.append(l)
            wl = F(w[i] * F(l))
            sum_l = F(sum_l + wl)
            sum_l2 = F(sum_l2 + F(wl * F(l)))
            sum_xl = F(sum_xl + F(wl * x[i]))
        D = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if D > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / D)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F(0)
                this_scale = F(sum_xl / sum_l2)
            mad = F(0)
            for i in range(n):
                diff = F(F(F(this_scale * F(aux[i])) + this_min) - x[i])
                mad = F(mad + F(w[i] * F(diff * diff)))
            if mad < best:
                L, best, scale, mn = aux, mad, this_scale, this_min
    return L, scale, F(-mn)


def q4k_block(x):
    L, scales, mins = [], [], []
    max_scale = max_min = F(0)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = F(0)
        for v in xs:
            sum_x2 = F(sum_x2 + F(v * v))
        av_x = F(np.sqrt(F(sum_x2 / F(32))))
        w = [F(av_x + F(abs(v))) for v in xs]
        l, s, m = make_qkx2_quants(xs, w)
        L += l
        scales.append(s)
        mins.append(m)
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
    inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
    sc = [0] * 12
    for j in range(8):
        ls = min(63, nearest_int(F(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(F(inv_min * mins[j])) & 0xFF)
        if j < 4:
            sc[j] = ls
            sc[j + 4] = lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    d = np.float16(F(max_scale / F(63)))
    dmin = np.float16(F(max_min / F(63)))
    for j in range(8):
        if j < 4:
            s, m = sc[j] & 63, sc[j + 4] & 63
        else:
            s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
            m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        dd = F(F(d) * F(s))
        if dd == 0:
            continue
        dm = F(F(dmin) * F(m))
        for i in range(32):
            L[32 * j + i] = max(0, min(15, nearest_int(F(F(x[32 * j + i] + dm) / dd))))
    qs = []
    for c in range(4):
        qs += [L[64 * c + i] | (L[64 * c + 32 + i] << 4) for i in range(32)]
    return d.tobytes() + dmin.tobytes() + bytes(sc) + bytes(qs)


def q4k_plain(src, dst):
    x = np.fromfile(src, dtype="<f4")
    out = b"".join(q4k_block([F(v) for v in x[i:i + 256]]) for i in range(0, len(x), 256))
    open(dst, "wb").write(out)


def llama_lib(lib_dir):
    """llama.cpp's CPU library from the llama-cpp-cffi wheel, loaded without its package (whose
    imports want more). Built against a newer libstdc++ than Debian 12's: one symbol,
    __cxa_call_terminate, is missing; it is only called when an exception escapes a noexcept
    function, so lazy binding leaves it unresolved."""
    sys.path.insert(0, lib_dir)
    so = glob.glob(os.path.join(lib_dir, "llama", "_llama_cpp_cpu*.so"))[0]
    return so


def q4k_ggml(lib_dir, src, dst):
    import ctypes

    so = llama_lib(lib_dir)
    lib = ctypes.CDLL(so, mode=os.RTLD_LAZY)
    # ggml's f16 → f32 conversion reads a table that ggml_init fills (zeros before: every d = 0)
    lib.llama_backend_init()
    f = lib.quantize_row_q4_K_ref
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    f.restype = None
    x = np.ascontiguousarray(np.fromfile(src, dtype="<f4"))
    out = np.zeros(len(x) // 256 * 144, dtype=np.uint8)
    f(x.ctypes.data, out.ctypes.data, len(x))
    open(dst, "wb").write(out.tobytes())


def llama_cpp(lib_dir, path, text_file, n, out):
    import importlib.util

    so = llama_lib(lib_dir)
    sys.setdlopenflags(os.RTLD_LAZY)
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", so)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    lib, ffi = m.lib, m.ffi
    lib.llama_backend_init()
    mp = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(path.encode(), mp)
    if model == ffi.NULL:
        sys.exit(f"llama.cpp could not load {path}")
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    text = open(text_file, encoding="utf-8").read().encode()
    buf = ffi.new("llama_token[]", len(text) + 16)
    k = lib.llama_tokenize(vocab, text, len(text), buf, len(text) + 16, False, True)
    ids = [buf[i] for i in range(k)]
    tpl = lib.llama_model_chat_template(model, ffi.NULL)
    meta = {}
    for key in ["general.architecture", "general.file_type", "tokenizer.ggml.pre"]:
        s = ffi.new("char[]", 256)
        if lib.llama_model_meta_val_str(model, key.encode(), s, 256) >= 0:
            meta[key] = ffi.string(s).decode()
    desc = ffi.new("char[]", 256)
    lib.llama_model_desc(model, desc, 256)
    cp = lib.llama_context_default_params()
    cp.n_ctx = max(64, n)
    cp.n_batch = max(64, n)
    cp.n_ubatch = max(64, n)
    cp.n_threads = cp.n_threads_batch = 2
    ctx = lib.llama_init_from_model(model, cp)
    # a batch that asks for every position's logits (llama_batch_get_one gives only the last's)
    batch = lib.llama_batch_init(n, 0, 1)
    for i, t in enumerate(ids[:n]):
        batch.token[i] = t
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    batch.n_tokens = n
    if lib.llama_decode(ctx, batch) != 0:
        sys.exit("llama_decode failed")
    with open(out + ".f32", "wb") as f:
        for i in range(n):
            f.write(bytes(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * n_vocab)))
    lib.llama_batch_free(batch)
    with open(out + ".json", "w") as f:
        json.dump({
            "ids": ids, "n_vocab": n_vocab, "meta": meta, "desc": ffi.string(desc).decode(),
            "chat_template": ffi.string(tpl).decode() if tpl != ffi.NULL else None,
            "n_params": lib.llama_model_n_params(model),
        }, f)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "llama_cpp":
        args[3] = int(args[3])
    {"read": read, "quantize": quantize, "q4k_plain": q4k_plain, "q4k_ggml": q4k_ggml,
     "llama_cpp": llama_cpp}[cmd](*args)
