"""Decoder-only transformer covering Llama, Qwen2, Qwen3 and Mistral checkpoints.

Weights load (and hot-update) by their Hugging Face names. Most are parameters of the same
name; q/k/v and gate/up are row blocks of one fused parameter each (`qkv_proj`, `gate_up_proj`:
one matmul instead of three and two, as vLLM and SGLang do, and the column-parallel layout
tensor parallelism shards). `CausalLM.slots` maps every checkpoint name to where it lives.
The model runs on a flattened batch of tokens; attention state lives in the KV pool.
Every forward reads parameters (and their prepacked forms) afresh: nothing captures their
storage, so a weight update may swap in new tensors instead of copying into the old ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rollserve.kernels.amx_linear import AmxLinear
from rollserve.kernels.decode_layers import DecodeLayers, LayerShape, LayerWeights, WeightTable
from rollserve.kernels.elementwise import FusedElementwise
from rollserve.models.attention import AttentionBatch, paged_attention, write_kv
from rollserve.models.config import ModelConfig
from rollserve.models.linear import FusedLinear, Linear, linear, pack
from rollserve.models.parallel import (
    SINGLE,
    Shard,
    TensorParallel,
    head_rows,
    head_shard,
    split_evenly,
    vocab_shard,
)
from rollserve.models.rope import RotaryEmbedding, apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin of every token's position
EMBED_NAME = "model.embed_tokens.weight"


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused: FusedElementwise | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x); with `residual`, first residual += x (in place) and return norm(residual),
        the add-then-norm between sublayers."""
        if self.fused is not None:
            return self.fused.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = residual.add_(x)
        # Normalise in float32, then scale in the model dtype (as the reference does). In-place
        # on fresh temporaries: on CPU every new activation-sized tensor costs page faults.
        dtype = x.dtype
        x32 = x.float() if dtype != torch.float32 else x.clone()
        inv_rms = x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return x32.mul_(inv_rms).to(dtype).mul_(self.weight)


class Attention(nn.Module):
    """This rank's attention heads: q/k/v column parallel, o_proj row parallel."""

    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.layer, self.tp = layer, tp
        heads = head_shard(config, tp)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.head_dim = hd = config.head_dim
        self.scale = config.head_dim**-0.5
        q = head_rows(heads.first_head, heads.num_heads, config.num_heads, hd)
        kv = head_rows(heads.first_kv_head, heads.num_kv_heads, config.num_kv_heads, hd)
        self.qkv_proj = FusedLinear(config.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv},
                                    bias=config.attention_bias)
        self.o_proj = Linear(q.length, config.hidden_size, bias=False,
                             shard=Shard(1, q.start, q.length, q.total))
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.fused: FusedElementwise | None = None

    def forward(self, x: torch.Tensor, rope: Rope, batch: AttentionBatch) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        # Views into the projection's output: rows lie apart, each row's heads contiguous.
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        if self.fused is not None:
            q = self.fused.rotary_store_kv(q, k, v, *rope, batch.k_cache[self.layer],
                                           batch.v_cache[self.layer], batch.out_slots)
        else:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            write_kv(self.layer, k, v, batch)
        out = paged_attention(self.layer, q, batch, self.scale)
        return self.tp.all_reduce(self.o_proj(out.reshape(tokens, -1)))


class MLP(nn.Module):
    """This rank's intermediate features: gate/up column parallel, down_proj row parallel."""

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        rows = split_evenly(config.intermediate_size, tp)
        self.gate_up_proj = FusedLinear(config.hidden_size, {"gate_proj": rows, "up_proj": rows},
                                        bias=False)
        self.down_proj = Linear(rows.length, config.hidden_size, bias=False,
                                shard=split_evenly(config.intermediate_size, tp, dim=1))
        self.fused: FusedElementwise | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused is not None:
            return self.tp.all_reduce(self.down_proj(self.fused.silu_and_mul(gate_up)))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate).mul_(up)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope, batch: AttentionBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous sublayer's output; residual: the stream it adds to (None before
        the first layer, where x is the embedding). Returns this layer's (output, residual)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, rope, batch), residual)
        return self.mlp(x), residual


class VocabEmbedding(nn.Embedding):
    """The token embedding, vocab parallel: this rank holds rows `shard` (padded to the same
    count on every rank); a token outside them contributes zeros, and the ranks' lookups sum
    to the embedding."""

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        self.shard, per_rank = vocab_shard(config.vocab_size, tp)
        super().__init__(per_rank, config.hidden_size)
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.length)
        x = super().forward(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))


