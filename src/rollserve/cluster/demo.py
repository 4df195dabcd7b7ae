"""The fleet demo: a few chat questions through the router's OpenAI endpoint, then an
RL-style rollout workload through the router, and a summary.

Prompts of the workload come in groups that share a long task description (as GRPO samples
several completions per task), so the router's cache-aware policy and the engines' prefix
caches both have something to do.
"""

from __future__ import annotations

import time

from rollserve.client import InferenceHTTPClient
from rollserve.cluster.handles import ServerGroup

TASKS = (
    "Solve the arithmetic problem and give only the final number.",
    "Write a one-line Python function for the described behaviour.",
    "Answer the trivia question in a single word.",
    "Summarise the sentence in at most five words.",
)
# Facts the default model (SmolLM2-135M-Instruct) answers correctly when decoding greedily.
CHAT_QUESTIONS = ("What is the capital of France?", "What is the capital of Japan?",
                  "What is 2 + 2?", "What is the chemical symbol for water?",
                  "Which ocean is the largest?")
QUESTIONS = ("12 + 30", "reverse a string", "capital of France", "the cat sat on the mat",
             "7 * 6", "sum a list", "largest ocean", "reinforcement learning needs rewards")


def demo_prompts(count: int) -> list[str]:
    """`count` prompts: each task's long preamble, then one of the questions."""
    preamble = "You are a careful assistant working through a batch of rollouts. " * 4
    return [f"{preamble}\nTask: {TASKS[i % len(TASKS)]}\nInput: "
            f"{QUESTIONS[(i // len(TASKS)) % len(QUESTIONS)]}\nAnswer:" for i in range(count)]


def run_demo(router_url: str, servers: ServerGroup, num_requests: int,
             max_new_tokens: int) -> None:
    client = InferenceHTTPClient(router_url)
    ask(client, CHAT_QUESTIONS)
    urls = servers.get_server_url().wait()
    before = [_requests_finished(url) for url in urls]
    params = {"temperature": 1.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    start = time.perf_counter()
    outputs = client.generate_many(prompts=demo_prompts(num_requests), sampling_params=params,
                                   max_concurrency=128, progress=True)
    seconds = time.perf_counter() - start
    per_engine = [_requests_finished(url) - b for url, b in zip(urls, before, strict=True)]
    metas = [out["meta_info"] for out in outputs]
    prompt_tokens = sum(m["prompt_tokens"] for m in metas)
    tokens = sum(m["completion_tokens"] for m in metas)
    cached = sum(m["cached_tokens"] for m in metas)
    print(f"\nsample completion: {outputs[0]['text']!r}")
    print(f"\n{'requests':>9}{'out tokens':>12}{'seconds':>10}{'out tok/s':>11}"
          f"{'cache hit':>11}  requests per engine")
    print(f"{len(outputs):>9}{tokens:>12}{seconds:>10.2f}{tokens / seconds:>11.1f}"
          f"{cached / prompt_tokens:>11.0%}  {per_engine}")


def ask(client: InferenceHTTPClient, questions: tuple[str, ...]) -> None:
    """Each question through /v1/chat/completions (greedy), printed with its answer."""
    print("\nchat through the router (/v1/chat/completions, greedy):")
    for question in questions:
        reply = client.chat_completion(messages=[{"role": "user", "content": question}],
                                       temperature=0.0, max_tokens=48)
        print(f"  Q: {question}\n  A: {reply['choices'][0]['message']['content'].strip()}")


def _requests_finished(server_url: str) -> int:
    info = InferenceHTTPClient(server_url, trust_env=False).get("/server_info")
    return sum(state["requests_finished"] for state in info["internal_states"])
