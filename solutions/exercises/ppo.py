"""Chapter 7's exercises: their registrations and the tests that grade a reader's answer.

GAE is compared with its definition (a sum of discounted TD errors, stopped after the step where
an episode ends) computed here by a loop, first on a rollout without episode ends (where the λ = 0
and λ = 1 cases tell a wrong TD error from a wrong trace), then with episodes ending in the middle
and at the last step. The two losses are compared with their formulas case by case (ratios or
values inside and outside the clipping range, positive and negative advantages), then on random
batches, and by their gradients, which must vanish exactly where the clipped term is chosen.
"""

from __future__ import annotations

import math

import torch

from ..checker import CheckFailed, call_answer, expect_close, expect_tensor, expect_tuple, register
from ..ppo import clipped_value_loss, compute_gae, ppo_clip_loss

CHAPTER = "07_ppo"


# =======================================================================================
# compute_gae

gae = register("compute_gae", "GAE（一般化アドバンテージ推定）", chapter=CHAPTER, reference=compute_gae)


def _gae_by_loop(rewards, values, dones, last_value, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l}, each environment on its own, the sum stopped after an episode's last step."""
    T, N = rewards.shape
    out = torch.zeros(T, N, dtype=torch.float64)
    for n in range(N):
        for t in range(T):
            total, factor = 0.0, 1.0
            for k in range(t, T):
                next_value = float(last_value[n]) if k == T - 1 else float(values[k + 1, n])
                ended = bool(dones[k, n])
                total += factor * (float(rewards[k, n]) + (0.0 if ended else gamma * next_value) - float(values[k, n]))
                if ended:
                    break
                factor *= gamma * lam
            out[t, n] = total
    return out