class NativeDecode:
    """Decode steps of up to `kernel.max_rows` rows through the DecodeLayers kernel, all
    layers in one call (the same step as the layers' own forwards, within rounding). The
    weight table is built on first use and dropped by `weights_replaced`: it holds the
    parameters' addresses, which stay valid while values are copied into them."""

    def __init__(self, kernel: DecodeLayers, layers: nn.ModuleList, eps: float) -> None:
        self.kernel, self.layers, self.eps = kernel, layers, eps
        self._table: WeightTable | None = None

    def serves(self, batch: AttentionBatch) -> bool:
        return not batch.extends and 0 < batch.num_decode <= self.kernel.max_rows

    def __call__(self, x: torch.Tensor, rope: Rope, batch: AttentionBatch
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None:
            self._table = self.kernel.weight_table([_layer_weights(layer)
                                                    for layer in self.layers])
        return self.kernel(self._table, x, *rope, batch.k_cache, batch.v_cache,
                           batch.out_slots, batch.decode_kv_slots, batch.decode_kv_lens,
                           self.layers[0].self_attn.scale, self.eps)

    def weights_replaced(self) -> None:
        self._table = None

    def serves_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the kernel takes this lm_head: few rows, and a weight as it reads them (a
        parameter swapped in by hand may be another layout: oneDNN then takes it)."""
        kernel = self.kernel
        return (0 < hidden.shape[0] <= kernel.max_rows and weight.dtype == kernel.dtype
                and weight.is_contiguous() and weight.device.type == "cpu")

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.kernel.logits(hidden.contiguous(), weight)


def _layer_weights(layer: DecoderLayer) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        layer.input_layernorm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias,
        attn.q_norm.weight if attn.qk_norm else None,
        attn.k_norm.weight if attn.qk_norm else None, attn.o_proj.weight,
        layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight)


class DecoderBody(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, tp: TensorParallel) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions)
        self.embed_tokens = VocabEmbedding(config, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.native_decode: NativeDecode | None = None

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(batch.positions)
        rope = (cos.to(x.dtype), sin.to(x.dtype))
        if self.native_decode is not None and self.native_decode.serves(batch):
            x, residual = self.native_decode(x, rope, batch)
            return self.norm(x, residual)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, batch)
        return self.norm(x, residual)


@dataclass(slots=True, frozen=True)
class WeightSlot:
    """Where a checkpoint tensor lives in the model: in parameter `param`, whole (rows None)
    or its row block `rows`, holding the tensor's part `source` (None: all of it, as without
    tensor parallelism). `shape` is the checkpoint tensor's, whole."""

    param: str
    shape: tuple[int, ...]
    rows: slice | None = None
    source: Shard | None = None


