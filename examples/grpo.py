"""GRPO on a real chat model, CPU only: rollouts from a rollserve fleet, the policy update in
PyTorch, the new weights pushed into every engine after every step.

    python examples/grpo.py [--model smollm2-135m-instruct] [--steps 20] [--out grpo-out]

The pieces:
- rollouts: `RolloutService.from_pretrained(model, dp_size=2)`, two engine processes behind
  the sglang-router; every sampled token comes back with the engine's logprob.
- trainer: the same checkpoint as a Hugging Face transformers model in float32, in this
  process; one GRPO update per step.
- weight sync: `RolloutService.update_weights` (a `rollserve.rl.WeightSync` push over a gloo
  group) after every step, so every step samples from the policy the previous step made.

The task: single-digit addition ("What is 7 + 5? Answer with just the number."), asked
through the model's chat template. The reward is 1 when the reply ends (end-of-turn within
`--max-new-tokens`) and the last number in it is the sum, else 0: exact and cheap to verify,
and at the edge of what SmolLM2-135M-Instruct does when sampled at temperature 1.0. It
knows these sums (it often writes "7 + 5 = 12."), but most replies ramble, miscount or run
out of tokens: the reward starts at 0.1-0.3 (0.17 over 128 samples before training), and
most groups of 8 mix right and wrong replies, which is what GRPO learns from. What it
learns is mostly to answer in the form it gets right ("7 + 5 = 12") and stop, not new
arithmetic. Two-digit sums started at 0.03 (nearly every group all wrong: no signal); a
format-only reward would not check that the answer is right.

GRPO, as done here: G samples per prompt at temperature 1.0; advantage = (r - mean of the
group) / (std of the group + eps); a token-level policy-gradient loss, -sum(A * log p(token))
over every sampled token (the engines' own tokens, the end-of-turn token included) divided
by the step's token count. One update per batch of rollouts, so the policy is on-policy:
the PPO ratio is exactly 1 and its clipping never applies; it is therefore left out, as is
the optional KL term.

Each step also measures the engines against the trainer: for every sampled token, the
logprob the engine reported and the one the trainer computes with the same weights (before
its update). They are the same model after a push, so the gap is float rounding.

Each step prints and appends a row to OUT/log.csv; at the end OUT/grpo.png plots the reward
and the time split per step. The defaults (20 steps of 8 prompts x 8 samples, lr 2e-5) took
7 to 12 minutes on 2 shared CPU cores, the reward going from about 0.2 to about 0.98 (the
first 5 steps' mean about 0.45-0.5, the last 5 steps' 0.98; BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Before torch loads libgomp, and inherited by the engine processes: the trainer's and the
# engines' OpenMP teams take turns on the same cores, and libgomp's default idle spin (~5 ms
# after every kernel) would have each burn the cores the other needs (README, "Engine").
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rollserve.models.catalog import DEFAULT_MODEL, resolve_model
from rollserve.rl import RolloutService

ADVANTAGE_EPS = 1e-4


@dataclass(slots=True)
class Config:
    model: str = DEFAULT_MODEL
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 24
    lr: float = 2e-5
    max_grad_norm: float = 1.0
    seed: int = 0
    engines: int = 2
    trainer_threads: int = 0  # 0: every core (see main)
    out: str = "grpo-out"


@dataclass(slots=True, frozen=True)
class Problem:
    question: str
    answer: int


@dataclass(slots=True)
class Sample:
    """One rollout: the prompt's ids, the engine's sampled ids and their logprobs."""

    prompt_ids: list[int]
    output_ids: list[int]
    engine_logprobs: list[float]
    text: str
    finished: bool  # ended with end-of-turn, not by running out of tokens
    reward: float = 0.0


@dataclass(slots=True)
class StepLog:
    step: int
    mean_reward: float
    rollout_s: float
    train_s: float
    push_s: float
    tokens_generated: int
    max_logprob_gap: float
    mean_logprob_gap: float


# ---- the task -------------------------------------------------------------------------------


def make_problems(rng: random.Random, count: int) -> list[Problem]:
    problems = []
    for _ in range(count):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        problems.append(Problem(f"What is {a} + {b}? Answer with just the number.", a + b))
    return problems


def reward(text: str, finished: bool, answer: int) -> float:
    """1 if the reply ended on its own and its last number is the answer, else 0."""
    numbers = re.findall(r"-?\d+", text)
    return float(finished and bool(numbers) and int(numbers[-1]) == answer)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The question as the user's turn of the model's chat template, ready for the reply."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    # The template already wrote every special token the model expects.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- rollouts -------------------------------------------------------------------------------


def rollout(service: RolloutService, prompts: list[list[int]], group_size: int,
            max_new_tokens: int) -> list[Sample]:
    """`group_size` samples of every prompt at temperature 1.0, prompt-major."""
    batch = [ids for ids in prompts for _ in range(group_size)]
    outs = service.generate(input_ids=batch, return_logprobs=True, temperature=1.0,
                            max_tokens=max_new_tokens)
    samples = []
    for ids, out in zip(batch, outs, strict=True):
        logprobs = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        if len(logprobs) != len(out["output_ids"]):
            raise RuntimeError("the engine returned a logprob count unlike its token count")
        samples.append(Sample(ids, out["output_ids"], logprobs, out["text"],
                              out["meta_info"]["finish_reason"]["type"] == "stop"))
    return samples


# ---- the trainer ----------------------------------------------------------------------------


def load_policy(model_dir: str) -> PreTrainedModel:
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return policy.eval()  # no dropout: the trainer's logprobs must be the engines'


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - group mean) / (group std + eps), for rewards laid out prompt-major."""
    groups = rewards.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + ADVANTAGE_EPS)).flatten()