def _rollout(seed, T, N, dones_at=(), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(T, N, generator=g, dtype=torch.float64).to(dtype)
    values = (torch.randn(T, N, generator=g, dtype=torch.float64) * 2).to(dtype)
    last_value = (torch.randn(N, generator=g, dtype=torch.float64) * 2).to(dtype)
    dones = torch.zeros(T, N, dtype=torch.bool)
    for t, n in dones_at:
        dones[t, n] = True
    return rewards, values, dones, last_value


def _gae_outputs(answer, rewards, values, dones, last_value, gamma, lam):
    out = call_answer(answer, rewards, values, dones, last_value, gamma=gamma, gae_lambda=lam)
    advantages, returns = expect_tuple(out, "戻り値 (advantages, returns)", 2)
    advantages = expect_tensor(advantages, "advantages", shape=rewards.shape)
    returns = expect_tensor(returns, "returns", shape=rewards.shape)
    return advantages, returns


def _check_returns(advantages, returns, values, where):
    expected = advantages.detach().double() + values.double()
    if torch.allclose(returns.double(), expected, atol=1e-4, rtol=1e-4):
        return
    if torch.allclose(returns.double(), advantages.detach().double(), atol=1e-4):
        raise CheckFailed(f"{where}: returns が advantages と同じです。returns は価値関数の目標で、"
                          "advantages + values です（A_t = R_t − V(s_t) なので R_t = A_t + V(s_t)）。")
    raise CheckFailed(f"{where}: returns が advantages + values と一致しません。")


_TD_HINT = ("δ_t = r_t + γ V(s_{t+1}) − V(s_t) です。V(s_{t+1}) は values[t + 1] で、最後のステップ（t = T − 1）"
            "だけは rollout の外にある状態の価値 last_value を使います（使わずに 0 とすると、打ち切った rollout の"
            "最後を終了として扱うことになります）。")


_TRACE_HINT = ("A_t = δ_t + γλ A_{t+1} を、最後のステップ t = T − 1 から t = 0 へ逆向きに計算します（A_t は"
               "それより未来の δ から作ります）。持ち越す A_{t+1} には γ と λ の両方を掛けます。")


@gae.test("エピソードが終わらない rollout で、λ = 0 なら 1 ステップの TD 誤差、λ = 1 なら最後に last_value で"
          "ブートストラップした割引収益、λ = 0.95 なら TD 誤差の割引和")
def _(answer, reference):
    rewards, values, dones, last_value = _rollout(0, T=7, N=3)
    gamma = 0.9
    for lam, what, hint in (
        (0.0, "λ = 0（A_t = δ_t）", _TD_HINT),
        (1.0, "λ = 1（returns = 割引収益）", _TRACE_HINT),
        (0.95, "λ = 0.95", _TRACE_HINT),
    ):
        advantages, returns = _gae_outputs(answer, rewards, values, dones, last_value, gamma, lam)
        expected = _gae_by_loop(rewards, values, dones, last_value, gamma, lam)
        if lam > 0 and not torch.allclose(advantages.detach().double(), expected, atol=1e-4, rtol=1e-4):
            no_gamma = torch.zeros(rewards.shape, dtype=torch.float64)   # the trace carried by λ alone, δ with γ
            running = torch.zeros(rewards.shape[1], dtype=torch.float64)
            for t in reversed(range(rewards.shape[0])):
                nxt = last_value.double() if t == rewards.shape[0] - 1 else values[t + 1].double()
                running = rewards[t].double() + gamma * nxt - values[t].double() + lam * running
                no_gamma[t] = running
            if torch.allclose(advantages.detach().double(), no_gamma, atol=1e-4, rtol=1e-4):
                raise CheckFailed(f"{what}: 持ち越しの係数が λ だけになっています。A_t = δ_t + γλ A_{{t+1}} の"
                                  "ように γ も掛けてください（λ = 1 のとき、割引収益になるのは γ があるからです）。")
        expect_close(advantages, expected.to(advantages.dtype), f"{what} の advantages", atol=1e-4, rtol=1e-4,
                     hint=hint)
        _check_returns(advantages, returns, values, what)


@gae.test("rollout の途中と最後のステップでエピソードが終わる（dones[t] = True ならステップ t で終わり、t + 1 から"
          "ブートストラップしない）")
def _(answer, reference):
    T, N = 9, 4
    ends = ((2, 0), (6, 0), (0, 1), (4, 1), (T - 1, 2), (3, 3), (4, 3))    # env 3: two episodes end in a row
    rewards, values, dones, last_value = _rollout(1, T, N, ends)
    for lam in (0.0, 0.95):
        advantages, returns = _gae_outputs(answer, rewards, values, dones, last_value, 0.99, lam)
        expected = _gae_by_loop(rewards, values, dones, last_value, 0.99, lam)
        bad = (advantages.detach().double() - expected).abs() > 1e-4 + 1e-4 * expected.abs()
        if bad.any():
            t, n = (int(i) for i in torch.nonzero(bad)[0])
            near = [int(k) for k in torch.nonzero(dones[:, n]).flatten()]
            raise CheckFailed(
                f"λ = {lam}: 環境 {n} のステップ {t} の advantage が {expected[t, n].item():.5g} のはずが "
                f"{advantages[t, n].item():.5g} でした（環境 {n} でエピソードが終わるステップ: {near or 'なし'}）。"
                "dones[t] が True のステップでは、δ_t の γ V(s_{t+1}) も、A_{t+1} からの持ち越しも 0 にします"
                "（ステップ t + 1 は次のエピソードの始まりです）。使うのは dones[t] で、dones[t + 1] ではありません。")
        _check_returns(advantages, returns, values, f"λ = {lam}")


@gae.test("環境 1 つ・長さ 1 の rollout、float64、γ と λ を位置引数で渡す、入力を書き換えない")
def _(answer, reference):
    rewards, values, dones, last_value = _rollout(2, T=1, N=1, dtype=torch.float64)
    for done in (False, True):
        dones = torch.tensor([[done]])
        out = call_answer(answer, rewards, values, dones, last_value, 0.97, 0.9)
        advantages, returns = expect_tuple(out, "戻り値 (advantages, returns)", 2)
        expected = _gae_by_loop(rewards, values, dones, last_value, 0.97, 0.9)
        expect_close(expect_tensor(advantages, "advantages", shape=(1, 1)), expected.to(advantages.dtype),
                     f"長さ 1（dones = {done}）の advantages", atol=1e-8, rtol=1e-8,
                     hint=_TD_HINT if not done else "終了したステップでは δ_t = r_t − V(s_t) です。")
        _check_returns(advantages, returns, values, f"長さ 1（dones = {done}）")
    rewards, values, dones, last_value = _rollout(3, 16, 8, ((5, 2), (15, 7)))
    advantages, _ = _gae_outputs(answer, rewards, values, dones, last_value, 0.99, 0.95)
    expect_close(advantages, _gae_by_loop(rewards, values, dones, last_value, 0.99, 0.95).float(),
                 "T = 16、N = 8 の advantages", atol=1e-4, rtol=1e-4)


# =======================================================================================
# ppo_clip_loss

clip_loss = register("ppo_clip_loss", "PPO のクリップ付き代理目的関数（損失）", chapter=CHAPTER,
                     reference=ppo_clip_loss)

_CLIP_HINT = ("損失は −mean(min(ρA, clip(ρ, 1 − ε, 1 + ε)·A)) です。クリップするのは比 ρ で、アドバンテージ A では"
              "ありません。min を取るので、A > 0 なら ρ が 1 + ε を超えても得をせず、A < 0 なら ρ が 1 − ε を下回っても"
              "得をしません（どちらの向きでも、悪くなる側にはクリップが効きません）。")


def _single_losses(answer, eps):
    """The loss of one sample at each (ratio, advantage): (ratio, advantage, expected, got)."""
    out = []
    for ratio in (0.5, 0.9, 1.0, 1.1, 1.5):
        for adv in (2.0, -2.0):
            new, old = torch.tensor([math.log(ratio) - 0.3]), torch.tensor([-0.3])
            got = expect_tensor(call_answer(answer, new, old, torch.tensor([adv]), eps), "損失")
            if got.numel() != 1:
                raise CheckFailed(f"損失は 1 つの数（形状 () のテンソル）のはずですが、形状 {tuple(got.shape)} でした。"
                                  "バッチで平均してください。")
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            out.append((ratio, adv, -min(ratio * adv, clipped * adv), float(got)))
    return out


@clip_loss.test("1 つのサンプルで、比 ρ が [1 − ε, 1 + ε] の内と外、アドバンテージが正と負のときの値")
def _(answer, reference):
    cases = _single_losses(answer, 0.2)
    wrong = [(r, a, e, g) for r, a, e, g in cases if not math.isclose(e, g, rel_tol=1e-4, abs_tol=1e-5)]
    if not wrong:
        return
    listing = "、".join(f"ρ = {r}, A = {a:+g} で {e:.4g} のはずが {g:.4g}" for r, a, e, g in wrong[:4])
    if all(math.isclose(-e, g, rel_tol=1e-4, abs_tol=1e-5) for _, _, e, g in cases):
        reason = ("符号が逆です。目的関数 min(ρA, clip(ρ)·A) は大きくしたいので、最小化する損失にはマイナスを"
                  "付けます。")
    elif all(math.isclose(-max(r * a, min(max(r, 0.8), 1.2) * a), g, rel_tol=1e-4, abs_tol=1e-5)
             for r, a, _, g in cases):
        reason = ("ρA とクリップした項のうち大きいほう（max）を取っています。悲観的な下限にするため、小さいほう"
                  "（min）を取ります。")
    else:
        reason = ""
    raise CheckFailed(f"{listing}。{reason}{_CLIP_HINT if not reason else ''}")


@clip_loss.test("ランダムなバッチで式と一致し、クリップの幅 ε を引数で変えられ、バッチの平均を返す")
def _(answer, reference):
    g = torch.Generator().manual_seed(0)
    for eps, n in ((0.2, 64), (0.1, 5)):
        old = -torch.rand(n, generator=g) * 2
        new = old + torch.randn(n, generator=g) * 0.4
        adv = torch.randn(n, generator=g)
        got = expect_tensor(call_answer(answer, new, old, adv, eps), "損失")
        ratio = (new - old).double().exp()
        expected = -torch.min(ratio * adv.double(), ratio.clamp(1 - eps, 1 + eps) * adv.double()).mean()
        if got.numel() == 1 and math.isclose(float(got), float(expected) * n, rel_tol=1e-4):
            raise CheckFailed("損失がバッチの和になっています。平均（mean）にしてください。")
        expect_close(got.reshape(()), expected.float(), f"ε = {eps}、バッチ {n} の損失", atol=1e-5, rtol=1e-4,
                     hint=_CLIP_HINT)


@clip_loss.test("new_logprob についての勾配: クリップされた項が選ばれたサンプルでは 0、それ以外では −ρA / バッチ数")
def _(answer, reference):
    eps = 0.2
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 0.5, 0.9, 1.0, 1.1, 1.5], dtype=torch.float64)
    adv = torch.tensor([2.0] * 5 + [-2.0] * 5, dtype=torch.float64)
    old = torch.full((10,), -0.7, dtype=torch.float64)
    new = (old + ratios.log()).requires_grad_(True)
    loss = expect_tensor(call_answer(answer, new, old, adv, eps), "損失")
    if not loss.requires_grad:
        raise CheckFailed("損失が new_logprob から勾配を受け取れません"
                          "（.item() や .detach()、NumPy を通していませんか）。PyTorch の演算だけで計算してください。")
    (grad,) = torch.autograd.grad(loss.sum(), new)
    clipped = ((adv > 0) & (ratios > 1 + eps)) | ((adv < 0) & (ratios < 1 - eps))
    expected = torch.where(clipped, torch.zeros_like(ratios), -ratios * adv / len(ratios))
    expect_close(grad, expected, "new_logprob についての勾配", atol=1e-6, rtol=1e-5,
                 hint="ρ は exp(new_logprob − old_logprob) で、クリップした項が選ばれたところでは勾配が流れません。"
                      + _CLIP_HINT)


