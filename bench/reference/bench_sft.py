"""Time LoRA fine-tuning steps in PyTorch + PEFT on batches written by `kiln bench sft`.

The base is the GGUF itself, dequantised to float32 by transformers (the same weights kiln's
dense LoRA run uses). LoRA: PEFT's LoraConfig(r, lora_alpha, all seven LLaMA projections,
dropout 0). One step = forward with labels (HF shifts them) + backward + clip_grad_norm_(1.0)
+ AdamW step + zero_grad, on the adapters only. Median over the steps after --warmup.

Usage (kiln runs it with --pytorch):
  python bench/reference/bench_sft.py --gguf MODEL.gguf --batches FILE.safetensors \
      [--rank 8 --alpha 16 --warmup 1 --threads 2]
"""

import argparse
import json
import os
import resource
import statistics
import time

import peft
import safetensors.torch
import torch
import transformers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    d, name = os.path.split(os.path.abspath(args.gguf))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    tensors = safetensors.torch.load_file(args.batches)
    n = len([k for k in tensors if k.startswith("input_ids.")])
    times, tokens = [], 0
    for i in range(n):
        ids, labels = tensors[f"input_ids.{i}"], tensors[f"labels.{i}"]
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens = ids.numel()
    med = statistics.median(times)
    print(json.dumps({
        "impl": "pytorch+peft", "step_ms_median": med * 1e3, "tokens_per_s": tokens / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
    }))


if __name__ == "__main__":
    main()
