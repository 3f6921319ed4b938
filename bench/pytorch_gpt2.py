"""PyTorch eager reference for `kiln bench bench/gpt2_6l_384.kiln`: the same GPT-2 block
(pre-norm, fused QKV, tanh GELU, 4x MLP, tied LM head), the same sizes (6 layers, hidden 384,
6 heads, vocab 1024, seq 256, batch 8, f32, dropout 0), the same AdamW step, on the CPU.

    pip install torch            # any recent version
    python3 bench/pytorch_gpt2.py --steps 5 --warmup 1

Prints the median seconds per training step and tokens/s (batch x seq_len / step time), the
numbers `kiln bench` prints for the Kiln side.
"""

import argparse
import math
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(hidden)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        self.c_fc = nn.Linear(hidden, 4 * hidden)
        self.mlp_proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x, causal):
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        # Written out as eager GPT-2 computes it (no fused attention kernel), as Kiln does.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(h // self.heads)
        scores = scores.masked_fill(causal[:s, :s], float("-inf"))
        attn = F.softmax(scores, dim=-1) @ v
        x = x + self.c_proj(attn.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt2(nn.Module):
    def __init__(self, vocab, positions, hidden, layers, heads):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(positions, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        mask = torch.triu(torch.ones(positions, positions, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", mask)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x, self.causal)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(7)
    batch, seq = 8, 256
    model = Gpt2(vocab=1024, positions=256, hidden=384, layers=6, heads=6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    ids = torch.randint(0, 1024, (batch, seq))
    times = []
    for step in range(a.warmup + a.steps):
        start = time.perf_counter()
        loss = model(ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"pytorch {torch.__version__} eager, {torch.get_num_threads()} threads: {len(times)} steps after "
        f"{a.warmup} warm-up: {median:.3f} s/step median (min {min(times):.3f}, max {max(times):.3f}); "
        f"{batch * seq / median:.0f} tokens/s (batch {batch} x seq_len {seq})"
    )


if __name__ == "__main__":
    main()