# =======================================================================================
# clipped_value_loss

value_loss = register("clipped_value_loss", "クリップ付きの価値の損失", chapter=CHAPTER, reference=clipped_value_loss)

_VALUE_HINT = ("V_clip = V_old + clip(V − V_old, −ε, ε) で、損失は ½·mean(max((V − R)², (V_clip − R)²)) です。"
               "クリップするのは、rollout を集めたときの値 V_old からの変化 V − V_old です"
               "（V そのものではありません）。")


@value_loss.test("1 つのサンプルで、新しい値が V_old ± ε の内、外（目標 R に近づく側）、外（遠ざかる側）のときの値")
def _(answer, reference):
    eps = 0.2
    old, target = 10.0, 12.0
    rows = []
    for new in (10.1, 9.9, 11.0, 9.0):           # inside, inside, beyond towards R, beyond away from R
        got = expect_tensor(call_answer(answer, torch.tensor([new]), torch.tensor([old]), torch.tensor([target]), eps),
                            "損失")
        if got.numel() != 1:
            raise CheckFailed(f"損失は 1 つの数のはずですが、形状 {tuple(got.shape)} でした。"
                              "バッチで平均してください。")
        clipped = old + min(max(new - old, -eps), eps)
        expected = 0.5 * max((new - target) ** 2, (clipped - target) ** 2)
        rows.append((new, expected, float(got)))
    wrong = [(v, e, g) for v, e, g in rows if not math.isclose(e, g, rel_tol=1e-4, abs_tol=1e-5)]
    if not wrong:
        return
    listing = "、".join(f"V = {v}（V_old = {old}、R = {target}）で {e:.4g} のはずが {g:.4g}" for v, e, g in wrong)
    if all(math.isclose(2 * e, g, rel_tol=1e-4) for _, e, g in rows):
        reason = "どれもちょうど 2 倍です。二乗誤差に ½ を掛けてください。"
    elif all(math.isclose(0.5 * min((v - target) ** 2, (old + min(max(v - old, -eps), eps) - target) ** 2), g,
                          rel_tol=1e-4) for v, _, g in rows):
        reason = ("2 つの二乗誤差の小さいほう（min）を取っています。クリップで得をしないよう、大きいほう（max）を"
                  "取ります。")
    else:
        reason = ""
    raise CheckFailed(f"{listing}。{reason}{_VALUE_HINT if not reason else ''}")


