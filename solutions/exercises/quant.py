"""Chapter 5's exercises: their registrations and the tests that grade a reader's answer.

The quantization tests compare what comes back (codes and scales) with the reference on
random tensors, tensors with outliers, blocks that do not divide the tensor and blocks of
zeros; near a rounding tie either neighbour is accepted, so round-half-to-even and
round-half-away-from-zero both pass. The accumulation tests compare the gradients left in
``.grad`` with the gradient of one big batch, on micro-batches of unequal size and on a masked
loss whose token counts differ, and name the usual mistakes by the gradient they produce.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from ..checker import CheckFailed, call_without_mutation, expect_tensor, expect_tuple, register
from ..quant import NF4_CODE, absmax_dequantize, absmax_quantize, accumulate_gradients, nf4_quantize

CHAPTER = "05_quantization"


def _tensor(shape, seed, outlier=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    if outlier is not None:
        w.view(-1)[outlier] = 3.0           # one large weight, as in real LLM layers
    return w.to(dtype)


def _n_blocks(n, block_size):
    return 1 if block_size is None else math.ceil(n / block_size)


def _call_quantize(answer, w, block_size, name="absmax_quantize"):
    try:
        out = call_without_mutation(answer, w) if block_size is None else call_without_mutation(answer, w, block_size)
    except (CheckFailed, NotImplementedError):
        raise
    except Exception as e:
        where = "block_size=None（テンソルごと）" if block_size is None else f"block_size={block_size}"
        hint = "" if block_size is None else "要素数が block_size で割り切れないとき、最後のブロックは短くなります。"
        raise CheckFailed(f"{name} が形状 {tuple(w.shape)}・{where} で {type(e).__name__} を出しました（{e}）。"
                          + hint) from None
    return expect_tuple(out, f"{name} の戻り値", 2)


def _flat_codes(q, n, name, dtype=None):
    q = expect_tensor(q, name)
    if dtype is not None and q.dtype != dtype:
        raise CheckFailed(f"{name} の dtype は {dtype} のはずですが {q.dtype} でした。")
    if q.is_floating_point():
        raise CheckFailed(f"{name} が浮動小数点数（{q.dtype}）です。整数のテンソルにしてください。")
    if q.numel() != n:
        raise CheckFailed(f"{name} の要素数は {n}（w と同じ）のはずですが {q.numel()} でした。")
    return q.reshape(-1).long()


def _scales(scale, n_blocks, block_size, name="scale"):
    scale = expect_tensor(scale, name)
    if scale.dtype != torch.float32:
        raise CheckFailed(f"{name} の dtype は torch.float32 のはずですが {scale.dtype} でした。")
    if block_size is None:
        if scale.numel() != 1:
            raise CheckFailed(f"block_size=None のとき {name} はテンソル全体で 1 つ（形状 ()）のはずですが、"
                              f"形状 {tuple(scale.shape)} でした。")
    elif tuple(scale.shape) != (n_blocks,):
        one = " テンソル全体で 1 つの scale を使っていませんか。" if scale.numel() == 1 else ""
        raise CheckFailed(f"block_size={block_size} のとき {name} はブロックごとに 1 つ、"
                          f"形状 ({n_blocks},) のはずですが、形状 {tuple(scale.shape)} でした"
                          f"（要素数 ÷ block_size の切り上げ）。{one}")
    return scale.reshape(-1).double()


def _block_absmax(w, block_size):
    """max|w| per block by a plain loop (independent of the reference's padding)."""
    flat = w.detach().reshape(-1).double()
    if block_size is None:
        return flat.abs().max().reshape(1)
    return torch.stack([flat[i:i + block_size].abs().max() for i in range(0, flat.numel(), block_size)])


def _diagnose_scale(got, w, block_size):
    """A hint that names the usual wrong scale, from the values that came back."""
    flat = w.detach().reshape(-1).double()
    chunks = [flat] if block_size is None else list(flat.split(block_size))
    absmax = torch.stack([c.abs().max() for c in chunks])
    nonzero = absmax > 0
    g, a = got[nonzero], absmax[nonzero]
    mean = torch.stack([c.abs().mean() for c in chunks])[nonzero]

    def near(x, y):
        return bool(torch.allclose(x, y, rtol=1e-4, atol=0))

    if near(g, mean / 127):
        return "max|w| ではなく |w| の平均から scale を作っていませんか。平均より大きい要素は範囲からはみ出します。"
    if near(g, a / 128) or near(g, a / 255) or near(g, a / 256):
        return ("int8 の範囲は対称な [-127, 127] に取ります。128 で割ると max|w| が 128 になり、int8 に収まりません"
                "（-128 は使いません）。")
    if near(g, 127 / a):
        return "scale は w ≈ q · scale となる向き（max|w| / 127）です。逆数になっていませんか。"
    if block_size is not None and torch.allclose(g, g[:1].expand_as(g)) and not near(a, a[:1].expand_as(a)):
        return ("すべてのブロックが同じ scale になっています。scale はブロックごとに、"
                "そのブロックの max|w| から作ります。")
    return "scale = max|w| / 127（ブロックごとなら、そのブロックの中の max|w|）です。"


def _compare_codes(q, w, scale_ref, block_size):
    """q must be round(w / scale) in [-127, 127]; near a tie either neighbour is accepted."""
    flat = w.detach().reshape(-1).double()
    idx = torch.arange(flat.numel()) // (flat.numel() if block_size is None else block_size)
    s = scale_ref[idx]
    x = torch.where(s > 0, flat / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(flat))
    if (q.abs() > 127).any():
        raise CheckFailed(f"q に範囲 [-127, 127] の外の値 {int(q[q.abs() > 127][0])} があります。")
    expected = torch.round(x)
    tie = (x.abs() - x.abs().floor() - 0.5).abs() < 1e-3
    ok = (q == expected) | (tie & ((q - x).abs() <= 0.5 + 1e-3))
    if ok.all():
        return
    i = int(torch.nonzero(~ok)[0])
    hint = "round(w / scale)（いちばん近い整数）にしてください。"
    near_integer = (x - torch.round(x)).abs() < 1e-3      # where rounding and truncation agree anyway
    if ((q == torch.trunc(x)) | near_integer).all():
        hint = ("0 の方向への切り捨てになっています（.to(torch.int8) や .int() は小数部を捨てます）。"
                "先に torch.round で"
                "丸めてください。切り捨てると誤差は scale/2 ではなく scale まで大きくなり、しかも 0 の側に偏ります。")
    elif ((q == torch.floor(x)) | near_integer).all():
        hint = "floor で切り下げています。torch.round で丸めてください（誤差が scale/2 以下になります）。"
    raise CheckFailed(f"q が round(w / scale) と一致しません（たとえば要素 {i}: w / scale = {x[i].item():.3f} に対して "
                      f"q = {int(q[i])}、期待値 {int(expected[i])}）。{hint}")


def _check_quantize(answer, w, block_size):
    n = w.numel()
    nb = _n_blocks(n, block_size)
    q, scale = _call_quantize(answer, w, block_size)
    q = _flat_codes(q, n, "q", dtype=torch.int8)
    scale = _scales(scale, nb, block_size)
    expected = _block_absmax(w, block_size) / 127
    nonzero = expected > 0
    if not torch.allclose(scale[nonzero], expected[nonzero], rtol=1e-5, atol=0):
        i = int(torch.nonzero(~torch.isclose(scale, expected, rtol=1e-5, atol=0) & nonzero)[0])
        raise CheckFailed(f"scale が max|w| / 127 と一致しません（ブロック {i} で期待値 {expected[i].item():.6g}、"
                          f"返った値 {scale[i].item():.6g}）。" + _diagnose_scale(scale, w, block_size))
    _compare_codes(q, w, expected, block_size)
    return q, scale


# =======================================================================================
# absmax_quantize

quantize_ex = register("absmax_quantize", "absmax による int8 量子化（テンソルごと・ブロックごと）",
                       chapter=CHAPTER, reference=absmax_quantize)


@quantize_ex.test("q は int8（要素数は w と同じ）、scale は float32（テンソルごとに 1 つ、またはブロックごとに 1 つ）")
def _(answer, reference):
    w = _tensor((3, 5), 0)
    for block_size in (None, 4):
        q, scale = _call_quantize(answer, w, block_size)
        _flat_codes(q, w.numel(), "q", dtype=torch.int8)
        _scales(scale, _n_blocks(w.numel(), block_size), block_size)


@quantize_ex.test("テンソルごと: scale = max|w| / 127、q = round(w / scale)（外れ値があっても）")
def _(answer, reference):
    for shape, seed, outlier in (((4, 6), 1, None), ((16, 8), 2, 37), ((7,), 3, None), ((1, 1), 4, None)):
        _check_quantize(answer, _tensor(shape, seed, outlier), None)


@quantize_ex.test("ブロックごと: 各ブロックの scale はそのブロックの max|w| / 127（最後のブロックが短くても）")
def _(answer, reference):
    for shape, block_size, outlier in (((8, 16), 16, 5), ((5, 13), 7, None), ((4, 64), 64, 100), ((3, 3), 64, None)):
        _check_quantize(answer, _tensor(shape, block_size, outlier), block_size)


@quantize_ex.test("0 だけのブロックや 0 だけのテンソルで NaN を出さない（q は 0）")
def _(answer, reference):
    w = _tensor((4, 8), 5)
    w[1] = 0.0                                  # elements 8..15: the second block of 8 is all zeros
    cases = ((w, 8), (torch.zeros(3, 4), None), (torch.zeros(10), 4))
    for x, block_size in cases:
        q, scale = _call_quantize(answer, x, block_size)
        q = _flat_codes(q, x.numel(), "q", dtype=torch.int8)
        scale = _scales(scale, _n_blocks(x.numel(), block_size), block_size)
        zeros = x.reshape(-1) == 0
        if (q[zeros] != 0).any():
            raise CheckFailed("w が 0 の要素の q が 0 になっていません。0 だけのブロックでは max|w| = 0 なので、"
                              "0 で割らないように場合分けしてください（scale は 0 にして、q は 0）。")
    _check_quantize(answer, w, 8)


@quantize_ex.test("w が BF16・FP16・FP64 でも、FP32 で計算した値と同じ（入力は書き換えない）")
def _(answer, reference):
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        _check_quantize(answer, _tensor((6, 10), 6, 17, dtype=dtype), 16)


# =======================================================================================
# absmax_dequantize

dequantize_ex = register("absmax_dequantize", "absmax の int8 からの復元", chapter=CHAPTER,
                         reference=absmax_dequantize)


def _call_dequantize(answer, q, scale, shape, block_size):
    try:
        out = call_without_mutation(answer, q, scale, shape, block_size)
    except (CheckFailed, NotImplementedError):
        raise
    except Exception as e:
        hint = "" if block_size is None else ("要素数が block_size で割り切れないとき、最後のブロックは短くなります"
                                              "（q.view(-1, block_size) はできません）。")
        raise CheckFailed(f"absmax_dequantize が形状 {tuple(shape)}・block_size={block_size} で {type(e).__name__} を"
                          f"出しました（{e}）。" + hint) from None
    out = expect_tensor(out, "absmax_dequantize の戻り値", shape=tuple(shape))
    if not out.is_floating_point():
        raise CheckFailed(f"戻り値が整数（{out.dtype}）です。q を float32 にしてから scale を掛けてください。")
    return out


def _check_dequantize(answer, w, block_size):
    q, scale = absmax_quantize(w, block_size)
    got = _call_dequantize(answer, q, scale, w.shape, block_size).double()
    flat_q = q.reshape(-1).double()
    idx = torch.arange(flat_q.numel()) // (flat_q.numel() if block_size is None else block_size)
    expected = (flat_q * scale.reshape(-1).double()[idx]).reshape(w.shape)
    if not torch.allclose(got, expected, rtol=1e-6, atol=1e-9):
        hint = "w_hat = q · scale（そのブロックの scale）です。"
        if torch.allclose(got.reshape(-1), (flat_q / scale.reshape(-1).double()[idx]), rtol=1e-5):
            hint = "scale で割っています。absmax_quantize で w / scale を丸めたので、戻すときは q · scale です。"
        elif block_size is not None and torch.allclose(got.reshape(-1), flat_q * scale.double()[0], rtol=1e-5):
            hint = "すべての要素に最初のブロックの scale を掛けています。要素 i のブロックは i // block_size です。"
        diff = (got - expected).abs()
        i = tuple(int(j) for j in torch.nonzero(diff == diff.max())[0])
        raise CheckFailed(f"復元した値が q · scale と一致しません（位置 {i} で期待値 {expected[i].item():.6g}、"
                          f"返った値 {got[i].item():.6g}）。{hint}")
    bound = (scale.reshape(-1).double()[idx] / 2).reshape(w.shape)
    if ((got - w.double()).abs() > bound + 1e-6).any():   # follows from the two checks above; kept as the property
        raise CheckFailed("往復の誤差 |w_hat - w| が scale/2 を超える要素があります。")


@dequantize_ex.test("テンソルごと: w_hat = q · scale を元の形状で返し、往復の誤差は各要素で scale/2 以下")
def _(answer, reference):
    for shape, seed, outlier in (((4, 6), 11, None), ((16, 8), 12, 3), ((9,), 13, None)):
        _check_dequantize(answer, _tensor(shape, seed, outlier), None)


@dequantize_ex.test("ブロックごと: 要素ごとにそのブロックの scale を掛ける（最後のブロックが短くても）")
def _(answer, reference):
    for shape, block_size in (((8, 16), 16), ((5, 13), 7), ((2, 3, 10), 4), ((3, 3), 64)):
        _check_dequantize(answer, _tensor(shape, block_size, 2), block_size)


@dequantize_ex.test("0 だけのブロック（scale = 0）は 0 に戻る")
def _(answer, reference):
    w = _tensor((4, 8), 14)
    w[2] = 0.0
    _check_dequantize(answer, w, 8)


# =======================================================================================
# nf4_quantize

nf4_ex = register("nf4_quantize", "NF4 による 4 ビット量子化", chapter=CHAPTER, reference=nf4_quantize)


def _call_nf4(answer, w, block_size):
    try:
        out = call_without_mutation(answer, w, block_size)
    except (CheckFailed, NotImplementedError):
        raise
    except Exception as e:
        raise CheckFailed(f"nf4_quantize が形状 {tuple(w.shape)}・block_size={block_size} で {type(e).__name__} を"
                          f"出しました（{e}）。") from None
    return expect_tuple(out, "nf4_quantize の戻り値", 2)


def _check_nf4(answer, w, block_size):
    n = w.numel()
    nb = _n_blocks(n, block_size)
    codes, absmax = _call_nf4(answer, w, block_size)
    codes = _flat_codes(codes, n, "codes")
    if codes.min() < 0 or codes.max() > 15:
        raise CheckFailed(f"codes は NF4 の 16 個の値の番号 0〜15 のはずですが、{int(codes.min())}〜{int(codes.max())} "
                          "の値がありました。")
    absmax = _scales(absmax, nb, block_size, name="absmax")
    expected_absmax = _block_absmax(w, block_size)
    if not torch.allclose(absmax, expected_absmax, rtol=1e-5, atol=0):
        same = torch.allclose(absmax, absmax[:1].expand_as(absmax))
        hint = " すべてのブロックが同じ値です。absmax はブロックごとに求めます。" if same else ""
        raise CheckFailed(f"absmax がブロックごとの max|w| と一致しません（期待値 {expected_absmax[:3].tolist()}…、"
                          f"返った値 {absmax[:3].tolist()}…）。{hint}")
    flat = w.detach().reshape(-1).double()
    idx = torch.arange(n) // block_size
    a = expected_absmax[idx]
    x = torch.where(a > 0, flat / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(flat))
    code = NF4_CODE.double()
    dist = (x[:, None] - code).abs()                                  # (n, 16)
    best = dist.min(dim=1).values
    ok = dist.gather(1, codes[:, None]).squeeze(1) <= best + 1e-6     # the nearest value (a tie: either)
    if not ok.all():
        i = int(torch.nonzero(~ok)[0])
        expected_code = int(dist[i].argmin())
        hint = "w / absmax に、NF4 の 16 個の値（NF4_CODE）のうちいちばん近いものの番号を選んでください。"
        if (a == 0).any() and (codes[a == 0] != int(code.abs().argmin())).any():
            hint = "0 だけのブロックでは、すべての要素が 0.0 の番号になるはずです。"
        elif torch.equal(codes, torch.searchsorted(code, x.contiguous()).clamp(max=15)):
            hint = ("torch.searchsorted は「x 以上の最初の値」の位置を返すので、いちばん近い値とは限りません。"
                    "隣り合う 2 つの値の中点と比べるか、距離の argmin を取ってください。")
        raise CheckFailed(f"codes がいちばん近い NF4 の値の番号になっていません（要素 {i}: "
                          f"w / absmax = {x[i].item():.4f}"
                          f"、期待値は番号 {expected_code}（{code[expected_code].item():.4f}）、返った番号は "
                          f"{int(codes[i])}（{code[int(codes[i])].item():.4f}））。{hint}")


@nf4_ex.test("codes は 0〜15 の整数（要素数は w と同じ）、absmax は float32 でブロックごとに 1 つ")
def _(answer, reference):
    w = _tensor((4, 16), 20)
    codes, absmax = _call_nf4(answer, w, 16)
    codes = _flat_codes(codes, w.numel(), "codes")
    _scales(absmax, 4, 16, name="absmax")


@nf4_ex.test("各要素が、w / absmax にいちばん近い NF4 の値の番号になる（正規分布の重み、外れ値、短い最後のブロック）")
def _(answer, reference):
    for shape, block_size, outlier in (((8, 64), 64, None), ((16, 32), 64, 40), ((5, 13), 16, None),
                                       ((3, 7), 64, None)):
        _check_nf4(answer, _tensor(shape, block_size + shape[0], outlier), block_size)


@nf4_ex.test("ブロックの max|w| の要素は ±1（番号 0 と 15）に、0 だけのブロックは 0.0 の番号になり、NaN を出さない")
def _(answer, reference):
    w = _tensor((4, 16), 21)
    w[2] = 0.0
    w[0, 3] = w[0].abs().max() * 2          # the block's absmax, positive: code 15
    w[1, 5] = -w[1].abs().max() * 2         # negative: code 0
    codes, _ = _call_nf4(answer, w, 16)
    codes = _flat_codes(codes, w.numel(), "codes")
    if int(codes[3]) != 15 or int(codes[16 + 5]) != 0:
        raise CheckFailed("ブロックの中で |w| が最大の要素は、w / absmax = ±1 なので番号 15（+1）か 0（-1）の"
                          "はずですが、"
                          f"番号 {int(codes[3])} と {int(codes[21])} でした。")
    zero = int(NF4_CODE.abs().argmin())
    if (codes[32:48] != zero).any():
        raise CheckFailed(f"0 だけのブロックのすべての要素は 0.0 の番号 {zero} のはずですが、"
                          f"{codes[32:48].tolist()} でした。max|w| = 0 のブロックでは 0 で割らないでください。")
    _check_nf4(answer, w, 16)


# =======================================================================================
# accumulate_gradients


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _sample_loss(model, batch):
    """The mean squared error over the batch's samples, and the number of samples."""
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1).mean(), len(x)


