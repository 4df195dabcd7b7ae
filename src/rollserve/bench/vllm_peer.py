"""vLLM's side of `bench.offline --compare vllm`, run by path with the python of vLLM's venv
(bench.vllm_env), so it imports nothing from rollserve:

    VLLM_PYTHON vllm_peer.py REQUEST.json RESULT.json

REQUEST holds the model directory, dtype, the engine limits and the workload (prompt token
ids, output lengths); RESULT gets the start-up seconds, the generation seconds (timed as
rollserve's are: the whole batch of requests, after start-up), the output tokens, the peak
resident memory of vLLM's processes and the kernel libraries they loaded. Greedy,
ignore_eos, no prefix caching, as rollserve's run. vLLM spawns its engine core, hence the
__main__ guard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from pathlib import Path

import psutil  # a dependency of rollserve and of vLLM alike


def peak_rss(stop: threading.Event, peak: list[int]) -> None:
    """Largest resident memory of this process and its children: sampled at once, every
    0.1 s, and once more when `stop` is set (a run shorter than a period still counts)."""
    me = psutil.Process()
    while True:
        stopped = stop.is_set()
        peak[0] = max(peak[0], _tree_rss(me))
        if stopped:
            return
        stop.wait(0.1)


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a child may end meanwhile
            total += process.memory_info().rss
    return total


def kernel_libraries() -> list[str]:
    """vLLM's kernel libraries (vllm/_C*.so: _C_AVX2, _C_AVX512 or _C) that this process and
    its children have loaded: which build of its kernels ran."""
    me, names = psutil.Process(), set()
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            names.update(Path(m.path).name for m in process.memory_maps() if "/vllm/_C" in m.path)
    return sorted(names)


def main(request_file: str, result_file: str) -> None:
    with open(request_file) as file:
        request = json.load(file)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_rss, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=request["model"], dtype=request["dtype"], seed=0,
              max_num_seqs=request["max_num_seqs"],
              max_num_batched_tokens=request["max_num_batched_tokens"],
              max_model_len=request["max_model_len"], enable_prefix_caching=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in request["output_lens"]]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    startup = time.perf_counter() - start
    kernels = kernel_libraries()
    begin = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - begin
    stop.set()
    sampler.join()
    result = {"startup_seconds": startup, "seconds": seconds, "peak_rss_bytes": peak[0],
              "output_tokens": sum(len(out.outputs[0].token_ids) for out in outputs),
              "kernel_libraries": kernels}
    with open(result_file, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="vllm_peer.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("request_file", help="JSON: the model, limits and workload")
    parser.add_argument("result_file", help="where the JSON result goes")
    args = parser.parse_args()
    main(args.request_file, args.result_file)
