"""Chapter 2's exercises: their registrations and the tests that grade a reader's answer.

The tests judge an answer by what it outputs: the patch order, the mixing rule, the box, the
share of pixels, the distribution of lam and its reproducibility through the generator. No
test depends on the order in which an answer draws its random numbers.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checker import (
    CheckFailed,
    call_without_mutation,
    copy_reference_parameters,
    expect_close,
    expect_tensor,
    expect_tuple,
    register,
)
from ..vit import PatchEmbedding, VisionTransformer, cutmix, mixed_cross_entropy, mixup

CHAPTER = "02_vit"


def _lam_value(lam) -> float:
    """lam as a float: a Python number or a one-element tensor (NumPy scalars too)."""
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1:
            raise CheckFailed(f"lam はバッチで 1 つの数のはずですが、形状 {tuple(lam.shape)} のテンソルが返りました。"
                              "サンプルごとに別の lam を使っていませんか。")
        return float(lam.detach().cpu())
    if isinstance(lam, (int, float, np.floating, np.integer)):
        return float(lam)
    raise CheckFailed(f"lam は数（float）のはずですが、{type(lam).__name__} 型の値が返りました。")


class _GlobalSeeds:
    """Seed (and afterwards restore) Python's, NumPy's and PyTorch's global generators."""

    def __init__(self, seed):
        self.seed = seed

    def __enter__(self):
        self.states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()  # noqa: NPY002
        random.seed(self.seed)
        np.random.seed(self.seed)  # noqa: NPY002  (the global generator a reader might draw from)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])  # noqa: NPY002
        torch.random.set_rng_state(self.states[2])


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _mix_call(answer, x, y, alpha, generator, name):
    """Call mixup/cutmix without mutating its inputs; check the four returned values' types."""
    result = call_without_mutation(answer, x, y, alpha, generator)
    mixed, y_a, y_b, lam = expect_tuple(result, f"{name} の戻り値 (mixed_x, y_a, y_b, lam)", 4)
    expect_tensor(mixed, "mixed_x", shape=x.shape, dtype=x.dtype, device=x.device)
    expect_tensor(y_a, "y_a", shape=y.shape, dtype=y.dtype, device=y.device)
    expect_tensor(y_b, "y_b", shape=y.shape, dtype=y.dtype, device=y.device)
    if not torch.equal(y_a, y):
        raise CheckFailed("y_a は入力の y そのまま（並べ替えない）のはずです。並べ替えるのは y_b です。")
    if not torch.equal(y_b.sort().values, y.sort().values):
        raise CheckFailed("y_b が y の並べ替えになっていません。torch.randperm で作った 1 つの並べ替え perm で "
                          "y_b = y[perm] としてください。")
    value = _lam_value(lam)
    if not 0.0 <= value <= 1.0:
        raise CheckFailed(f"lam は 0 以上 1 以下のはずですが、{value:.4g} でした。")
    return mixed, y_b, value


def _distinct_labels(B, device="cpu"):
    """Labels 0..B-1: then y_b names the permutation itself."""
    return torch.arange(B, device=device)


def _check_no_mixing(answer, name, shape=(4, 1, 6, 6)):
    for alpha in (0.0, -1.0):
        x = torch.randn(*shape)
        y = _distinct_labels(shape[0])
        mixed, _, lam = _mix_call(answer, x, y, alpha, _generator(0), name)
        if lam != 1.0:
            raise CheckFailed(f"alpha={alpha} では混ぜない（lam = 1）はずですが、lam = {lam:.4g} が返りました。"
                              "alpha <= 0 のときは Beta 分布から引かずに lam = 1 にします。")
        if not torch.equal(mixed, x):
            raise CheckFailed(f"alpha={alpha}（混ぜない）では mixed_x が x と同じ値になるはずです。")