@value_loss.test("ランダムなバッチで式と一致し、ε を引数で変えられ、バッチの平均を返す")
def _(answer, reference):
    g = torch.Generator().manual_seed(1)
    for eps, n in ((0.2, 64), (0.5, 7)):
        old = torch.randn(n, generator=g) * 5 + 20
        new = old + torch.randn(n, generator=g) * 0.6
        ret = old + torch.randn(n, generator=g) * 2
        got = expect_tensor(call_answer(answer, new, old, ret, eps), "損失")
        clipped = old.double() + (new - old).double().clamp(-eps, eps)
        expected = 0.5 * torch.max((new.double() - ret.double()) ** 2, (clipped - ret.double()) ** 2).mean()
        if got.numel() == 1 and math.isclose(float(got), float(expected) * n, rel_tol=1e-4):
            raise CheckFailed("損失がバッチの和になっています。平均（mean）にしてください。")
        expect_close(got.reshape(()), expected.float(), f"ε = {eps}、バッチ {n} の損失", atol=1e-4, rtol=1e-4,
                     hint=_VALUE_HINT)


@value_loss.test("new_value についての勾配: クリップした項が大きいサンプルでは 0、それ以外では (V − R) / バッチ数")
def _(answer, reference):
    eps = 0.2
    old = torch.tensor([10.0, 10.0, 10.0, 10.0, -3.0, -3.0], dtype=torch.float64)
    new = torch.tensor([10.1, 11.0, 9.0, 10.5, -3.5, -2.9], dtype=torch.float64, requires_grad=True)
    ret = torch.tensor([12.0, 12.0, 12.0, 8.0, -6.0, 0.0], dtype=torch.float64)
    loss = expect_tensor(call_answer(answer, new, old, ret, eps), "損失")
    if not loss.requires_grad:
        raise CheckFailed("損失が new_value から勾配を受け取れません（.item() や .detach() を使っていませんか）。")
    (grad,) = torch.autograd.grad(loss.sum(), new)
    d = new.detach()
    clipped = old + (d - old).clamp(-eps, eps)
    use_clipped = (clipped - ret) ** 2 > (d - ret) ** 2
    expected = torch.where(use_clipped, torch.zeros_like(d), (d - ret) / len(d))
    expect_close(grad, expected, "new_value についての勾配", atol=1e-6, rtol=1e-5,
                 hint="V_old ± ε の外で目標に近づいた値は、クリップした項のほうが大きくなり、勾配が流れません。"
                      + _VALUE_HINT)
