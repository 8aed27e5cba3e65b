"""A GRPO-style policy loss with an entropy bonus, straight from the hidden states.

For a batch of sampled completions (G groups of K completions to the same prompt), the policy's
per-token log-probability of the sampled token at temperature T and the entropy of its
distribution come from nllfused.linear_cross_entropy(..., logit_scale=1/T, return_stats=...):
the (tokens x vocabulary) logits are formed chunk by chunk and never exist as a whole (past
8 MiB of logits; a smaller head's are made whole, which is faster and gives the same numbers).

    advantage_i   = (reward_i - mean_group(reward)) / (std_group(reward) + 1e-4)
    ratio_t       = exp(logp_t - logp_old_t)                       (per token)
    policy_t      = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
    loss          = mean over the counted tokens of policy_t  -  beta * mean entropy_t

(per-token mean over the completion tokens; prompt and padding positions carry ignore_index.)

The script checks the loss and the gradients of the hidden states and the LM head against plain
torch (F.linear + log_softmax, the logits materialised, float64) and prints the comparison.

    python examples/grpo_loss.py                    # a few seconds on a CPU
    python examples/grpo_loss.py --vocab 32000 --hidden 256 --tokens 256
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import nllfused

IGNORE = -100


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=4, help="prompts (G)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (K)")
    p.add_argument("--tokens", type=int, default=64, help="positions per completion")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--clip", type=float, default=0.2, help="PPO clip range eps")
    p.add_argument("--entropy-coef", type=float, default=0.01, help="entropy bonus beta")
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: automatic)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_batch(a, dtype=torch.float32):
    """Hidden states (B, T, H) of B = G*K completions, an LM head (V, H), the sampled tokens
    (B, T) with ignored prompt/padding positions, the old policy's log-probs and the rewards."""
    g = torch.Generator().manual_seed(a.seed)
    B, T, H, V = a.groups * a.group_size, a.tokens, a.hidden, a.vocab
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    head = torch.randn(V, H, generator=g, dtype=dtype) * (2.0 / H ** 0.5)
    tokens = torch.randint(0, V, (B, T), generator=g)
    prompt = max(1, T // 4)
    tokens[:, :prompt] = IGNORE                                     # the prompt is not trained on
    lengths = torch.randint(prompt + 1, T + 1, (B,), generator=g)
    tokens[torch.arange(T) >= lengths.unsqueeze(1)] = IGNORE        # padding after each completion
    rewards = torch.randn(a.groups, a.group_size, generator=g, dtype=torch.float64)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    # The old policy's log-probs: the current ones, perturbed (as after a few optimiser steps).
    with torch.no_grad():
        logp = torch_token_stats(hidden.double(), head.double(), tokens, a.temperature)[0]
    old_logp = (logp + 0.1 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).to(dtype)
    return hidden, head, tokens, old_logp, advantages.reshape(B, 1).to(dtype)


def grpo_objective(logp, entropy, tokens, old_logp, advantages, clip, entropy_coef):
    """The GRPO policy loss with an entropy bonus from per-token log-probs and entropies."""
    counted = tokens != IGNORE
    ratio = torch.exp(logp - old_logp)
    policy = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    n = counted.sum()
    policy = torch.where(counted, policy, 0.0).sum() / n
    bonus = torch.where(counted, entropy, 0.0).sum() / n
    return policy - entropy_coef * bonus


def fused_loss(hidden, head, tokens, old_logp, advantages, a):
    """Through nllfused: no (tokens x vocabulary) tensor is made."""
    _, st = nllfused.linear_cross_entropy(
        hidden, head, tokens, ignore_index=IGNORE, reduction="none",
        logit_scale=1.0 / a.temperature, chunk_size=a.chunk,
        return_stats=("target_logprob", "entropy"))
    return grpo_objective(st.target_logprob, st.entropy, tokens, old_logp, advantages, a.clip,
                          a.entropy_coef)


def torch_token_stats(hidden, head, tokens, temperature):
    """(log p of the sampled token, entropy) per token by plain torch on the materialised
    logits; 0 log-prob on ignored positions."""
    logits = F.linear(hidden, head) / temperature                  # (B, T, V): all of it
    logp_all = torch.log_softmax(logits, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    safe = tokens.clamp(min=0).unsqueeze(-1)
    logp = torch.where(tokens != IGNORE, logp_all.gather(-1, safe).squeeze(-1), 0.0)
    return logp, entropy


def torch_loss(hidden, head, tokens, old_logp, advantages, a):
    logp, entropy = torch_token_stats(hidden, head, tokens, a.temperature)
    return grpo_objective(logp, entropy, tokens, old_logp, advantages, a.clip, a.entropy_coef)


def run(loss_fn, hidden, head, *rest, repeats=3):
    """(loss, grad hidden, grad head, best time of `repeats` forward + backward runs)."""
    best = float("inf")
    for _ in range(repeats):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        start = time.perf_counter()
        loss = loss_fn(h, w, *rest)
        loss.backward()
        best = min(best, time.perf_counter() - start)
    return loss.detach(), h.grad, w.grad, best


def main(argv=None):
    a = parse(argv)
    torch.manual_seed(a.seed)
    hidden, head, tokens, old_logp, adv = make_batch(a)
    rest = (tokens, old_logp, adv, a)
    ours = run(fused_loss, hidden, head, *rest)
    f32 = run(torch_loss, hidden, head, *rest)                      # plain torch, float32
    f64 = run(torch_loss, hidden.double(), head.double(), tokens, old_logp.double(),
              adv.double(), a, repeats=1)                           # the reference

    def err(x, i):
        return ((x[i].double() - f64[i]).abs().max() / f64[i].abs().max().clamp_min(1e-30)).item()

    B, T = tokens.shape
    print(f"GRPO loss from hidden states: {B} completions x {T} tokens, hidden {a.hidden}, "
          f"vocab {a.vocab}, temperature {a.temperature}, {int((tokens != IGNORE).sum())} "
          f"counted tokens")
    print(f"{'':24}{'loss':>14}{'grad hidden':>14}{'grad head':>14}{'fwd+bwd':>10}")
    print(f"{'error vs float64 torch':24}" + "".join(f"{err(ours, i):>14.2e}" for i in range(3))
          + f"{ours[3] * 1e3:>8.1f}ms  nllfused.linear_cross_entropy")
    print(f"{'':24}" + "".join(f"{err(f32, i):>14.2e}" for i in range(3))
          + f"{f32[3] * 1e3:>8.1f}ms  torch float32 (F.linear + log_softmax)")
    print(f"loss = {ours[0].item():.8f} (float64 torch: {f64[0].item():.8f})")
    # Within a small multiple of plain float32 torch's own error (and never above 1e-4).
    ok = all(err(ours, i) <= max(4 * err(f32, i), 1e-5) and err(ours, i) < 1e-4 for i in range(3))
    print("OK: nllfused matches plain torch" if ok else "MISMATCH")
    elements = B * T * a.vocab
    # (nllfused makes the logits of a head of at most 8 MiB of them whole: faster, same numbers)
    chunked = a.chunk is not None or elements * hidden.element_size() > 8 * 2**20
    print(f"{'logits never materialised' if chunked else 'logits made whole (a small head)'}: "
          f"torch made {elements:,} of them ({elements * 4 / 2**20:.1f} MiB in float32, and as "
          f"much again for each of log_softmax and its backward)")
    return {"ok": ok, "errors": [err(ours, i) for i in range(3)],
            "torch_errors": [err(f32, i) for i in range(3)]}


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