def _check_reproducible(answer, name, shape):
    """Same generator seed → same result, whatever the global generators hold; other seeds → others."""
    x = torch.randn(*shape)
    y = _distinct_labels(shape[0])
    results = []
    for global_seed in (1, 2):
        with _GlobalSeeds(global_seed):
            results.append(_mix_call(answer, x, y, 1.0, _generator(7), name))
    (m1, yb1, lam1), (m2, yb2, lam2) = results
    if lam1 != lam2 or not torch.equal(yb1, yb2) or not torch.equal(m1, m2):
        raise CheckFailed("同じシードの generator を渡しても結果が変わりました。lam（Beta 分布）と並べ替え"
                          "（torch.randperm）の乱数は、すべて引数の generator から引いてください。np.random や "
                          "torch.distributions.Beta(...).sample() はグローバルな乱数を使うので、generator では"
                          "再現できません（ヒント: solutions.vit.beta_sample(alpha, generator)）。")
    others = [_mix_call(answer, x, y, 1.0, _generator(seed), name)[2] for seed in (8, 9, 10)]
    if all(lam == lam1 for lam in others):
        raise CheckFailed("generator のシードを変えても lam が同じです。関数の中で毎回同じシードの乱数を作って"
                          "いませんか。引数の generator から引いてください。")
    with _GlobalSeeds(3):
        _mix_call(answer, x, y, 1.0, None, name + "（generator=None）")


# ------------------------------------------------------------------------ patch embedding


def _register_patch_embedding():
    ex = register("patch_embedding", "パッチ埋め込み", chapter=CHAPTER, reference=PatchEmbedding)

    def pair(answer, ref, img_size, patch_size, in_channels, d_model, device="cpu"):
        theirs = answer(img_size, patch_size, in_channels, d_model)
        proj = getattr(theirs, "proj", None)
        if not isinstance(proj, nn.Conv2d):
            raise CheckFailed(f"self.proj が nn.Conv2d ではありません（{type(proj).__name__}）。パッチへの切り分けと"
                              "射影を 1 つの nn.Conv2d(in_channels, d_model, kernel_size=patch_size, "
                              "stride=patch_size) で行い、self.proj という名前にしてください。")
        if proj.kernel_size != (patch_size, patch_size) or proj.stride != (patch_size, patch_size):
            raise CheckFailed(f"self.proj の kernel_size={proj.kernel_size}, stride={proj.stride} ですが、"
                              f"どちらも patch_size={patch_size} にします（kernel_size と stride が違うと、"
                              "パッチが重なったり隙間ができたりします）。")
        ours = ref(img_size, patch_size, in_channels, d_model)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_()
        try:
            theirs.load_state_dict(ours.state_dict())
        except RuntimeError as e:
            raise CheckFailed("パラメータの形状が模範解答と違います（proj は in_channels → d_model の nn.Conv2d で、"
                              f"bias=True のままにします）: {str(e).splitlines()[0]}") from None
        return theirs.to(device).eval(), ours.to(device).eval()

    def compare(answer, ref, B, img_size, patch_size, in_channels, d_model, device="cpu"):
        theirs, ours = pair(answer, ref, img_size, patch_size, in_channels, d_model, device)
        x = torch.randn(B, in_channels, img_size, img_size, device=device)
        with torch.no_grad():
            out = call_without_mutation(theirs, x)
            expected = ours(x)
            n, g = expected.shape[1], img_size // patch_size
            expect_tensor(out, "出力", shape=expected.shape)
            if torch.allclose(out, expected, atol=1e-5, rtol=1e-4):
                return
            grid = ours.proj(x)  # (B, d_model, g, g)
            column_major = grid.transpose(2, 3).flatten(2).transpose(1, 2)
            no_transpose = grid.reshape(B, n, d_model)
            if g > 1 and torch.allclose(out, column_major, atol=1e-5, rtol=1e-4):
                raise CheckFailed("パッチの順番が列優先（縦方向が先）になっています。行優先（左上から右へ、"
                                  "1 行終えたら次の行）の proj(x).flatten(2).transpose(1, 2) の順にしてください。")
            if torch.allclose(out, no_transpose, atol=1e-5, rtol=1e-4):
                raise CheckFailed("proj(x) を transpose せずに (B, n_patches, d_model) へ reshape（view）しています。"
                                  "形状は合いますが、チャネルと位置の成分が混ざります。flatten(2) で "
                                  "(B, d_model, n_patches) にしてから transpose(1, 2) してください。")
        expect_close(out, expected, "出力", hint="出力は proj(x).flatten(2).transpose(1, 2) と同じ値・同じ順番に"
                                                 "します。proj 以外の変換（活性化関数や正規化）は入れません。")

    @ex.test("8×8・1 チャネル・パッチ 2（16 パッチ）で模範解答と一致する")
    def _(answer, ref):
        compare(answer, ref, B=2, img_size=8, patch_size=2, in_channels=1, d_model=16)

    @ex.test("12×12・3 チャネル・パッチ 4、バッチ 1")
    def _(answer, ref):
        compare(answer, ref, B=1, img_size=12, patch_size=4, in_channels=3, d_model=8)

    @ex.test("パッチが 1 つ（画像全体が 1 パッチ）")
    def _(answer, ref):
        compare(answer, ref, B=3, img_size=4, patch_size=4, in_channels=2, d_model=5)

    @ex.test("各パッチを切り出して同じ nn.Linear に通した結果（unfold + 線形層）と一致する")
    def _(answer, ref):
        theirs, _ = pair(answer, ref, 6, 3, 2, 7)
        x = torch.randn(2, 2, 6, 6)
        patches = F.unfold(x, kernel_size=3, stride=3).transpose(1, 2)  # (B, n, C·p·p), row-major
        linear = nn.Linear(2 * 3 * 3, 7)
        with torch.no_grad():
            linear.weight.copy_(theirs.proj.weight.flatten(1))
            linear.bias.copy_(theirs.proj.bias)
            expect_close(theirs(x), linear(patches), "出力",
                         hint="パッチを左上から行優先に並べ、各パッチに同じ射影をかけた結果になっていません。")

    @ex.gpu_test
    def _(answer, ref, device):
        compare(answer, ref, B=2, img_size=8, patch_size=2, in_channels=1, d_model=16, device=device)


