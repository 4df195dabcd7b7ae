"""Decode steps of one to three rows run every decoder layer in one native call
(kernels/decode_layers.c): the same step as the model's layer-by-layer forward, on every
architecture and instruction set, and it follows weight updates."""

from __future__ import annotations

import pytest
import torch
from native_isas import ISAS

from rollserve import Engine
from rollserve.engine.model_runner import ExtendInput, ForwardInputs
from rollserve.engine.tp import rank_forward
from rollserve.kernels.build import ISA_ENV
from rollserve.kernels.decode_layers import (
    MAX_ROWS,
    DecodeLayers,
    LayerShape,
    LayerWeights,
    make_decode_layers,
)
from rollserve.kernels.elementwise import make_fused_elementwise
from rollserve.models.llama import SINGLE
from rollserve.models.loader import load_model

CPU = torch.device("cpu")
PRESETS = ["llama", "qwen2", "qwen3", "mistral"]  # plain, q/k/v bias, q/k norms, one KV head
PROMPT_LENS = [20, 33, 47]


class CountedCalls:
    """Counts the kernel's calls while still making them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: list[int] = []
        call = DecodeLayers.__call__

        def counted(kernel: DecodeLayers, table, x, *args, **kwargs):
            self.rows.append(x.shape[0])
            return call(kernel, table, x, *args, **kwargs)

        monkeypatch.setattr(DecodeLayers, "__call__", counted)


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_steps_of_up_to_three_rows_give_the_pytorch_paths_tokens_and_logprobs(
    preset, tiny_model_factory, monkeypatch
) -> None:
    path = str(tiny_model_factory(preset))
    prompts = [[5 + i, 17, 40 + 3 * i] * (3 + 2 * i) for i in range(MAX_ROWS)]
    params = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}
    options = {"dtype": "float32", "device": "cpu", "max_total_tokens": 4096}

    def run(**more: object) -> list[dict]:
        with Engine(path, **options, **more) as engine:
            alone = engine.generate(input_ids=prompts[:1], sampling_params=params,
                                    return_logprob=True)
            together = engine.generate(input_ids=prompts, sampling_params=params,
                                       return_logprob=True)
        return alone + together

    expected = run(disable_native_kernels=True)
    calls = CountedCalls(monkeypatch)
    for isa in [param.values[0] for param in ISAS if param.values[0] is not None]:
        monkeypatch.setenv(ISA_ENV, isa)
        calls.rows.clear()
        for got, want in zip(run(), expected, strict=True):
            assert got["output_ids"] == want["output_ids"]
            pairs = zip(got["meta_info"]["output_token_logprobs"],
                        want["meta_info"]["output_token_logprobs"], strict=True)
            assert max(abs(a[0] - b[0]) for a, b in pairs) < 1e-4
        assert set(calls.rows) == {1, MAX_ROWS}, isa  # both generate calls took the kernel


def _forward(path: str, dtype: torch.dtype):
    model = load_model(path, dtype, CPU, 256)
    model.use_fused_elementwise(make_fused_elementwise(CPU, dtype))
    model.use_decode_layers(make_decode_layers(CPU, dtype, model.layer_shape()))
    return model, rank_forward(model, model.config, SINGLE, 512, native=True)


def _prefill(forward, lens: list[int]) -> None:
    """Each sequence's prompt into the pool: sequence i at slots [100 i + 1, ...)."""
    gen = torch.Generator().manual_seed(3)
    ids, positions, extends, row = [], [], [], 0
    for i, length in enumerate(lens):
        ids.append(torch.randint(0, 1000, (length,), generator=gen))
        positions.append(torch.arange(length))
        extends.append(ExtendInput(row, 0, length, 100 * i + 1 + torch.arange(length)))
        row += length
    out_slots = torch.cat([e.kv_slots for e in extends])
    forward(ForwardInputs(torch.cat(ids), torch.cat(positions), out_slots, None, None, extends,
                          torch.tensor([row - 1])))


def _decode(lens: list[int]) -> ForwardInputs:
    """One decode step of every sequence, its next token at slot 100 i + 1 + len."""
    slots = torch.zeros(len(lens), max(lens) + 1, dtype=torch.int64)
    for i, length in enumerate(lens):
        slots[i, : length + 1] = 100 * i + 1 + torch.arange(length + 1)
    n = len(lens)
    return ForwardInputs(torch.tensor([7, 300, 901][:n]), torch.tensor(lens),
                         slots[torch.arange(n), torch.tensor(lens)], slots,
                         torch.tensor(lens) + 1, [], torch.arange(n))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("preset", ["qwen2", "qwen3"])
def test_a_bf16_decode_step_through_the_kernel_matches_the_layers_within_rounding(
    preset, isa, tiny_model_factory, monkeypatch
) -> None:
    """bf16 rounds each projection once on both paths; only the dot products' summation
    order differs, so logits agree to a few bf16 steps of their size."""
    monkeypatch.setenv(ISA_ENV, isa)
    model, forward = _forward(str(tiny_model_factory(preset)), torch.bfloat16)
    kernel = model.model.native_decode
    assert kernel is not None
    _prefill(forward, PROMPT_LENS)
    for n in range(1, MAX_ROWS + 1):
        inputs = _decode(PROMPT_LENS[:n])
        fused = forward(inputs).float()
        model.model.native_decode = None
        layered = forward(inputs).float()
        model.model.native_decode = kernel
        assert fused.shape == layered.shape == (n, model.config.vocab_size)
        scale = layered.abs().max().item()
        assert (fused - layered).abs().max().item() <= 0.03 * scale
        assert torch.equal(fused.argmax(-1), layered.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ISAS)
