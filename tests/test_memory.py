"""KV pool accounting: oversubscription finishes via retraction, nothing leaks, aborts free."""

from __future__ import annotations

import threading
import time

from rollserve import Engine

POOL = 512


def test_requests_needing_4x_the_pool_all_finish_without_leaks(llama_path) -> None:
    prompts = [[(7 * i + j) % 300 + 5 for j in range(40 + i)] for i in range(16)]
    params = {"temperature": 0.0, "max_new_tokens": 90, "ignore_eos": True}
    need = sum(len(p) + 90 for p in prompts)
    assert need >= 4 * POOL
    with Engine(str(llama_path), dtype="float32", device="cpu", max_total_tokens=POOL,
                chunked_prefill_size=64) as engine:
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], engine.pool.num_used)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        outputs = engine.generate(input_ids=prompts, sampling_params=params)
        done.set()
        watcher.join()
        assert all(len(o["output_ids"]) == 90 for o in outputs)
        assert peak[0] <= POOL
        stats = engine.stats()
        assert stats["retracted"] > 0
        engine.flush_cache()
        assert engine.stats()["kv_used_tokens"] == 0
        assert engine.pool.num_free == POOL
    # Retraction must not change results: compare with an unconstrained engine.
    with Engine(str(llama_path), dtype="float32", device="cpu", max_total_tokens=8192) as big:
        reference = big.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outputs] == [o["output_ids"] for o in reference]


def test_abort_mid_generation_frees_slots(llama_path) -> None:
    with Engine(str(llama_path), dtype="float32", device="cpu", max_total_tokens=POOL,
                disable_radix_cache=True) as engine:
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(engine.generate(
            input_ids=list(range(5, 50)), rid="victim",
            sampling_params={"max_new_tokens": 400, "ignore_eos": True})))
        worker.start()
        deadline = time.monotonic() + 30
        while engine.stats()["generated_tokens"] < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.abort("victim")
        worker.join(timeout=30)
        assert result["meta_info"]["finish_reason"]["type"] == "abort"
        assert engine.stats()["kv_used_tokens"] == 0