def completion_logprobs(policy: PreTrainedModel, prompts: list[list[int]],
                        completions: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    """log p(token) of every completion token, shape (len(completions), longest), 0 past
    each end; `completions` holds G = len(completions) / len(prompts) replies per prompt,
    prompt-major, and the prompts have one length.

    Each prompt runs once and its KV cache is repeated for its G replies: the same values
    and gradient as G full sequences (the prompt's activations are shared, not detached),
    for a fraction of the compute, since the chat-templated prompt is longer than a reply.
    """
    group_size = len(completions) // len(prompts)
    prompt = policy.model(input_ids=torch.tensor(prompts), use_cache=True)
    cache = prompt.cache
    cache.batch_repeat_interleave(group_size)
    longest = max(len(c) for c in completions)
    ids = torch.full((len(completions), longest), pad_id)
    for row, completion in enumerate(completions):
        ids[row, :len(completion)] = torch.tensor(completion)
    # Right padding is harmless: causal attention keeps earlier positions from seeing it.
    hidden = policy.model(input_ids=ids, cache=cache).last_hidden_state
    # Token j is predicted at position j - 1; the first token at the prompt's last position.
    first = prompt.last_hidden_state[:, -1:].repeat_interleave(group_size, dim=0)
    logits = policy.lm_head(torch.cat([first, hidden[:, :-1]], dim=1)).float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None])[..., 0]
    lengths = torch.tensor([len(c) for c in completions])
    return logprobs * (torch.arange(longest)[None] < lengths[:, None])


def grpo_update(policy: PreTrainedModel, optimizer: torch.optim.Optimizer,
                samples: list[Sample], group_size: int, pad_id: int,
                max_grad_norm: float) -> tuple[float, float]:
    """One GRPO step on `samples` (prompt-major groups); returns the largest and the mean
    |engine logprob - trainer logprob| over every sampled token, the trainer's taken before
    the update, i.e. with the weights that sampled the tokens."""
    advantages = group_advantages(torch.tensor([s.reward for s in samples]), group_size)
    total_tokens = sum(len(s.output_ids) for s in samples)
    # Groups whose prompts have one length run as one batch (all of them, for this task):
    # one large forward is several times faster on CPU than one per group.
    by_length: dict[int, list[int]] = {}
    for start in range(0, len(samples), group_size):
        by_length.setdefault(len(samples[start].prompt_ids), []).append(start)
    optimizer.zero_grad(set_to_none=True)
    gaps = []
    for starts in by_length.values():
        rows = [i for start in starts for i in range(start, start + group_size)]
        logprobs = completion_logprobs(policy, [samples[s].prompt_ids for s in starts],
                                       [samples[i].output_ids for i in rows], pad_id)
        # Token-level: every sampled token weighs the same, whatever its reply's length.
        (-(advantages[rows][:, None] * logprobs).sum() / total_tokens).backward()
        for row, index in enumerate(rows):
            sample = samples[index]
            trainer = logprobs[row, :len(sample.output_ids)].detach()
            gaps.append((trainer - torch.tensor(sample.engine_logprobs)).abs())
    torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    gap = torch.cat(gaps)
    return gap.max().item(), gap.mean().item()


# ---- the loop -------------------------------------------------------------------------------