class CausalLM(nn.Module):
    """One rank's share of the model (all of it when `tp` is SINGLE): every rank runs the
    same forward on the same batch, and the collectives inside make its outputs whole."""

    def __init__(self, config: ModelConfig, max_positions: int,
                 tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config, self.tp = config, tp
        self.model = DecoderBody(config, max_positions, tp)
        if not config.tie_word_embeddings:
            shard, per_rank = vocab_shard(config.vocab_size, tp)
            self.lm_head = Linear(config.hidden_size, per_rank, bias=False, shard=shard)
        self.packed_output_embedding: torch.Tensor | None = None
        self.amx: AmxLinear | None = None  # the tied lm_head's few-row matmuls
        self._linears = {f"{name}.weight": m for name, m in self.named_modules()
                         if isinstance(m, Linear)}
        self.slots = _checkpoint_slots(self)  # Hugging Face name -> where it lives

    def use_fused_elementwise(self, fused: FusedElementwise | None) -> None:
        """Run norms, SwiGLU, and rotary with the K/V write through `fused` (None: eager
        PyTorch ops)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused = fused

    def layer_shape(self) -> LayerShape:
        """The shape of this rank's decoder layers, as the DecodeLayers kernel takes it."""
        layer = self.model.layers[0]
        attn, intermediate = layer.self_attn, layer.mlp.down_proj.in_features
        return LayerShape(self.config.hidden_size, intermediate, attn.num_kv_heads,
                          attn.num_heads // attn.num_kv_heads, attn.head_dim, attn.qk_norm)

    def use_decode_layers(self, kernel: DecodeLayers | None) -> None:
        """Run decode steps of few rows through `kernel` (None: layer by layer). Without
        tensor parallelism only: the kernel has no collectives between its steps."""
        self.model.native_decode = None
        if kernel is not None and self.tp.size == 1:
            self.model.native_decode = NativeDecode(kernel, self.model.layers,
                                                    self.config.rms_norm_eps)

    def use_amx_linear(self, amx: AmxLinear | None) -> None:
        """Run few-row bf16 matmuls (decode steps) through `amx` (None: oneDNN for all)."""
        self.amx = amx
        for module in self._linears.values():
            module.amx = amx

    def checkpoint_weight(self, name: str) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (the whole tensor without tensor
        parallelism), as a view into the model: read it now; a later update may replace the
        parameter it views."""
        slot = self.slots[name]
        param = self.get_parameter(slot.param).data
        return param if slot.rows is None else param[slot.rows]

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor by Hugging Face name, as `checkpoint_weight` gives it."""
        return {name: self.checkpoint_weight(name) for name in self.slots}

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy this rank's part of the whole checkpoint tensor `name` into place."""
        source = self.slots[name].source
        self.checkpoint_weight(name).copy_(tensor if source is None else source.of(tensor))

    def prepacked_param(self, name: str) -> str | None:
        """The parameter whose prepacked form is derived from checkpoint tensor `name`, if any
        (on CPU in bf16/fp16): `repack_weight` it after changing the tensor."""
        param = self.slots[name].param
        tied = self.config.tie_word_embeddings and param == EMBED_NAME
        return param if param in self._linears or tied else None

    def install_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Make `weight` (same shape and dtype) the value of checkpoint tensor `name`: a whole
        parameter adopts it without a copy, a fused one's row block copies it. Returns a
        tensor like `weight` that nobody uses any more (the replaced parameter, or `weight`
        itself once copied). The prepacked form is dropped: those matmuls take the plain
        path, with bit-identical results, until `repack_weight`."""
        slot = self.slots[name]
        self._set_packed(slot.param, None)
        if self.model.native_decode is not None:
            self.model.native_decode.weights_replaced()
        if slot.rows is not None or slot.source is not None:
            self.load_weight(name, weight)
            return weight
        param = self.get_parameter(slot.param)
        old, param.data = param.data, weight
        return old

    def repack_weight(self, param: str) -> None:
        self._set_packed(param, pack(self.get_parameter(param)))

    def _set_packed(self, param: str, packed: torch.Tensor | None) -> None:
        if param in self._linears:
            self._linears[param].packed = packed
        elif self.config.tie_word_embeddings and param == EMBED_NAME:
            self.packed_output_embedding = packed

    def repack_weights(self) -> None:
        """Refresh the derived prepacked weights; call after loading or changing weights."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.repack()  # an untied lm_head is one of these
        if self.config.tie_word_embeddings:
            self.packed_output_embedding = pack(self.model.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Final hidden states, [tokens, hidden]."""
        return self.model(input_ids, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model dtype for the given rows only (the lm_head is costly: pick rows
        first), over the whole vocab on every rank. Consumers convert to float32 where they
        need it: greedy argmax does not. Steps of 1-3 logit rows take the decode-layers
        kernel's products where it runs (they stream the weight faster than oneDNN's at one
        row), except where the AMX kernel runs (bf16 on AMX CPUs): it keeps the few-row
        matmuls it was measured on."""
        tied = self.config.tie_word_embeddings
        native = self.model.native_decode
        weight = self.model.embed_tokens.weight if tied else self.lm_head.weight
        if native is not None and self.amx is None and native.serves_logits(hidden, weight):
            return native.logits(hidden, weight)
        if not tied:
            logits = self.lm_head(hidden)
        else:
            logits = linear(hidden, self.model.embed_tokens.weight,
                            self.packed_output_embedding, amx=self.amx)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather_columns(logits)[:, : self.config.vocab_size]


def _checkpoint_slots(model: nn.Module) -> dict[str, WeightSlot]:
    """Every parameter under its own name, except fused ones: each of their parts under the
    part's name (rows 0..q_size of `layers.0.self_attn.qkv_proj.weight` are checkpoint
    tensor `layers.0.self_attn.q_proj.weight`). Sharded modules record their part."""
    slots: dict[str, WeightSlot] = {}
    for name, param in model.named_parameters():
        owner, _, kind = name.rpartition(".")
        module = model.get_submodule(owner)
        if isinstance(module, FusedLinear):
            parent = owner.rpartition(".")[0]
            for part, rows in module.part_rows().items():
                shard = module.parts[part]
                shape = (shard.total, *param.shape[1:])
                slots[f"{parent}.{part}.{kind}"] = WeightSlot(
                    name, shape, rows, None if shard.whole else shard)
        else:
            slots[name] = _slot(name, tuple(param.shape), getattr(module, "shard", None))
    return slots


def _slot(name: str, shape: tuple[int, ...], shard: Shard | None) -> WeightSlot:
    """A parameter holding `shard` of its checkpoint tensor (rows beyond it are padding)."""
    if shard is None or (shard.whole and shard.length == shape[shard.dim]):
        return WeightSlot(name, shape)
    whole = tuple(shard.total if d == shard.dim else size for d, size in enumerate(shape))
    rows = slice(0, shard.length) if shard.dim == 0 else None
    return WeightSlot(name, whole, rows, shard)