# ------------------------------------------------------------------------ vision transformer


def _register_vit():
    ex = register("vision_transformer", "Vision Transformer の順伝播", chapter=CHAPTER, reference=VisionTransformer)
    config = {"img_size": 8, "patch_size": 2, "in_channels": 1, "n_classes": 10, "d_model": 16, "n_heads": 4,
              "n_layers": 2, "d_ff": 32}

    def pair(answer, ref, dropout=0.0, **changes):
        kwargs = {**config, **changes, "dropout": dropout}
        theirs, ours = answer(**kwargs), ref(**kwargs)
        copy_reference_parameters(theirs, ours, "patch_embed, cls_token, pos_embed, blocks, ln, head", noise=0.2)
        return theirs.eval(), ours.eval()

    def variants(ours, x):
        """Outputs of well-known wrong forwards, to name the likely mistake."""
        patches = ours.patch_embed(x)
        tokens = torch.cat([ours.cls_token.expand(x.size(0), -1, -1), patches], 1)

        def run(h, pos=True, final_ln=True):
            h = h + ours.pos_embed if pos else h
            for block in ours.blocks:
                h = block(h)
            return ours.ln(h) if final_ln else h

        full = run(tokens)
        return {
            "CLS トークンではなく、全トークン（またはパッチ）の平均を分類に使っています。": [
                ours.head(full.mean(1)), ours.head(full[:, 1:].mean(1))],
            "位置埋め込み pos_embed が足されていません。": [ours.head(run(tokens, pos=False)[:, 0])],
            "最後の層正規化 self.ln を通していません。": [ours.head(run(tokens, final_ln=False)[:, 0])],
            "CLS トークンの位置（先頭、トークン 0）ではない位置の出力を分類に使っています。": [ours.head(full[:, -1])],
        }

    def compare(answer, ref, B, device="cpu", **changes):
        theirs, ours = pair(answer, ref, **changes)
        theirs, ours = theirs.to(device), ours.to(device)
        c = {**config, **changes}
        x = torch.randn(B, c["in_channels"], c["img_size"], c["img_size"], device=device)
        with torch.no_grad():
            out = call_without_mutation(theirs, x)
            expected = ours(x)
            expect_tensor(out, "出力のロジット", shape=expected.shape)
            if torch.allclose(out, expected, atol=1e-5, rtol=1e-4):
                return
            for reason, candidates in variants(ours, x).items():
                if any(torch.allclose(out, v, atol=1e-5, rtol=1e-4) for v in candidates):
                    raise CheckFailed(reason)
        expect_close(out, expected, "出力のロジット", hint=(
            "順番は、パッチ埋め込み → 先頭に CLS トークンを連結 → pos_embed を足す → dropout → ブロック（マスクなし）"
            " → self.ln → CLS トークン（x[:, 0]）を self.head へ、です。"))

    @ex.test("__init__ の構成が模範解答と同じで、位置埋め込みが小さく初期化されている")
    def _(answer, ref):
        model = answer(**config)
        pair(answer, ref)
        std = model.pos_embed.detach().std().item()
        if std > 0.2:
            raise CheckFailed(f"pos_embed の標準偏差が {std:.2f} です。N(0, 1) ではなく、標準偏差 0.02 程度の小さな"
                              "値で初期化してください（標準偏差 1 で始めると、学習しても初期値からほとんど動かず、"
                              "固定の乱数と変わらなくなります。第 10 節）。")

    @ex.test("8×8・1 チャネルの画像で模範解答と一致する")
    def _(answer, ref):
        compare(answer, ref, B=3)

    @ex.test("バッチ 1")
    def _(answer, ref):
        compare(answer, ref, B=1)

    @ex.test("12×12・3 チャネル・パッチ 4・3 ブロック")
    def _(answer, ref):
        compare(answer, ref, B=2, img_size=12, patch_size=4, in_channels=3, n_layers=3)

    @ex.test("dropout=1 の学習モードでは、埋め込みがすべて落ちて出力は head(ln のバイアス) になる")
    def _(answer, ref):
        theirs, ours = pair(answer, ref, dropout=1.0)
        theirs.train()
        with torch.no_grad():
            out = theirs(torch.randn(2, 1, 8, 8))
            expected = ours.head(ours.ln.bias).expand(2, -1)
        expect_close(out, expected, "dropout=1 の学習モードの出力",
                     hint="pos_embed を足したあとに self.dropout をかけてください。")

    @ex.gpu_test
    def _(answer, ref, device):
        compare(answer, ref, B=2, device=device)


