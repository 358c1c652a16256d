"""Chapter 5's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make (the seed listing's ``loss / k`` among them), each
with a phrase the verdict must contain.
"""

import math

import torch
import torch.nn.functional as F

from solutions.quant import NF4_CODE

# --------------------------------------------------------------------------- absmax_quantize


def quantize_loop_half_away(w, block_size=None):
    """Correct: a loop over blocks, rounding half away from zero, scale 1 for a block of zeros, q in w's shape."""
    flat = w.detach().float().flatten()
    size = flat.numel() if block_size is None else block_size
    qs, scales = [], []
    for start in range(0, flat.numel(), size):
        block = flat[start:start + size]
        m = block.abs().max()
        s = m / 127 if m > 0 else torch.tensor(1.0)
        x = block / s
        qs.append(torch.sign(x) * torch.floor(x.abs() + 0.5))
        scales.append(s)
    q = torch.cat(qs).to(torch.int8)
    scale = torch.stack(scales).float()
    if block_size is None:
        return q.view(w.shape), scale.reshape(())
    return q, scale


def quantize_pad_eps(w, block_size=None):
    """Correct: pad to whole blocks, multiply by 127 / absmax with a tiny floor on absmax, scale of shape (1,)."""
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    size = n if block_size is None else block_size
    pad = (-n) % size
    blocks = F.pad(flat, (0, pad)).view(-1, size)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    q = torch.round(blocks * (127 / absmax)).clamp(-127, 127).to(torch.int8).flatten()[:n]
    return q, (absmax / 127).flatten()


def _blockwise(w, block_size, make_scale, to_int):
    flat = w.detach().float().flatten()
    size = flat.numel() if block_size is None else block_size
    qs, scales = [], []
    for start in range(0, flat.numel(), size):
        block = flat[start:start + size]
        s = make_scale(block)
        s = s if s > 0 else torch.tensor(1.0)
        qs.append(to_int(block / s))
        scales.append(s)
    scale = torch.stack(scales).float()
    return torch.cat(qs), (scale.reshape(()) if block_size is None else scale)


def quantize_scale_from_mean(w, block_size=None):
    """Wrong: the scale from the mean |w|, values clipped into range."""
    return _blockwise(w, block_size, lambda b: b.abs().mean() / 127,
                      lambda x: torch.round(x).clamp(-127, 127).to(torch.int8))


def quantize_truncates(w, block_size=None):
    """Wrong: .to(torch.int8) truncates towards zero instead of rounding."""
    return _blockwise(w, block_size, lambda b: b.abs().max() / 127, lambda x: x.to(torch.int8))


def quantize_floor(w, block_size=None):
    """Wrong: floor instead of round."""
    return _blockwise(w, block_size, lambda b: b.abs().max() / 127, lambda x: torch.floor(x).to(torch.int8))


def quantize_range_128(w, block_size=None):
    """Wrong: scale = max / 128, so max|w| maps to 128, which int8 cannot hold."""
    return _blockwise(w, block_size, lambda b: b.abs().max() / 128,
                      lambda x: torch.round(x).clamp(-128, 127).to(torch.int8))


def quantize_one_scale_for_all_blocks(w, block_size=None):
    """Wrong: the whole tensor's absmax used for every block."""
    flat = w.detach().float().flatten()
    m = flat.abs().max()
    s = m / 127 if m > 0 else torch.tensor(1.0)
    q = torch.round(flat / s).to(torch.int8)
    if block_size is None:
        return q, s.reshape(())
    return q, s.repeat(math.ceil(flat.numel() / block_size))


def quantize_reciprocal_scale(w, block_size=None):
    """Wrong: returns the quantization constant 127 / max instead of the scale max / 127."""
    q, scale = quantize_loop_half_away(w, block_size)
    return q.flatten(), 1 / scale


def quantize_rows_as_blocks(w, block_size=None):
    """Wrong: view(-1, block_size), which needs the size to divide the tensor."""
    if block_size is None:
        return quantize_loop_half_away(w)
    blocks = w.detach().float().view(-1, block_size)
    scale = blocks.abs().amax(1) / 127
    return torch.round(blocks / scale[:, None]).to(torch.int8).flatten(), scale


def quantize_float_codes(w, block_size=None):
    """Wrong: q left as float."""
    q, scale = quantize_loop_half_away(w, block_size)
    return q.float().flatten(), scale


# --------------------------------------------------------------------------- absmax_dequantize


def dequantize_repeat(q, scale, shape, block_size=None):
    """Correct: repeat_interleave the scales, cut to length."""
    q = q.flatten().to(torch.float32)
    if block_size is None:
        return (q * scale).view(shape)
    per_element = scale.repeat_interleave(block_size)[:q.numel()]
    return (q * per_element).reshape(shape)