def test_the_lm_head_of_few_rows_is_the_product_rounded_once(isa, dtype, monkeypatch) -> None:
    """Against a float64 product: only the summation order differs, so a float32 result is
    within float32 rounding of the sum's size and a bf16 one within a bf16 step. A hidden
    size of 224 runs both the unrolled steps and the tail of every build's dot products; a
    vocab of 1003 ends in a part block."""
    monkeypatch.setenv(ISA_ENV, isa)
    hidden = 224
    shape = LayerShape(hidden=hidden, intermediate=128, kv_heads=2, group=2, head_dim=16,
                       qk_norm=False)
    kernel = make_decode_layers(CPU, dtype, shape)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1003, hidden, generator=gen).to(dtype)
    for n in range(1, MAX_ROWS + 1):
        x = torch.randn(n, hidden, generator=gen).to(dtype)
        exact = x.double() @ weight.double().T
        got = kernel.logits(x, weight).double()
        assert got.shape == (n, 1003)
        sizes = x.double().abs() @ weight.double().abs().T  # bounds each sum's rounding
        step = 2.0**-8 * exact.abs() if dtype == torch.bfloat16 else 0.0
        assert ((got - exact).abs() <= step + 1e-5 * sizes).all()
    with pytest.raises(ValueError, match="rows or hidden states"):
        kernel.logits(torch.zeros(MAX_ROWS + 1, hidden, dtype=dtype), weight)
    with pytest.raises(ValueError, match="lm_head weight"):
        kernel.logits(torch.zeros(1, hidden, dtype=dtype), weight.T.contiguous())


@pytest.mark.parametrize("isa", ISAS)
def test_an_lm_head_weight_the_kernel_cannot_read_goes_to_onednn(
    isa, tiny_model_factory, monkeypatch
) -> None:
    """A parameter swapped in by hand in another layout (here transposed storage) must not
    fail the step: the lm_head then runs where the kernel does not."""
    monkeypatch.setenv(ISA_ENV, isa)
    for preset in ("llama", "qwen2"):  # an lm_head of its own, and tied embeddings
        model, _ = _forward(str(tiny_model_factory(preset)), torch.float32)
        native = model.model.native_decode
        tied = model.config.tie_word_embeddings
        param = model.model.embed_tokens.weight if tied else model.lm_head.weight
        gen = torch.Generator().manual_seed(1)
        hidden = torch.randn(2, model.config.hidden_size, generator=gen)
        assert native.serves_logits(hidden, param)
        expected = model.compute_logits(hidden)
        param.data = param.data.T.contiguous().T
        assert not native.serves_logits(hidden, param)
        torch.testing.assert_close(model.compute_logits(hidden), expected)


@pytest.mark.parametrize("isa", ISAS)
def test_the_kernel_refuses_rows_and_tensors_it_was_not_built_for(
    isa, tiny_model_factory, monkeypatch
) -> None:
    monkeypatch.setenv(ISA_ENV, isa)
    model, _ = _forward(str(tiny_model_factory("qwen2")), torch.float32)
    kernel = model.model.native_decode.kernel
    layer = model.model.layers[0]
    weights = [LayerWeights(layer.input_layernorm.weight, layer.self_attn.qkv_proj.weight,
                            None, None, None, layer.self_attn.o_proj.weight,
                            layer.post_attention_layernorm.weight,
                            layer.mlp.down_proj.weight, layer.mlp.down_proj.weight)]
    with pytest.raises(ValueError, match="layer weight gate_up"):
        kernel.weight_table(weights)
    pool = torch.zeros(2, 2, 8, 16)
    table = kernel.weight_table([])
    rows = MAX_ROWS + 1
    with pytest.raises(ValueError, match="rows or hidden states"):
        kernel(table, torch.zeros(rows, 64), torch.zeros(rows, 1, 16), torch.zeros(rows, 1, 16),
               pool, pool, torch.zeros(rows, dtype=torch.int64),
               torch.zeros(rows, 2, dtype=torch.int64), torch.ones(rows, dtype=torch.int64),
               0.25, 1e-6)
    with pytest.raises(ValueError, match="rows or hidden states"):
        kernel(table, torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(1, 1, 16),
               torch.zeros(1, 1, 16), pool, pool, torch.zeros(1, dtype=torch.int64),
               torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, dtype=torch.int64),
               0.25, 1e-6)


def test_shapes_the_kernel_does_not_take_keep_the_layers() -> None:
    odd = LayerShape(hidden=96, intermediate=200, kv_heads=2, group=2, head_dim=24,
                     qk_norm=False)
    assert make_decode_layers(CPU, torch.float32, odd) is None
    assert make_decode_layers(torch.device("meta"), torch.float32,
                              LayerShape(64, 128, 2, 2, 16, False)) is None


def test_after_a_weight_update_decode_steps_serve_the_new_weights(tiny_model_factory) -> None:
    """Swapping in new tensors moves the parameters: the kernel's table of their addresses
    is rebuilt, so batch-1 decoding equals an engine loaded with the new weights."""
    base, other = str(tiny_model_factory("qwen3")), str(tiny_model_factory("qwen3", seed=1))
    request = {"input_ids": [3, 14, 15, 92, 65], "return_logprob": True,
               "sampling_params": {"max_new_tokens": 12, "temperature": 0.0}}
    options = {"dtype": "float32", "device": "cpu", "max_total_tokens": 1024}
    with Engine(other, **options) as loaded:
        expected = loaded.generate(**request)
    with Engine(base, **options) as engine:
        before = engine.generate(**request)
        engine.update_weights_from_disk(other)
        after = engine.generate(**request)
    assert before["output_ids"] != expected["output_ids"]
    assert after["output_ids"] == expected["output_ids"]
    assert after["meta_info"]["output_token_logprobs"] == \
        expected["meta_info"]["output_token_logprobs"]