# ------------------------------------------------------------------------ mixup


def _register_mixup():
    ex = register("mixup", "Mixup", chapter=CHAPTER, reference=mixup)

    def check_convex(answer, x, generator):
        y = _distinct_labels(x.size(0), x.device)
        mixed, y_b, lam = _mix_call(answer, x, y, 1.0, generator, "mixup")
        expected = lam * x + (1 - lam) * x[y_b]
        if torch.allclose(mixed, expected, atol=1e-5, rtol=1e-4):
            return lam
        if torch.allclose(mixed, (1 - lam) * x + lam * x[y_b], atol=1e-5, rtol=1e-4):
            raise CheckFailed("lam と 1 - lam が逆です。mixed_x = lam * x + (1 - lam) * x[perm] で、lam は y_a（= y）"
                              "の重みです。")
        # Per sample: mixed_i - x[perm_i] = lam_i (x_i - x[perm_i]); lam_i from least squares.
        moved = y_b != torch.arange(x.size(0), device=x.device)
        if not moved.any():
            raise CheckFailed("並べ替えがない（perm が恒等）のに、mixed_x が x と一致しません。")
        d = (x - x[y_b]).flatten(1)[moved]
        r = (mixed - x[y_b]).flatten(1)[moved]
        per_sample = (d * r).sum(1) / (d * d).sum(1)
        fits = torch.allclose(r, per_sample[:, None] * d, atol=1e-4, rtol=1e-3)
        if fits and per_sample.numel() > 1 and (per_sample.max() - per_sample.min()) > 1e-4:
            raise CheckFailed("サンプルごとに違う lam で混ぜています。lam はバッチ全体で 1 つです"
                              "（返す lam と同じ値で、すべてのサンプルを混ぜます）。")
        if fits:
            raise CheckFailed(f"画像を混ぜた割合 {per_sample[0].item():.4g} と、返した lam = {lam:.4g} が違います。")
        raise CheckFailed("mixed_x が lam * x + (1 - lam) * x[perm]（perm は y_b = y[perm] の並べ替え）になって"
                          "いません。画像とラベルで同じ 1 つの並べ替えを使っていますか。")

    @ex.test("mixed_x = lam·x + (1 − lam)·x[perm]、y_b = y[perm]（同じ並べ替え）")
    def _(answer, ref):
        for seed in range(5):
            check_convex(answer, torch.randn(8, 1, 4, 4), _generator(seed))

    @ex.test("3 チャネル・非正方形・float64・バッチ 1 でも動く")
    def _(answer, ref):
        check_convex(answer, torch.randn(5, 3, 4, 7), _generator(0))
        check_convex(answer, torch.randn(6, 2, 3, 3, dtype=torch.float64), _generator(1))
        x = torch.randn(1, 1, 4, 4)
        mixed, _, _ = _mix_call(answer, x, _distinct_labels(1), 1.0, _generator(2), "mixup")
        expect_close(mixed, x, "バッチ 1 の mixed_x", hint="相手が自分自身しかいないので、x と同じになるはずです。")

    @ex.test("alpha <= 0 では混ぜない（lam = 1、mixed_x = x）")
    def _(answer, ref):
        _check_no_mixing(answer, "mixup")

    @ex.test("lam が Beta(alpha, alpha) に従う（alpha = 0.2 と 2 で 2,000 回ずつ引いて KS 検定）")
    def _(answer, ref):
        from scipy import stats

        x, y = torch.randn(2, 1, 2, 2), _distinct_labels(2)
        for alpha in (0.2, 2.0):
            lams = [_mix_call(answer, x, y, alpha, _generator(s), "mixup")[2] for s in range(2000)]
            if len(set(lams)) == 1:
                raise CheckFailed(f"generator のシードを変えても lam が毎回 {lams[0]:.4g} です。"
                                  "関数の中で毎回同じシードの乱数を作っていませんか。"
                                  "引数の generator から引いてください。")
            p = stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue
            if p < 1e-4:
                mean, std = np.mean(lams), np.std(lams)
                expected_std = (1 / (4 * (2 * alpha + 1))) ** 0.5
                raise CheckFailed(
                    f"alpha={alpha} で引いた lam の分布が Beta({alpha}, {alpha}) と合いません（KS 検定の p 値 {p:.1e}、"
                    f"平均 {mean:.3f}・標準偏差 {std:.3f}、期待値は平均 0.5・標準偏差 {expected_std:.3f}）。"
                    "lam は Beta(alpha, alpha) から 1 回引いた値そのものを使います"
                    "（一様分布や max(lam, 1 - lam) ではありません）。")

    @ex.test("同じシードの generator なら同じ結果（グローバルな乱数に頼らない）")
    def _(answer, ref):
        _check_reproducible(answer, "mixup", (6, 1, 4, 4))

    @ex.gpu_test
    def _(answer, ref, device):
        x = torch.randn(6, 3, 4, 4, device=device)
        check_convex(answer, x, _generator(0))