def dequantize_loop(q, scale, shape, block_size=None):
    """Correct: a loop over blocks, in float64, then float32."""
    q = q.flatten().double()
    size = q.numel() if block_size is None else block_size
    s = scale.double().flatten()
    parts = [q[i:i + size] * s[k] for k, i in enumerate(range(0, q.numel(), size))]
    return torch.cat(parts).float().reshape(tuple(shape))


def dequantize_divides(q, scale, shape, block_size=None):
    """Wrong: divides by the scale."""
    q = q.flatten().float()
    if block_size is None:
        return (q / scale).view(shape)
    return (q / scale.repeat_interleave(block_size)[:q.numel()]).reshape(shape)


def dequantize_view_blocks(q, scale, shape, block_size=None):
    """Wrong: view(-1, block_size), which needs the size to divide the tensor."""
    q = q.flatten().float()
    if block_size is None:
        return (q * scale).view(shape)
    return (q.view(-1, block_size) * scale[:, None]).reshape(shape)


def dequantize_first_scale(q, scale, shape, block_size=None):
    """Wrong: every element multiplied by the first block's scale."""
    return (q.flatten().float() * scale.flatten()[0]).reshape(shape)


def dequantize_flat(q, scale, shape, block_size=None):
    """Wrong: the original shape not restored."""
    q = q.flatten().float()
    if block_size is None:
        return q * scale
    return q * scale.repeat_interleave(block_size)[:q.numel()]


# --------------------------------------------------------------------------- nf4_quantize


def nf4_bucketize(w, block_size=64):
    """Correct: compare with the midpoints between neighbouring NF4 values (as bitsandbytes' kernel does)."""
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block_size
    blocks = F.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    x = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[:, None]
    midpoints = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    codes = torch.bucketize(x, midpoints)
    return codes.flatten()[:n].to(torch.uint8), absmax


def nf4_loop(w, block_size=64):
    """Correct: a loop over blocks, argmin of the distance, int64 codes."""
    flat = w.detach().double().flatten()
    code = NF4_CODE.double()
    codes, absmax = [], []
    for start in range(0, flat.numel(), block_size):
        block = flat[start:start + block_size]
        m = block.abs().max()
        x = block / m if m > 0 else block
        codes.append((x[:, None] - code).abs().argmin(dim=1))
        absmax.append(m)
    return torch.cat(codes), torch.stack(absmax).float()


def nf4_per_tensor_absmax(w, block_size=64):
    """Wrong: one absmax for the whole tensor, repeated for every block."""
    flat = w.detach().float().flatten()
    m = flat.abs().max()
    codes = (flat[:, None] / m - NF4_CODE).abs().argmin(dim=1)
    return codes.to(torch.uint8), m.repeat(math.ceil(flat.numel() / block_size))


def nf4_std_normalised(w, block_size=64):
    """Wrong: each block divided by its standard deviation (NF4 is defined on [-1, 1] after absmax)."""
    flat = w.detach().float().flatten()
    codes, scales = [], []
    for start in range(0, flat.numel(), block_size):
        block = flat[start:start + block_size]
        s = block.std() if block.numel() > 1 and block.std() > 0 else torch.tensor(1.0)
        codes.append((block[:, None] / s - NF4_CODE).abs().argmin(dim=1))
        scales.append(s)
    return torch.cat(codes).to(torch.uint8), torch.stack(scales)


def nf4_uniform_grid(w, block_size=64):
    """Wrong: 16 evenly spaced levels on [-1, 1] (int4-like) instead of the NF4 values."""
    _, absmax = nf4_bucketize(w, block_size)
    flat = w.detach().float().flatten()
    idx = torch.arange(flat.numel()) // block_size
    x = flat / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[idx]
    return torch.round((x + 1) * 7.5).clamp(0, 15).to(torch.uint8), absmax


def nf4_searchsorted(w, block_size=64):
    """Wrong: searchsorted gives the first value >= x, not the nearest one."""
    _, absmax = nf4_bucketize(w, block_size)
    flat = w.detach().float().flatten()
    idx = torch.arange(flat.numel()) // block_size
    x = flat / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[idx]
    return torch.searchsorted(NF4_CODE, x.contiguous()).clamp(max=15).to(torch.uint8), absmax


def nf4_not_normalised(w, block_size=64):
    """Wrong: w compared with the NF4 values without dividing by the block's absmax."""
    _, absmax = nf4_bucketize(w, block_size)
    flat = w.detach().float().flatten()
    return (flat[:, None] - NF4_CODE).abs().argmin(dim=1).to(torch.uint8), absmax


