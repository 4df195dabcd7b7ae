"""A .gguf file works wherever a model path does: converted once into the cache, it serves
the same tokens as the checkpoint it was written from; files it cannot serve faithfully are
refused with a message, leaving nothing in the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gguf_files import write_gguf_model, write_unsupported_arch_gguf, write_vocab_only_gguf

from rollserve import Engine
from rollserve.models.catalog import resolve_model
from rollserve.models.local_cache import manifest_problem
from rollserve.server.args import ServerArgs

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [[5, 17, 300, 41], [9, 9, 120, 7, 600, 33, 2, 80]]


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROLLSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def greedy(path: str) -> list[list[int]]:
    with Engine(path, dtype="float32", device="cpu", max_total_tokens=1024) as engine:
        return [out["output_ids"] for out in engine.generate(input_ids=PROMPTS,
                                                             sampling_params=GREEDY)]


@pytest.mark.parametrize(("preset", "name"), [
    ("qwen2", None),
    ("qwen3", None),  # its head size is restored from the file
    ("mistral", "Tiny Mistral"),  # Mistral files are "llama" files; linear RoPE is restored
])
def test_a_gguf_file_serves_the_tokens_of_its_source_checkpoint(
        tiny_model_factory, private_cache, tmp_path, preset: str, name: str | None) -> None:
    source = tiny_model_factory(preset)
    gguf_file = write_gguf_model(source, tmp_path / f"{preset}.gguf", name=name)
    converted = resolve_model(str(gguf_file))
    assert Path(converted).parent == private_cache
    assert manifest_problem(Path(converted)) is None
    assert greedy(converted) == greedy(str(source))
    assert resolve_model(gguf_file) == converted  # cached by content
    assert ServerArgs(model_path=str(gguf_file)).model_path == converted


def test_llama3_rope_scaling_which_gguf_cannot_carry_is_refused(
        tiny_model_factory, private_cache, tmp_path) -> None:
    gguf_file = write_gguf_model(tiny_model_factory("llama"), tmp_path / "llama3.gguf")
    with pytest.raises(ValueError, match=r"llama3 .*RoPE scaling.*HF checkpoint"):
        resolve_model(str(gguf_file))
    assert list(private_cache.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize(("write", "message"), [
    (lambda path: path.write_bytes(b"not a gguf file at all" * 10), "not a readable GGUF"),
    (write_vocab_only_gguf, "holds no model weights"),
    (write_unsupported_arch_gguf, r"architecture 'phi3' is not supported; rollserve runs llama"),
])
def test_a_gguf_file_that_is_not_a_supported_model_gets_a_clear_error(
        private_cache, tmp_path, write, message: str) -> None:
    path = tmp_path / "bad.gguf"
    write(path)
    with pytest.raises(ValueError, match=message):
        resolve_model(str(path))
    assert not private_cache.exists() or list(private_cache.iterdir()) == []


def test_a_missing_gguf_file_is_reported_by_name(private_cache, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothere\.gguf"):
        resolve_model(str(tmp_path / "nothere.gguf"))


def test_update_weights_from_disk_takes_a_gguf_file(tiny_model_factory, private_cache,
                                                   tmp_path) -> None:
    """The file's hyper-parameters are float32 (rms_norm_eps 1e-6 becomes 9.99999997e-07):
    the same architecture at the precision the model computes in. A real difference is
    still refused."""
    other = write_gguf_model(tiny_model_factory("qwen2", seed=1), tmp_path / "other.gguf")
    changed = shutil.copytree(tiny_model_factory("qwen2", seed=1), tmp_path / "changed")
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with Engine(str(tiny_model_factory("qwen2")), dtype="float32", device="cpu",
                max_total_tokens=1024) as engine:
        engine.update_weights_from_disk(str(other))
        updated = [out["output_ids"] for out in engine.generate(input_ids=PROMPTS,
                                                                sampling_params=GREEDY)]
        with pytest.raises(ValueError, match="differs in: rms_norm_eps"):
            engine.update_weights_from_disk(str(changed))
    assert updated == greedy(resolve_model(str(other)))