# ------------------------------------------------------------------------ cutmix


def _pasted_box(x, mixed, y_b):
    """Where mixed_x comes from x[perm]: one (H, W) bool mask shared by the batch, or CheckFailed.

    Only samples whose partner is another image tell the sources apart; None when there is none.
    """
    from_x = mixed == x
    from_other = mixed == x[y_b]
    if not (from_x | from_other).all():
        raise CheckFailed("mixed_x に、x にも x[perm] にもない値の画素があります。CutMix は画素を混ぜ合わせず、"
                          "矩形領域の中を x[perm] の画素で置き換えます（y_b = y[perm] と同じ perm を使います）。")
    moved = y_b != torch.arange(x.size(0), device=x.device)
    if not moved.any():
        return None
    pasted = (from_other & ~from_x)[moved]  # (B', C, H, W)
    box = pasted[0, 0]
    if not (pasted == box).all():
        raise CheckFailed("貼り付けた領域がサンプルごと、またはチャネルごとに違います。"
                          "貼る領域はバッチ全体で 1 つにし、すべてのチャネルに同じ領域を使います"
                          "（mixed_x[..., top:bottom, left:right] のように）。")
    rows, cols = box.any(1), box.any(0)
    if box.any():
        r, c = rows.nonzero().flatten(), cols.nonzero().flatten()
        contiguous = (r.max() - r.min() + 1 == r.numel()) and (c.max() - c.min() + 1 == c.numel())
        if not contiguous or not torch.equal(box, rows[:, None] & cols[None, :]):
            raise CheckFailed("貼り付けた領域が 1 つの矩形になっていません。")
    return box