def train(config: Config, service: RolloutService, policy: PreTrainedModel,
          tokenizer: PreTrainedTokenizerBase) -> list[StepLog]:
    """`config.steps` GRPO steps against `service`, whose engines serve the same checkpoint
    as `policy`; every step's row goes to OUT/log.csv as soon as the step ends."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)  # the same prompts in every run
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    service.init_weight_update_group()
    logs: list[StepLog] = []
    fields = [f.name for f in dataclasses.fields(StepLog)]
    with open(out / "log.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        print_header()
        for step in range(config.steps):
            problems = make_problems(rng, config.prompts_per_step)
            start = time.perf_counter()
            samples = rollout(service, [chat_prompt_ids(tokenizer, p.question) for p in problems],
                              config.group_size, config.max_new_tokens)
            rollout_s = time.perf_counter() - start
            for index, sample in enumerate(samples):
                sample.reward = reward(sample.text, sample.finished,
                                       problems[index // config.group_size].answer)
            start = time.perf_counter()
            max_gap, mean_gap = grpo_update(policy, optimizer, samples, config.group_size,
                                            pad_id, config.max_grad_norm)
            train_s = time.perf_counter() - start
            start = time.perf_counter()
            service.update_weights(policy.named_parameters(), weight_version=f"step-{step + 1}")
            push_s = time.perf_counter() - start
            log = StepLog(step, sum(s.reward for s in samples) / len(samples), rollout_s,
                          train_s, push_s, sum(len(s.output_ids) for s in samples),
                          max_gap, mean_gap)
            logs.append(log)
            writer.writerow(dataclasses.asdict(log))
            file.flush()
            print_row(log, samples[0])
    return logs


def print_header() -> None:
    print(f"{'step':>4} {'reward':>6} {'rollout s':>9} {'train s':>7} {'push s':>6} "
          f"{'tokens':>6} {'max|dlp|':>8} {'mean|dlp|':>9}  first reply", flush=True)


def print_row(log: StepLog, sample: Sample) -> None:
    print(f"{log.step:>4} {log.mean_reward:>6.3f} {log.rollout_s:>9.1f} {log.train_s:>7.1f} "
          f"{log.push_s:>6.1f} {log.tokens_generated:>6} {log.max_logprob_gap:>8.1e} "
          f"{log.mean_logprob_gap:>9.1e}  {sample.text[:40]!r}", flush=True)


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Entry i: the mean of values[i - window + 1 : i + 1] (fewer at the start)."""
    windows = [values[max(0, i - window + 1):i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def plot(logs: list[StepLog], path: Path) -> None:
    """Reward per step, and each step's seconds split into rollout, train and push."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [log.step for log in logs]
    rewards = [log.mean_reward for log in logs]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(steps, rewards, marker="o", label="mean reward")
    top.plot(steps, trailing_mean(rewards, 5), linestyle="--", label="mean of the last 5 steps")
    top.set_ylabel("reward (fraction correct)")
    top.set_ylim(0, 1)
    top.legend()
    top.grid(alpha=0.3)
    bottom_edge = [0.0] * len(logs)
    for name, label in [("rollout_s", "rollout"), ("train_s", "train"), ("push_s", "push")]:
        values = [getattr(log, name) for log in logs]
        bottom.bar(steps, values, bottom=bottom_edge, label=label)
        bottom_edge = [b + v for b, v in zip(bottom_edge, values, strict=True)]
    bottom.set_xlabel("step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("seconds")
    bottom.legend()
    figure.suptitle("GRPO through rollserve: reward and time per step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def start_service(model_dir: str, engines: int) -> RolloutService:
    """`engines` engine processes of `model_dir` behind the sglang-router (one engine: no
    router), float32 on CPU like the trainer, so that their logprobs can be compared."""
    return RolloutService.from_pretrained(model_dir, dp_size=engines, dtype="float32",
                                          device="cpu", max_total_tokens=16384,
                                          log_level="warning")


def run(config: Config, service: RolloutService, model_dir: str) -> PreTrainedModel:
    """Train against a started `service`, write OUT/log.csv and OUT/grpo.png; returns the
    trained policy (whose weights the engines now serve)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = load_policy(model_dir)
    logs = train(config, service, policy, tokenizer)
    plot(logs, Path(config.out) / "grpo.png")
    return policy


def summarise(logs_path: Path) -> None:
    with open(logs_path) as file:
        rewards = [float(row["mean_reward"]) for row in csv.DictReader(file)]
    head, tail = rewards[:5], rewards[-5:]
    print(f"mean reward: first {len(head)} steps {sum(head) / len(head):.3f}, "
          f"last {len(tail)} steps {sum(tail) / len(tail):.3f}")


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.model,
                        help="a model name (`rollserve models`) or a checkpoint directory")
    for field in dataclasses.fields(Config):
        if field.name != "model":
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                                default=field.default)
    return Config(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    started = time.perf_counter()
    # Rollout, update and push take turns, so the trainer may use every core while the
    # engines wait (each engine gets its share of the cores while generating).
    torch.set_num_threads(config.trainer_threads or os.cpu_count() or 1)
    print(f"model {config.model}: resolving the checkpoint", flush=True)
    model_dir = resolve_model(config.model)
    print(f"starting {config.engines} engines of {model_dir}", flush=True)
    with start_service(model_dir, config.engines) as service:
        print(f"fleet up at {service.server_url} in {time.perf_counter() - started:.0f} s",
              flush=True)
        run(config, service, model_dir)
    out = Path(config.out)
    summarise(out / "log.csv")
    print(f"wrote {out / 'log.csv'} and {out / 'grpo.png'}; "
          f"{(time.perf_counter() - started) / 60:.1f} min in all")


if __name__ == "__main__":
    main()
