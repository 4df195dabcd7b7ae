"""A whole RL loop on CPU: rollouts from two engines behind the router, policy-gradient
steps in the trainer, and the new weights pushed into both engines after every step.

    python examples/rl_loop.py [--steps 12]

The policy is a tiny random-weight Llama built locally. The reward is the fraction of
sampled tokens that come from a chosen set (the lower half of the vocabulary, about 50% at
the start); it should climb step by step. Each step also
reports how far the engines' logprobs are from the trainer's for the same tokens: after a
push they are the same model, so the gap stays at float rounding.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from rollserve.models.make_tiny import make_tiny_model
from rollserve.rl import RolloutService


def sequence_logprobs(model: torch.nn.Module, prompt: list[int],
                      completion: list[int]) -> torch.Tensor:
    """Log-probabilities the trainer's model gives each completion token."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def train(steps: int, prompts_per_step: int, samples_per_prompt: int, lr: float) -> None:
    path = make_tiny_model(tempfile.mkdtemp(prefix="rl-policy-"), "llama", seed=0)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    rewarded_below = policy.config.vocab_size // 2
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (12,), generator=generator).tolist()
               for _ in range(prompts_per_step)]
    with RolloutService.from_pretrained(str(path), dp_size=2, dtype="float32",
                                        max_total_tokens=8192) as service:
        service.init_weight_update_group()
        print(f"{'step':>4}{'reward':>9}{'max |lp engine - lp trainer|':>31}{'push s':>9}")
        for step in range(steps):
            batch = [p for p in prompts for _ in range(samples_per_prompt)]
            outs = service.generate(input_ids=batch, return_logprobs=True, max_tokens=8,
                                    temperature=1.0)
            completions = [o["output_ids"] for o in outs]
            rewards = torch.tensor([sum(t < rewarded_below for t in c) / len(c)
                                    for c in completions])
            groups = rewards.view(prompts_per_step, samples_per_prompt)
            advantages = (groups - groups.mean(1, keepdim=True)).flatten()
            optimizer.zero_grad()
            gap = 0.0
            for prompt, out, completion, advantage in zip(batch, outs, completions, advantages,
                                                          strict=True):
                logprobs = sequence_logprobs(policy, prompt, completion)
                engine = torch.tensor([lp for lp, _, _ in out["meta_info"]
                                       ["output_token_logprobs"]])
                gap = max(gap, (logprobs.detach() - engine).abs().max().item())
                (-(advantage * logprobs.sum()) / len(batch)).backward()
            optimizer.step()
            start = time.perf_counter()
            service.update_weights(policy.named_parameters(), weight_version=f"step-{step + 1}")
            push = time.perf_counter() - start
            print(f"{step:>4}{rewards.mean().item():>9.3f}{gap:>31.2e}{push:>9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    train(args.steps, args.prompts_per_step, args.samples_per_prompt, args.lr)


if __name__ == "__main__":
    main()