def _register_cutmix():
    ex = register("cutmix", "CutMix", chapter=CHAPTER, reference=cutmix)

    def check_case(answer, shape, generator, device="cpu"):
        x = torch.randn(*shape, device=device)
        y = _distinct_labels(shape[0], device)
        mixed, y_b, lam = _mix_call(answer, x, y, 1.0, generator, "cutmix")
        box = _pasted_box(x, mixed, y_b)
        if box is None:
            return None
        H, W = shape[-2:]
        kept = 1 - box.sum().item() / (H * W)
        if abs(kept - lam) > 1e-6:
            raise CheckFailed(f"返した lam = {lam:.4f} が、x のまま残った画素の実際の割合 {kept:.4f} と違います"
                              f"（{H}×{W} の画像で、貼り付けた領域は "
                              f"{int(box.any(1).sum())}×{int(box.any(0).sum())}）。"
                              "lam は、領域を画像の端で切り詰めたあとの面積から 1 − 面積 / (H·W) で計算し直します。"
                              "高さ H = x.size(2)、幅 W = x.size(3) の取り違えも確認してください。")
        return box

    @ex.test("正方形の画像: 貼る領域は 1 つの矩形、画素は x か x[perm] から、lam は x のまま残った画素の割合")
    def _(answer, ref):
        for seed in range(20):
            check_case(answer, (6, 1, 8, 8), _generator(seed))

    @ex.test("非正方形の画像（6×16 と 16×6、3 チャネル）でも同じ")
    def _(answer, ref):
        for seed in range(20):
            check_case(answer, (4, 3, 6, 16), _generator(seed))
            check_case(answer, (4, 3, 16, 6), _generator(100 + seed))

    @ex.test("貼る領域の縦横比が画像と同じで、中心は画像全体に一様（16×48 の画像で 400 回）")
    def _(answer, ref):
        H, W = 16, 48
        boxes = [b for s in range(400) if (b := check_case(answer, (4, 1, H, W), _generator(s))) is not None]
        rows = torch.stack([b.any(1) for b in boxes]).float()  # (n, H)
        cols = torch.stack([b.any(0) for b in boxes]).float()  # (n, W)
        inside = (rows.sum(1) > 0) & (rows[:, 0] == 0) & (rows[:, -1] == 0) & (cols[:, 0] == 0) & (cols[:, -1] == 0)
        if inside.sum() >= 10:
            ratio = (rows[inside].sum(1) / H).mean() / (cols[inside].sum(1) / W).mean()
            if not 0.6 < ratio < 1.6:
                raise CheckFailed(f"端で切り詰められていない領域の (高さ/H) / (幅/W) の平均が {ratio:.2f} です"
                                  "（1 前後のはず）。領域の高さは H·√(1−λ)、幅は W·√(1−λ) で、"
                                  "H = x.size(2)、W = x.size(3) です。高さと幅を取り違えていませんか。")
        for name, hits in (("上端と下端", rows[:, [0, -1]]), ("左端と右端", cols[:, [0, -1]])):
            first, last = hits.mean(0).tolist()
            if min(first, last) < 0.05 or abs(first - last) > 0.15:
                raise CheckFailed(f"貼る領域が{name}にかかる頻度が偏っています（{first:.0%} と {last:.0%}）。"
                                  "領域の中心は、縦は 0..H−1、横は 0..W−1 から一様に選びます（軸の取り違えに注意）。")

    @ex.test("貼る領域の大きさが alpha に従う（alpha が小さいと、ほとんど貼らない回が多い）")
    def _(answer, ref):
        def share_small(alpha):
            x, y = torch.randn(2, 1, 16, 48), _distinct_labels(2)
            small = 0
            for s in range(300):
                _, _, lam = _mix_call(answer, x, y, alpha, _generator(s), "cutmix")
                small += lam >= 0.98
            return small / 300

        low, high = share_small(0.05), share_small(5.0)
        if low < 0.25 or high > 0.1:
            raise CheckFailed(f"貼り付けた面積が 2 % 以下の回の割合が、alpha=0.05 で {low:.0%}、alpha=5 で {high:.0%} "
                              "でした（Beta(alpha, alpha) から引いた λ で領域の大きさを決めれば、前者は 25 % 以上"
                              "（模範解答では 4 割台）、後者は 10 % 以下（模範解答では 0 %）になります）。"
                              "領域の一辺は √(1−λ) に比例させます。")

    @ex.test("alpha <= 0 では貼らない（lam = 1、mixed_x = x）")
    def _(answer, ref):
        _check_no_mixing(answer, "cutmix")

    @ex.test("同じシードの generator なら同じ結果（グローバルな乱数に頼らない）")
    def _(answer, ref):
        _check_reproducible(answer, "cutmix", (6, 1, 8, 8))

    @ex.gpu_test
    def _(answer, ref, device):
        for seed in range(5):
            check_case(answer, (4, 3, 6, 10), _generator(seed), device=device)


