"""What users run instead of Kiln: Hugging Face transformers' GPT2LMHeadModel or
LlamaForCausalLM (SDPA attention, their default), eager or under torch.compile, trained with
AdamW, on the CPU or a GPU, in the shapes of Kiln's benchmark configurations
(`bench/cpu_references.kiln`, `bench/gpt2_124m_gpu.kiln`).

    pip install torch transformers
    python3 bench/transformers_lm.py --device cuda --size gpt2-124m --precision bf16 --mode compile \
        --batch 8 --seq 1024
    python3 bench/transformers_lm.py --device cpu --size gpt2-6l-384 --mode eager --threads 2

bf16 is autocast over f32 weights and AdamW state, as Kiln's mixed precision keeps f32 masters.
Tokens are random (a fixed seed): this measures speed, not learning. Prints one JSON line: the
median seconds per step over `--steps` timed steps after `--warmup`, tokens/s, model FLOP/s
(6·N per token for the parameters plus 12·layers·hidden·seq for attention, PaLM's count; close
to, not exactly, `kiln plan`'s, which sums the graph's products), and on a GPU the peak memory
PyTorch allocated.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# The shapes of Kiln's benchmark configurations, by name: (family, vocabulary, hidden, layers,
# heads, key/value heads, feed-forward width, positions).
SIZES = {
    "gpt2-6l-384": ("gpt2", 1024, 384, 6, 6, 6, 1536, 256),
    "gpt2-6l-384-v8192": ("gpt2", 8192, 384, 6, 6, 6, 1536, 256),
    "gpt2-124m": ("gpt2", 50257, 768, 12, 12, 12, 3072, 1024),
    "llama-6l-384": ("llama", 8192, 384, 6, 6, 2, 1024, 256),
}


def build(size):
    """The model, dropout off, SDPA attention."""
    family, vocab, hidden, layers, heads, kv_heads, ffn, positions = SIZES[size]
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden,
                            n_layer=layers, n_head=heads, n_inner=ffn, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=positions,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt2-6l-384")
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--mode", choices=["eager", "compile"], default="eager")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    _, vocab, hidden, layers, *_ = SIZES[args.size]
    model = build(args.size).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, weight_decay=0.1, fused=args.device == "cuda"
    )
    step_model = torch.compile(model) if args.mode == "compile" else model
    tokens = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    autocast = torch.autocast(
        device_type=args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16"
    )

    def step():
        with autocast:
            loss = step_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    for _ in range(args.warmup):
        step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_step = args.batch * args.seq
    flops_per_token = 6 * parameters + 12 * layers * hidden * args.seq
    result = {
        "reference": f"transformers {type(model).__name__} (sdpa), {args.mode}",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "size": args.size,
        "precision": args.precision,
        "batch": args.batch,
        "seq": args.seq,
        "parameters": parameters,
        "seconds_per_step": round(seconds, 6),
        "tokens_per_second": round(tokens_per_step / seconds),
        "model_tflops_per_second": round(flops_per_token * tokens_per_step / seconds / 1e12, 2),
    }
    if args.device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