def nf4_nan_on_zero_block(w, block_size=64):
    """Wrong: 0 / 0 in a block of zeros; argmin over NaN distances picks code 0 (-1.0)."""
    flat = w.detach().float().flatten()
    n = flat.numel()
    blocks = F.pad(flat, (0, (-n) % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    x = blocks / absmax[:, None]
    codes = (x[..., None] - NF4_CODE).abs().nan_to_num(nan=0.0).argmin(dim=-1)
    return codes.flatten()[:n].to(torch.uint8), absmax


# --------------------------------------------------------------------------- accumulate_gradients


def accumulate_count_first(model, loss_fn, batches):
    """Correct: count the items in a no-grad pass first, then backward loss · n / N for each batch."""
    with torch.no_grad():
        total = sum(int(loss_fn(model, b)[1]) for b in batches)
    value = 0.0
    for b in batches:
        loss, n = loss_fn(model, b)
        (loss * n / total).backward()
        value += loss.item() * n / total
    return value


def accumulate_one_backward(model, loss_fn, batches):
    """Correct: keep the sums, one backward of the weighted mean at the end, a tensor returned."""
    model.zero_grad(set_to_none=True)
    sums, counts = [], []
    for b in batches:
        loss, n = loss_fn(model, b)
        sums.append(loss * n)
        counts.append(n)
    mean = torch.stack(sums).sum() / sum(counts)
    mean.backward()
    return mean.detach()


def accumulate_seed_style(model, loss_fn, batches):
    """Wrong (the seed listing): each micro-batch's mean divided by the number of micro-batches."""
    k = len(batches)
    total = 0.0
    for b in batches:
        loss, _ = loss_fn(model, b)
        (loss / k).backward()
        total += loss.item() / k
    return total


def accumulate_without_division(model, loss_fn, batches):
    """Wrong: the means added up."""
    total = 0.0
    for b in batches:
        loss, _ = loss_fn(model, b)
        loss.backward()
        total += loss.item()
    return total


def accumulate_sums_not_divided(model, loss_fn, batches):
    """Wrong: weighted by n but never divided by the total."""
    total = 0.0
    for b in batches:
        loss, n = loss_fn(model, b)
        (loss * n).backward()
        total += loss.item() * n
    return total


def accumulate_zero_grad_inside(model, loss_fn, batches):
    """Wrong: zero_grad at every micro-batch keeps only the last one."""
    total, count = 0.0, 0
    for b in batches:
        model.zero_grad()
        loss, n = loss_fn(model, b)
        loss.backward()
        total += loss.item() * n
        count += n
    return total / count


def accumulate_and_step(model, loss_fn, batches):
    """Wrong: steps an optimizer inside (the function must only leave the gradient)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    value = accumulate_count_first(model, loss_fn, batches)
    opt.step()
    return value


def accumulate_returns_mean_of_means(model, loss_fn, batches):
    """Wrong: the gradient is right, but the returned loss is the unweighted mean of the micro-batch means."""
    accumulate_count_first(model, loss_fn, batches)
    with torch.no_grad():
        means = [loss_fn(model, b)[0].item() for b in batches]
    return sum(means) / len(means)


CORRECT = {
    "absmax_quantize": [quantize_loop_half_away, quantize_pad_eps],
    "absmax_dequantize": [dequantize_repeat, dequantize_loop],
    "nf4_quantize": [nf4_bucketize, nf4_loop],
    "accumulate_gradients": [accumulate_count_first, accumulate_one_backward],
}

WRONG = {
    "absmax_quantize": [
        (quantize_scale_from_mean, "平均"),
        (quantize_truncates, "切り捨て"),
        (quantize_floor, "floor"),
        (quantize_range_128, "[-127, 127]"),
        (quantize_one_scale_for_all_blocks, "すべてのブロックが同じ scale"),
        (quantize_reciprocal_scale, "逆数"),
        (quantize_rows_as_blocks, "最後のブロックは短く"),
        (quantize_float_codes, "torch.int8"),
    ],
    "absmax_dequantize": [
        (dequantize_divides, "割っています"),
        (dequantize_view_blocks, "最後のブロックは短く"),
        (dequantize_first_scale, "最初のブロックの scale"),
        (dequantize_flat, "形状"),
    ],
    "nf4_quantize": [
        (nf4_per_tensor_absmax, "すべてのブロックが同じ値"),
        (nf4_std_normalised, "max|w|"),
        (nf4_uniform_grid, "いちばん近い"),
        (nf4_searchsorted, "searchsorted"),
        (nf4_not_normalised, "いちばん近い"),
        (nf4_nan_on_zero_block, "0.0 の番号"),
    ],
    "accumulate_gradients": [
        (accumulate_seed_style, "loss / K"),
        (accumulate_without_division, "割っていません"),
        (accumulate_sums_not_divided, "N で割って"),
        (accumulate_zero_grad_inside, "zero_grad"),
        (accumulate_and_step, "更新"),
        (accumulate_returns_mean_of_means, "戻り値は全体の平均の損失"),
    ],
}