def _token_loss(model, batch):
    """A masked per-token loss, averaged over the unmasked tokens, and the number of those tokens."""
    x, y, mask = batch                       # x (B, T, 5), y (B, T, 3), mask (B, T) bool
    per_token = ((model(x) - y) ** 2).sum(dim=-1)
    return per_token[mask].mean(), int(mask.sum())


def _sample_batches(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64))
            for n in sizes]


def _token_batches(counts, seed, batch=2, length=6):
    """Batches of the same shape whose numbers of unmasked tokens are ``counts``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in counts:
        x = torch.randn(batch, length, 5, generator=g, dtype=torch.float64)
        y = torch.randn(batch, length, 3, generator=g, dtype=torch.float64)
        mask = torch.zeros(batch * length, dtype=torch.bool)
        mask[torch.randperm(batch * length, generator=g)[:c]] = True
        out.append((x, y, mask.view(batch, length)))
    return out


def _union(batches):
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))


def _grads(model):
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _close(a, b):
    return all(x is not None and torch.allclose(x, y, rtol=1e-9, atol=1e-12) for x, y in zip(a, b, strict=True))


def _diagnose_accumulation(got, model, loss_fn, batches):
    """Name the mistake by recomputing what the usual wrong versions leave in .grad."""
    per_batch, counts = [], []
    for b in batches:
        m = copy.deepcopy(model)
        m.zero_grad(set_to_none=True)
        loss, n = loss_fn(m, b)
        loss.backward()
        per_batch.append(_grads(m))
        counts.append(int(n))
    k, total = len(batches), sum(counts)

    def combo(weights):
        return [sum(w * g[i] for w, g in zip(weights, per_batch, strict=True)) for i in range(len(per_batch[0]))]

    if _close(got, combo([1.0] * k)):
        return ("各マイクロバッチの平均の損失の勾配を、そのまま足しています（割っていません）。"
                "勾配がマイクロバッチの数の分だけ大きくなります。")
    if _close(got, combo([1.0 / k] * k)):
        return ("各マイクロバッチの平均の損失を、マイクロバッチの数 K で割って足しています（loss / K）。"
                "これが全体の平均と一致するのは、どのマイクロバッチも数える要素の数が同じときだけです。"
                "要素の数 n で重みを付け、全体の要素の数 N で割ってください（loss · n / N）。")
    if _close(got, combo([float(n) for n in counts])):
        return "損失の和の勾配になっています。最後に、全体の要素の数 N で割ってください。"
    if _close(got, per_batch[-1]):
        return "最後のマイクロバッチの勾配しか残っていません。ループの中で zero_grad を呼んでいませんか。"
    if _close(got, combo([1.0 / total] * k)):
        return "平均の損失を全体の要素の数 N で割っています。要素の数 n を掛けて和に戻してから割ってください。"
    return "全体の平均の損失を 1 回で逆伝播したときと同じ勾配になるようにしてください。"


def _check_accumulation(answer, loss_fn, batches, model_seed=0):
    model = _mlp(model_seed)
    reference_model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        total = answer(model, loss_fn, batches)
    except (CheckFailed, NotImplementedError):
        raise
    except Exception as e:
        raise CheckFailed(f"accumulate_gradients が {type(e).__name__} を出しました（{e}）。") from None
    if any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)):
        raise CheckFailed("パラメータが変わっています。accumulate_gradients は勾配を .grad に残すだけで、"
                          "最適化手法のステップ（更新）はしません。")
    got = _grads(model)
    if any(g is None for g in got):
        raise CheckFailed(".grad が None のパラメータがあります。各マイクロバッチの損失で backward を呼んでください。")
    loss, _ = loss_fn(reference_model, _union(batches))
    loss.backward()
    expected = _grads(reference_model)
    if not _close(got, expected):
        raise CheckFailed("残った勾配が、すべてのマイクロバッチをまとめた 1 つの大きなバッチの"
                          "平均の損失の勾配と一致しません"
                          f"（数える要素の数 {[int(loss_fn(model, b)[1]) for b in batches]}）。"
                          + _diagnose_accumulation(got, _mlp(model_seed), loss_fn, batches))
    if isinstance(total, torch.Tensor):
        if total.numel() != 1:
            raise CheckFailed(f"戻り値は損失の値（数）のはずですが、形状 {tuple(total.shape)} のテンソルでした。")
        total = total.item()
    if not isinstance(total, (int, float)) or not math.isclose(float(total), loss.item(), rel_tol=1e-9, abs_tol=1e-12):
        raise CheckFailed(f"戻り値は全体の平均の損失 {loss.item():.6f} のはずですが {total!r} でした"
                          "（各マイクロバッチの損失を要素の数で重み付けした平均）。")


acc_ex = register("accumulate_gradients", "勾配累積（大きさの違うマイクロバッチ）", chapter=CHAPTER,
                  reference=accumulate_gradients)


@acc_ex.test("サンプル数の違うマイクロバッチ（5・2・9）で、全体を 1 つのバッチにしたときと同じ勾配と平均の損失")
def _(answer, reference):
    _check_accumulation(answer, _sample_loss, _sample_batches((5, 2, 9), seed=30))


@acc_ex.test("形は同じでもマスクで数えるトークンの数が違う（3・11・7）とき、トークン単位の平均の勾配と一致する")
def _(answer, reference):
    _check_accumulation(answer, _token_loss, _token_batches((3, 11, 7), seed=31), model_seed=1)


@acc_ex.test("マイクロバッチが 1 つでも、同じ大きさでも正しい（パラメータは更新しない）")
def _(answer, reference):
    _check_accumulation(answer, _sample_loss, _sample_batches((6,), seed=32))
    _check_accumulation(answer, _sample_loss, _sample_batches((4, 4, 4, 4), seed=33), model_seed=2)