# ------------------------------------------------------------------------ mixed-label loss


def _register_mixed_loss():
    ex = register("mixed_cross_entropy", "混ぜたラベルに対する損失", chapter=CHAPTER, reference=mixed_cross_entropy)

    def compare(answer, ref, B, C, lam, device="cpu", dtype=torch.float32):
        logits = torch.randn(B, C, device=device, dtype=dtype) * 3
        y_a = torch.randint(C, (B,), device=device)
        y_b = torch.randint(C, (B,), device=device)
        loss = call_without_mutation(answer, logits, y_a, y_b, lam)
        expected = ref(logits, y_a, y_b, lam)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise CheckFailed(f"損失はバッチで平均した 1 つの数（0 次元のテンソル）のはずですが、{type(loss).__name__}"
                              f"{'' if not isinstance(loss, torch.Tensor) else ' 形状 ' + str(tuple(loss.shape))}"
                              " が返りました。reduction を確認してください。")
        loss = loss.reshape(())
        lam_f = float(lam)
        if not torch.allclose(loss, expected, atol=1e-5, rtol=1e-4):
            swapped = (1 - lam_f) * F.cross_entropy(logits, y_a) + lam_f * F.cross_entropy(logits, y_b)
            summed = expected * B
            if torch.allclose(loss, swapped, atol=1e-5, rtol=1e-4):
                raise CheckFailed("lam と 1 − lam が逆です。lam は y_a の重みです。")
            if torch.allclose(loss, summed, atol=1e-4, rtol=1e-4):
                raise CheckFailed("バッチで合計しています。バッチの平均にしてください"
                                  "（F.cross_entropy の既定 reduction='mean'）。")
        expect_close(loss, expected, f"lam={lam_f:.2f} の損失", hint=(
            "損失は lam · CE(logits, y_a) + (1 − lam) · CE(logits, y_b) です。ラベル（整数のクラス番号）どうしを"
            "混ぜてはいけません。"))
        return loss

    @ex.test("lam = 0.3・0.7・1・0 で lam·CE(y_a) + (1 − lam)·CE(y_b) と一致する")
    def _(answer, ref):
        for lam in (0.3, 0.7, 1.0, 0.0):
            compare(answer, ref, 8, 10, lam)

    @ex.test("lam が 0 次元のテンソルでも動き、バッチ 1 でも動く")
    def _(answer, ref):
        compare(answer, ref, 6, 5, torch.tensor(0.25))
        compare(answer, ref, 1, 3, 0.6)

    @ex.test("y_a と y_b が同じなら、普通の交差エントロピーと同じ")
    def _(answer, ref):
        logits, y = torch.randn(5, 4), torch.randint(4, (5,))
        expect_close(torch.as_tensor(answer(logits, y, y, 0.37)).reshape(()), F.cross_entropy(logits, y),
                     "y_a = y_b のときの損失")

    @ex.test("ロジットへの勾配が softmax − 混ぜたラベル（を B で割ったもの）になる")
    def _(answer, ref):
        logits = torch.randn(4, 6, requires_grad=True)
        y_a, y_b, lam = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 1, 0, 2]), 0.35
        loss = answer(logits, y_a, y_b, lam)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise CheckFailed("損失がロジットにつながったテンソルではありません"
                              "（.item() や float() にしていませんか）。"
                              "逆伝播できるテンソルのまま返してください。")
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        target = lam * F.one_hot(y_a, 6) + (1 - lam) * F.one_hot(y_b, 6)
        expect_close(grad, (logits.detach().softmax(-1) - target) / 4, "ロジットの勾配")

    @ex.gpu_test
    def _(answer, ref, device):
        compare(answer, ref, 8, 10, 0.4, device=device)


_register_patch_embedding()
_register_vit()
_register_mixup()
_register_cutmix()
_register_mixed_loss()
