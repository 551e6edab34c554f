"""PyTorch + PEFT's LoRA step on an HF directory, the shape of kiln's 7B step (issue 26):

    python peft_step.py DIR [--rank 16] [--tokens 512] [--steps 2] [--dtype bf16]

LoRA of rank r (alpha 2r) on all seven projections, the base frozen in `--dtype`, gradient
checkpointing on (as `train.activation_checkpointing = true` in kiln), batch 1 x tokens of
seeded token ids, AdamW at 2e-4, 2 threads. Prints one JSON line: seconds of each step and
peak RSS.
"""

import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(3, model.config.vocab_size, (1, a.tokens))
    times = []
    for _ in range(a.steps):
        t0 = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(round(time.time() - t0, 1))
    print(json.dumps({"step_s": times, "loss": float(loss), "dtype": a.dtype, "rank": a.rank,
                      "tokens": a.tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
