"""Chapter 5: quantization and memory-efficient training (reference answers and lab code).

The reference answers (absmax int8 per tensor and per block, NF4, gradient accumulation over
unequal micro-batches) are written to be read: the loops a reader would write, vectorised only
where it stays obvious. The lab code loads the chapter's small Llama in every precision through
transformers' ``BitsAndBytesConfig``, counts the bytes each form really keeps, and builds the
QLoRA model with peft. bitsandbytes, transformers and peft are imported where they are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import lora

# =======================================================================================
# absmax (int8) quantization, per tensor and per block


def absmax_quantize(w: torch.Tensor, block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax による対称な int8 の量子化: scale = max|w| / 127、q = round(w / scale)。

    q は int8 で平らにした形状 (w.numel(),)、値は [-127, 127]。scale は float32 で、block_size=None なら
    テンソル全体で 1 つ（形状 ()）、整数なら平らにした w の block_size 個ずつのブロックごとに 1 つ
    （形状 (ブロックの数,)、最後のブロックは短くてもよい）。0 だけのブロックは scale = 0、q = 0。
    """
    flat = w.detach().reshape(-1).float()                       # BF16 なども FP32 にしてから計算
    if block_size is None:
        scale = flat.abs().max() / 127                          # 形状 ()
        safe = scale if scale > 0 else torch.ones_like(scale)   # 0 だけのテンソルで 0 で割らない
        q = torch.round(flat / safe)
    else:
        n_blocks = -(-flat.numel() // block_size)               # 切り上げ
        padded = flat.new_zeros(n_blocks * block_size)          # 最後のブロックの残りは 0（max|w| を変えない）
        padded[:flat.numel()] = flat
        blocks = padded.view(n_blocks, block_size)              # (n_blocks, block_size)
        scale = blocks.abs().amax(dim=1) / 127                  # (n_blocks,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe[:, None]).reshape(-1)[:flat.numel()]
    return q.clamp(-127, 127).to(torch.int8), scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, shape, block_size: int | None = None) -> torch.Tensor:
    """absmax_quantize の逆: w_hat = q · scale（要素ごとに、その要素のブロックの scale）。float32、形状 shape。"""
    flat = q.reshape(-1).float()
    if block_size is None:
        return (flat * scale.float()).reshape(shape)
    block_of = torch.arange(flat.numel(), device=flat.device) // block_size   # 各要素のブロックの番号
    return (flat * scale.float()[block_of]).reshape(shape)


# =======================================================================================
# NF4: 4-bit NormalFloat (Dettmers et al., 2023)

#: bitsandbytes' offset for the extreme quantiles: 1 - (1/30 + 1/32) / 2, the mean of the centres of
#: the outermost of 15 and of 16 equal-probability bins. Using it, ±1 are the largest values after normalisation.
NF4_OFFSET = 1 - 0.5 * (1 / 30 + 1 / 32)


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1), 8 on the positive side and 7 on the negative side
    plus an exact 0, normalised to [-1, 1] (sorted, float32)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])   # 8 values > 0
    negative = -normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()


NF4_CODE = nf4_code()


