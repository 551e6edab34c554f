"""Writes a Mistral-7B-shaped HF checkpoint with random bf16 weights (issue 26's stand-in for
`mistralai/Mistral-7B-v0.1`, which no registry here serves).

The config is the public `config.json` of Mistral-7B-v0.1 (32 layers, d 4096, 32 heads,
8 KV heads, FFN 14336, vocab 32000) with the sliding window off. The tokenizer is a real
one of the same size: llama.cpp's Llama SPM test vocabulary (`models/ggml-vocab-llama-spm.gguf`
from the `llama-cpp-python==0.3.36` sdist), converted to `tokenizer.json` by transformers.

Weights are seeded normals scaled so activations keep unit size through every projection
(std 1/sqrt(fan_in)), with the residual branches' output projections (o_proj, down_proj)
scaled down by 1/sqrt(2 L) as GPT-2 initialises them, so 32 random blocks do not amplify
rounding differences chaotically. The LM head's rows get log-normal scales (a few tokens
score much higher than the rest, as frequent tokens do in a trained model), so the logits
are far from flat and greedy decoding has clear winners even under bf16 rounding: what a
comparison of two implementations' greedy tokens needs.

    python make_mistral7b.py OUT_DIR [--layers N] [--seed S] [--vocab-gguf PATH]

`--layers 2` writes a small (1.4 GB) copy of the same shape for quick checks.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}

# Logit spread: the head's std times sqrt(d) (its input is RMS-normalised).
LOGIT_STD = 6.0
# Spread (log-normal sigma) of the LM head's row scales.
HEAD_ROW_SIGMA = 0.5
SHARD_BYTES = 4 << 30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument(
        "--vocab-gguf",
        default=os.path.join(here, "../../.cache/llama-cpp/src/models/ggml-vocab-llama-spm.gguf"),
    )
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cfg = dict(MISTRAL_7B, num_hidden_layers=a.layers)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    write_tokenizer(a.vocab_gguf, a.out)

    d, ffn, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(a.seed)

    def normal(shape, std):
        t = torch.empty(shape, dtype=torch.float32)
        t.normal_(0.0, std, generator=gen)
        return t.to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", normal((v, d), 1.0)
        for i in range(a.layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", torch.ones(d, dtype=torch.bfloat16)
            yield p + "post_attention_layernorm.weight", torch.ones(d, dtype=torch.bfloat16)
            for name, rows, cols in [
                ("self_attn.q_proj", d, d),
                ("self_attn.k_proj", kv, d),
                ("self_attn.v_proj", kv, d),
                ("self_attn.o_proj", d, d),
                ("mlp.gate_proj", ffn, d),
                ("mlp.up_proj", ffn, d),
                ("mlp.down_proj", d, ffn),
            ]:
                std = cols**-0.5
                if name in ("self_attn.o_proj", "mlp.down_proj"):
                    std /= (2 * a.layers) ** 0.5
                yield p + name + ".weight", normal((rows, cols), std)
            print(f"layer {i + 1}/{a.layers}", file=sys.stderr, flush=True)
        yield "model.norm.weight", torch.ones(d, dtype=torch.bfloat16)
        head = torch.empty((v, d), dtype=torch.float32).normal_(0.0, LOGIT_STD / d**0.5, generator=gen)
        scales = torch.empty((v, 1), dtype=torch.float32).normal_(0.0, HEAD_ROW_SIGMA, generator=gen)
        yield "lm_head.weight", (head * scales.exp()).to(torch.bfloat16)

    shards, shard, size = [], {}, 0
    for name, t in tensors():
        shard[name] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            shards.append(shard)
            flush(a.out, shards, final=False)
            shard, size = {}, 0
    shards.append(shard)
    flush(a.out, shards, final=True)


def flush(out, shards, final):
    """Writes the newest shard under a provisional name; on the last one, renames all to
    `model-0000i-of-0000n.safetensors` and writes the index."""
    i = len(shards)
    path = os.path.join(out, f"part-{i}.safetensors")
    save_file(shards[-1], path, metadata={"format": "pt"})
    names = list(shards[-1].keys())
    shards[-1] = names  # keep only the names: the tensors are on disk now
    if not final:
        return
    n = len(shards)
    weight_map, total = {}, 0
    for j, names in enumerate(shards, start=1):
        final_name = f"model-{j:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out, f"part-{j}.safetensors"), os.path.join(out, final_name))
        total += os.path.getsize(os.path.join(out, final_name))
        for name in names:
            weight_map[name] = final_name
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(f"wrote {n} shards, {total / 1e9:.2f} GB, to {out}", file=sys.stderr)


def write_tokenizer(vocab_gguf, out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(vocab_gguf)), gguf_file=os.path.basename(vocab_gguf)
    )
    assert len(tok) == 32000, f"expected a 32000-token vocabulary, got {len(tok)}"
    tok.save_pretrained(out)


if __name__ == "__main__":
    main()