def nf4_quantize(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 による 4 ビットの量子化: ブロックごとに max|w|（absmax）で割り、いちばん近い NF4 の値の番号を選びます。

    codes は uint8 で 0〜15（NF4_CODE の添字）、平らにした形状 (w.numel(),)。absmax は float32 で
    形状 (ブロックの数,)。0 だけのブロックは absmax = 0 で、すべての要素が 0.0 の番号になります。
    """
    flat = w.detach().reshape(-1).float()
    n_blocks = -(-flat.numel() // block_size)                   # 切り上げ
    padded = flat.new_zeros(n_blocks * block_size)              # 最後のブロックの残りは 0
    padded[:flat.numel()] = flat
    blocks = padded.view(n_blocks, block_size)                  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)                           # (n_blocks,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    x = blocks / safe[:, None]                                  # [-1, 1] に正規化
    code = NF4_CODE.to(flat.device)                             # (16,)
    codes = (x[..., None] - code).abs().argmin(dim=-1)          # (n_blocks, block_size): いちばん近い値
    return codes.reshape(-1)[:flat.numel()].to(torch.uint8), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape, block_size: int = 64) -> torch.Tensor:
    flat = NF4_CODE.to(codes.device)[codes.reshape(-1).long()]
    idx = torch.arange(flat.numel(), device=flat.device) // block_size
    return (flat * absmax.float()[idx]).reshape(shape)


def double_quantize(absmax: torch.Tensor, block_size: int = 256):
    """Double quantization, the idea in its simplest form: the per-block absmax constants (float32)
    minus their mean, quantized again with absmax int8 in blocks of ``block_size``.

    Returns (q, scale, mean); ``double_dequantize`` inverts it. (bitsandbytes quantizes them with
    its non-linear 8-bit "dynamic" code instead of a linear int8 grid; the bytes are the same.)
    """
    mean = absmax.float().mean()
    q, scale = absmax_quantize(absmax.float() - mean, block_size)
    return q, scale, mean


def double_dequantize(q, scale, mean, n: int, block_size: int = 256) -> torch.Tensor:
    return absmax_dequantize(q, scale, (n,), block_size) + mean


def bits_per_parameter(block_size: int = 64, double_quant: bool = False, block_size2: int = 256,
                       bits: int = 4) -> float:
    """Storage per weight: the code plus its share of the block constants (Dettmers et al., 2023, §3)."""
    if not double_quant:
        return bits + 32 / block_size
    return bits + 8 / block_size + 32 / (block_size * block_size2)


def relative_error(w_hat: torch.Tensor, w: torch.Tensor) -> float:
    """‖w_hat - w‖ / ‖w‖ (Frobenius), in float64."""
    w = w.detach().double()
    return ((w_hat.detach().double() - w).norm() / w.norm()).item()


# =======================================================================================
# Gradient accumulation


def token_loss(model, batch):
    """(mean next-token loss over the batch's answer tokens, number of those tokens)."""
    x, y = batch
    return lora.lm_loss(model, x, y), int((y[:, 1:] != -100).sum())


def accumulate_gradients(model: nn.Module, loss_fn, batches) -> float:
    """すべてのマイクロバッチをまとめた 1 つのバッチの平均の損失の勾配を .grad に残し、その損失を返します。

    最適化手法のステップは呼びません（パラメータは変えない）。

    loss_fn(model, batch) は (そのマイクロバッチの平均の損失, 数えた要素の数 n) を返します。
    平均の損失 × n は、そのマイクロバッチの要素の損失の和です。和の勾配を .grad に足し込み、
    最後に全体の要素の数 N で 1 回割れば、マイクロバッチの大きさがばらばらでも全体の平均の勾配になります。
    """
    total_loss, total_items = 0.0, 0
    for batch in batches:
        loss, n = loss_fn(model, batch)
        n = int(n)
        (loss * n).backward()                  # このマイクロバッチの損失の和の勾配を足し込む
        total_loss += loss.item() * n
        total_items += n
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(total_items)           # 和の勾配 → 全体の平均の勾配
    return total_loss / total_items


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter's .grad, by name (parameters without a gradient left out)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_gradient_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(largest absolute difference, the same relative to the largest gradient entry) over all parameters."""
    assert set(a) == set(b), "the two gradients have different parameters"
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    scale = max(b[k].double().abs().max().item() for k in b)
    return diff, diff / scale


# =======================================================================================
# Where the memory goes


@dataclass(frozen=True)
class Recipe:
    """Bytes per parameter of one training setup: weights, gradients and optimizer state
    (the FP32 master copy of mixed precision counted with the optimizer state, as in ZeRO).

    ``weight`` applies to the linear layers of the decoder layers (what bitsandbytes quantizes) and
    ``other_weight`` (default: the same) to everything else: embeddings, lm_head and norms, which
    QLoRA keeps unquantized and prepare_model_for_kbit_training casts to FP32.
    ``trainable`` says which parameters have gradients and optimizer state: "all" or "lora".
    """

    name: str
    weight: float
    gradient: float
    optimizer: float
    trainable: str = "all"
    other_weight: float | None = None

    def bytes(self, n_params: int, n_lora: int = 0, n_linear: int | None = None) -> dict[str, float]:
        n_linear = n_params if n_linear is None else n_linear
        other = self.weight if self.other_weight is None else self.other_weight
        n_train = n_params if self.trainable == "all" else n_lora
        weights = self.weight * n_linear + other * (n_params - n_linear)
        weights += 4 * n_lora if self.trainable == "lora" else 0        # LoRA's A and B in FP32
        return {"weights": weights, "gradients": self.gradient * n_train, "optimizer": self.optimizer * n_train}


NF4_DQ_BYTES = bits_per_parameter(64, double_quant=True) / 8

RECIPES = (
    Recipe("FP32 の重み + AdamW", 4, 4, 8),
    Recipe("混合精度（BF16 + FP32 のマスター重み）+ AdamW", 2, 2, 4 + 8),
    Recipe("混合精度 + AdamW8bit", 2, 2, 4 + 2),
    Recipe("BF16 の凍結した重み + LoRA（FP32、AdamW）", 2, 4, 8, trainable="lora"),
    Recipe("NF4 + 二重量子化の凍結した重み + LoRA（QLoRA。埋め込み・lm_head は FP32）", NF4_DQ_BYTES, 4, 8,
           trainable="lora", other_weight=4),
)


def linear_parameters(shape: lora.DecoderShape) -> int:
    """The parameters of the linear layers inside the decoder layers (the ones QLoRA quantizes)."""
    return shape.n_layers * sum(i * o for i, o in shape.linear_shapes().values())


def zero_bytes_per_parameter(stage: int, n_gpus: int, weight=2, gradient=2, optimizer=12) -> float:
    """Mixed-precision AdamW bytes per parameter on each of ``n_gpus`` GPUs under ZeRO (Rajbhandari et al., 2020):
    stage 0 = plain data parallelism (everything replicated), 1 shards the optimizer state, 2 also the
    gradients, 3 also the weights. FSDP's FULL_SHARD corresponds to stage 3."""
    sharded = {0: (), 1: ("o",), 2: ("o", "g"), 3: ("o", "g", "w")}[stage]
    return sum(v / n_gpus if k in sharded else v for k, v in (("w", weight), ("g", gradient), ("o", optimizer)))


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing on a transformers model, non-reentrant. transformers 5 renamed
    gradient_checkpointing_enable to activation_checkpointing_enable (the old name is deprecated for v6);
    this uses whichever the installed version has."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# =======================================================================================
# Bytes a model really keeps


def _tensor_bytes(t: torch.Tensor | None, seen: set) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
    if key in seen:                         # a table shared by several layers is counted once
        return 0
    seen.add(key)
    return t.numel() * t.element_size()


def _quant_state_bytes(state, seen: set) -> tuple[int, int]:
    """(the block constants: absmax and, with double quantization, the second-level ones; the code tables)."""
    if state is None:
        return 0, 0
    constants, tables = _tensor_bytes(state.absmax, seen), _tensor_bytes(state.code, seen)
    if getattr(state, "nested", False):
        constants += _tensor_bytes(state.state2.absmax, seen) + _tensor_bytes(state.offset, seen)
        tables += _tensor_bytes(state.state2.code, seen)
    return constants, tables


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes layer itself (peft's LoRA wrapper around one has the same class name but is not one)."""
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def storage_bytes(model: nn.Module, names=lora.ALL_LINEAR) -> dict[str, int]:
    """Bytes the model keeps, in three parts: the linear layers of the blocks (``names``; the ones that
    bitsandbytes quantizes) with their quantization constants, the code tables of those layers (16 or
    256 values per layer, a fixed cost that does not grow with the layer), and everything else
    (embeddings, norms, lm_head). Nothing is counted twice."""
    seen: set = set()
    out = {"linear_layers": 0, "code_tables": 0, "other": 0}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        part = "linear_layers" if lora.name_matches(name, names) else "other"
        for t in own:
            out[part] += _tensor_bytes(t, seen)
            constants, tables = _quant_state_bytes(getattr(t, "quant_state", None), seen)
            out[part] += constants + _tensor_bytes(getattr(t, "SCB", None), seen)  # Linear8bitLt: a scale per row
            out["code_tables"] += tables
    return out


# =======================================================================================
# Loading the chapter's model in each precision (transformers' BitsAndBytesConfig)

PRECISIONS = ("fp32", "bf16", "int8", "fp4", "nf4", "nf4-dq")


def quantization_config(kind: str, compute_dtype=torch.float32):
    """The BitsAndBytesConfig for one of ``PRECISIONS`` (None for fp32 and bf16)."""
    from transformers import BitsAndBytesConfig

    if kind in ("fp32", "bf16"):
        return None
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    quant_type = "fp4" if kind == "fp4" else "nf4"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=kind == "nf4-dq", bnb_4bit_compute_dtype=compute_dtype)


def load_in(source, kind: str, device="cpu", compute_dtype=torch.float32, dtype="auto"):
    """The model saved at ``source`` (a directory or a Hub name) loaded in one of ``PRECISIONS``.

    Quantized weights are placed on ``device`` while loading (``device_map``), as bitsandbytes needs;
    ``dtype`` is the dtype of the parameters that stay unquantized ("auto": as saved)."""
    from transformers import AutoModelForCausalLM

    config = quantization_config(kind, compute_dtype)
    if config is None:
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=dtype,
                                                 device_map={"": torch.device(device)})
    return keep_gpu_layout(model)


def keep_gpu_layout(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes' CPU repacking of 4-bit layers; returns the same module.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its own kernel at the first
    forward in eval mode: double quantization undone, absmax cast to BF16, in_features a multiple of
    64 required. Keeping the layout (and the numerics) that a GPU uses makes the CPU results comparable.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def qlora_model(source, r: int, targets=lora.ALL_LINEAR, device="cpu", compute_dtype=torch.float32,
                gradient_checkpointing: bool = False, seed: int = 0):
    """QLoRA: the base model in NF4 with double quantization, prepared by peft, LoRA on ``targets``
    (alpha = 2r, as in chapter 4)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_in(source, "nf4-dq", device, compute_dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets))
    return get_peft_model(model, config)


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The FP32 weight each 4-bit layer computes with, by the layer's name (bitsandbytes' own dequantization)."""
    import bitsandbytes.functional as bnbF

    return {name: bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state).float().cpu()
            for name, m in model.named_modules() if is_quantized_linear(m) and hasattr(m.weight, "quant_state")}


def lora_model(source, r: int, targets=lora.ALL_LINEAR, device="cpu", seed: int = 0, rounded_to: str | None = None):
    """The same LoRA with peft on the FP32 base (the comparison for QLoRA).

    ``rounded_to="nf4-dq"`` first replaces the FP32 weights of the quantized layers by the values
    their 4-bit form stands for: the starting point of QLoRA, computed in FP32.
    """
    from peft import LoraConfig, get_peft_model

    model = load_in(source, "fp32", "cpu")
    if rounded_to is not None:
        rounded = dequantized_weights(load_in(source, rounded_to, "cpu"))
        with torch.no_grad():
            for name, w in rounded.items():
                model.get_submodule(name).weight.copy_(w.view_as(model.get_submodule(name).weight))
    model = model.to(device)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets))
    return get_peft_model(model, config)


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the packed weights of every bitsandbytes layer (to check that training leaves them alone)."""
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if is_quantized_linear(m)}


# =======================================================================================
# Results files of the DDP run (written by solutions.ddp_demo)


def read_ddp_result(out_dir) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(timings and settings, {"naive": grads, "token_weighted": grads}) written by rank 0."""
    from pathlib import Path

    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    info = json.loads((out_dir / "ddp_result.json").read_text(encoding="utf-8"))
    grads = {k: load_file(out_dir / f"grads_{k}.safetensors") for k in ("naive", "token_weighted")}
    return info, grads
