"""Chapter 7's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make, each with a phrase the verdict must contain.
"""

import numpy as np
import torch

# --------------------------------------------------------------------------- compute_gae


def gae_by_matrix(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Correct: no loop over time steps; A = W δ with W[t, k] = Π_{t≤j<k} γλ(1 − d_j), built by cumulative products."""
    T = rewards.shape[0]
    not_done = (~dones).to(values.dtype)
    next_values = torch.cat([values[1:], last_value[None]])
    deltas = rewards + gamma * next_values * not_done - values
    factors = gamma * gae_lambda * not_done                       # (T, N)
    advantages = torch.zeros_like(values)
    for n in range(rewards.shape[1]):
        f = factors[:, n]
        W = torch.zeros(T, T, dtype=values.dtype)
        for t in range(T):
            W[t, t:] = torch.cat([torch.ones(1, dtype=values.dtype), torch.cumprod(f[t:T - 1], 0)])
        advantages[:, n] = W @ deltas[:, n]
    return advantages, advantages + values


def gae_as_lambda_return(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Correct: the λ-return first, G_t = r_t + γ(1 − d_t)((1 − λ) V(s_{t+1}) + λ G_{t+1}), then A = G − V."""
    returns = torch.zeros_like(values)
    g = last_value
    next_value = last_value
    for t in range(rewards.shape[0] - 1, -1, -1):
        keep = (~dones[t]).to(values.dtype)
        g = rewards[t] + gamma * keep * ((1 - gae_lambda) * next_value + gae_lambda * g)
        returns[t] = g
        next_value = values[t]
    return returns - values, returns


def gae_in_numpy(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Correct: computed in NumPy with a list, converted back to tensors of the inputs' dtype."""
    r, v, d, lv = (x.detach().numpy() for x in (rewards, values, dones, last_value))
    adv = []
    running = np.zeros_like(lv)
    for t in reversed(range(len(r))):
        nxt = lv if t == len(r) - 1 else v[t + 1]
        mask = 1.0 - d[t].astype(v.dtype)
        running = r[t] + gamma * nxt * mask - v[t] + gamma * gae_lambda * mask * running
        adv.insert(0, running)
    advantages = torch.from_numpy(np.stack(adv)).to(values.dtype)
    return advantages, advantages + values


def _gae(rewards, values, dones, last_value, gamma, gae_lambda, *, bootstrap_mask, trace_mask, trace, end_value):
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(last_value)
    T = rewards.shape[0]
    for t in reversed(range(T)):
        next_value = end_value(last_value) if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value * bootstrap_mask(dones, t) - values[t]
        running = delta + trace(gamma, gae_lambda) * trace_mask(dones, t) * running
        advantages[t] = running
    return advantages


def _keep(dones, t):
    return (~dones[t]).to(torch.float64 if dones.dtype == torch.float64 else torch.float32)


def _keep_next(dones, t):
    """Reads dones[t + 1]: 'the next state is a new episode' shifted by one step."""
    return (~dones[t + 1]).float() if t + 1 < dones.shape[0] else torch.ones(dones.shape[1])


def gae_ignores_dones(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Wrong: bootstraps and carries the trace across episode ends."""
    adv = _gae(rewards, values, dones, last_value, gamma, gae_lambda, bootstrap_mask=lambda d, t: 1.0,
               trace_mask=lambda d, t: 1.0, trace=lambda g, lam: g * lam, end_value=lambda v: v)
    return adv, adv + values


def gae_dones_shifted(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Wrong: masks with dones[t + 1] (as if dones marked the first step of an episode)."""
    adv = _gae(rewards, values, dones, last_value, gamma, gae_lambda, bootstrap_mask=_keep_next,
               trace_mask=_keep_next, trace=lambda g, lam: g * lam, end_value=lambda v: v)
    return adv, adv + values


def gae_trace_without_gamma(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Wrong: A_t = δ_t + λ A_{t+1} (γ missing from the trace)."""
    adv = _gae(rewards, values, dones, last_value, gamma, gae_lambda, bootstrap_mask=_keep, trace_mask=_keep,
               trace=lambda g, lam: lam, end_value=lambda v: v)
    return adv, adv + values


def gae_returns_are_advantages(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Wrong: returns the advantages twice (returns = advantages, not advantages + values)."""
    adv = _gae(rewards, values, dones, last_value, gamma, gae_lambda, bootstrap_mask=_keep, trace_mask=_keep,
               trace=lambda g, lam: g * lam, end_value=lambda v: v)
    return adv, adv.clone()


def gae_without_bootstrap(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Wrong: last_value unused, the value after the rollout taken as 0."""
    adv = _gae(rewards, values, dones, last_value, gamma, gae_lambda, bootstrap_mask=_keep, trace_mask=_keep,
               trace=lambda g, lam: g * lam, end_value=torch.zeros_like)
    return adv, adv + values


def gae_masks_only_the_trace(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Wrong: the trace stops at episode ends but δ_t still bootstraps from the next episode's first state."""
    adv = _gae(rewards, values, dones, last_value, gamma, gae_lambda, bootstrap_mask=lambda d, t: 1.0,
               trace_mask=_keep, trace=lambda g, lam: g * lam, end_value=lambda v: v)
    return adv, adv + values


def gae_forwards(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95):
    """Wrong: the recursion run forwards in time (A_t from A_{t−1})."""
    not_done = (~dones).to(values.dtype)
    next_values = torch.cat([values[1:], last_value[None]])
    deltas = rewards + gamma * next_values * not_done - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(last_value)
    for t in range(rewards.shape[0]):
        running = deltas[t] + gamma * gae_lambda * running
        advantages[t] = running
        running = running * not_done[t]
    return advantages, advantages + values


# --------------------------------------------------------------------------- ppo_clip_loss


def clip_loss_cleanrl_style(new_logprob, old_logprob, advantages, clip_coef=0.2):
    """Correct: the maximum of the negated terms."""
    ratio = torch.exp(new_logprob - old_logprob)
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()


def clip_loss_with_where(new_logprob, old_logprob, advantages, clip_coef=0.2):
    """Correct: picks the bound by the sign of the advantage: min(ρ, 1 + ε)·A for A ≥ 0, max(ρ, 1 − ε)·A for A < 0."""
    ratio = (new_logprob - old_logprob).exp()
    bounded = torch.where(advantages >= 0, torch.clamp(ratio, max=1 + clip_coef), torch.clamp(ratio, min=1 - clip_coef))
    return -(bounded * advantages).sum() / advantages.numel()


def clip_loss_with_max(new_logprob, old_logprob, advantages, clip_coef=0.2):
    """Wrong: max instead of min (an optimistic bound)."""
    ratio = (new_logprob - old_logprob).exp()
    return -torch.max(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages).mean()


def clip_loss_clips_advantage(new_logprob, old_logprob, advantages, clip_coef=0.2):
    """Wrong: clips the advantage instead of the ratio."""
    ratio = (new_logprob - old_logprob).exp()
    return -torch.min(ratio * advantages, ratio * advantages.clamp(1 - clip_coef, 1 + clip_coef)).mean()


def clip_loss_without_minus(new_logprob, old_logprob, advantages, clip_coef=0.2):
    """Wrong: the objective itself, not negated."""
    ratio = (new_logprob - old_logprob).exp()
    return torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages).mean()


def clip_loss_summed(new_logprob, old_logprob, advantages, clip_coef=0.2):
    """Wrong: the sum over the batch, not the mean."""
    ratio = (new_logprob - old_logprob).exp()
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages).sum()


def clip_loss_ratio_detached(new_logprob, old_logprob, advantages, clip_coef=0.2):
    """Wrong: the ratio computed from a detached copy, so no gradient reaches the policy."""
    ratio = (new_logprob.detach() - old_logprob).exp()
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages).mean()


def clip_loss_probability_difference(new_logprob, old_logprob, advantages, clip_coef=0.2):
    """Wrong: ρ taken as π_new − π_old + 1 (a difference of probabilities, not their ratio)."""
    ratio = new_logprob.exp() - old_logprob.exp() + 1
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages).mean()


# --------------------------------------------------------------------------- clipped_value_loss


def value_loss_clamp_bounds(new_value, old_value, returns, clip_coef=0.2):
    """Correct: clamp with tensor bounds around the old value."""
    clipped = torch.clamp(new_value, old_value - clip_coef, old_value + clip_coef)
    return torch.maximum((new_value - returns).pow(2), (clipped - returns).pow(2)).mean() / 2


def value_loss_with_mse(new_value, old_value, returns, clip_coef=0.2):
    """Correct: both terms as elementwise MSE, then the larger one, then the mean times ½."""
    import torch.nn.functional as F

    clipped = old_value + torch.clamp(new_value - old_value, -clip_coef, clip_coef)
    unclipped_sq = F.mse_loss(new_value, returns, reduction="none")
    clipped_sq = F.mse_loss(clipped, returns, reduction="none")
    return 0.5 * torch.where(clipped_sq > unclipped_sq, clipped_sq, unclipped_sq).mean()


def value_loss_with_min(new_value, old_value, returns, clip_coef=0.2):
    """Wrong: the smaller of the two squared errors."""
    clipped = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
    return 0.5 * torch.min((new_value - returns) ** 2, (clipped - returns) ** 2).mean()


def value_loss_clips_the_value(new_value, old_value, returns, clip_coef=0.2):
    """Wrong: clips the value itself to [−ε, ε] instead of its change from the old value."""
    clipped = new_value.clamp(-clip_coef, clip_coef)
    return 0.5 * torch.max((new_value - returns) ** 2, (clipped - returns) ** 2).mean()


def value_loss_without_half(new_value, old_value, returns, clip_coef=0.2):
    """Wrong: the factor ½ left out."""
    clipped = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
    return torch.max((new_value - returns) ** 2, (clipped - returns) ** 2).mean()


def value_loss_around_returns(new_value, old_value, returns, clip_coef=0.2):
    """Wrong: clips the value to within ε of the target instead of the old value."""
    clipped = returns + (new_value - returns).clamp(-clip_coef, clip_coef)
    return 0.5 * torch.max((new_value - returns) ** 2, (clipped - returns) ** 2).mean()


def value_loss_clipped_term_only(new_value, old_value, returns, clip_coef=0.2):
    """Wrong: only the clipped term (no max), so a value that overshoots away from the target is not pulled back."""
    clipped = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
    return 0.5 * ((clipped - returns) ** 2).mean()


CORRECT = {
    "compute_gae": [gae_by_matrix, gae_as_lambda_return, gae_in_numpy],
    "ppo_clip_loss": [clip_loss_cleanrl_style, clip_loss_with_where],
    "clipped_value_loss": [value_loss_clamp_bounds, value_loss_with_mse],
}

WRONG = {
    "compute_gae": [
        (gae_ignores_dones, "dones[t] が True"),
        (gae_dones_shifted, "dones[t + 1] ではありません"),
        (gae_trace_without_gamma, "γ も掛けて"),
        (gae_returns_are_advantages, "advantages + values"),
        (gae_without_bootstrap, "last_value"),
        (gae_masks_only_the_trace, "dones[t] が True"),
        (gae_forwards, "逆向き"),
    ],
    "ppo_clip_loss": [
        (clip_loss_with_max, "min"),
        (clip_loss_clips_advantage, "クリップするのは比 ρ"),
        (clip_loss_without_minus, "符号が逆"),
        (clip_loss_summed, "平均"),
        (clip_loss_ratio_detached, "勾配"),
        (clip_loss_probability_difference, "ρ = 0.5"),
    ],
    "clipped_value_loss": [
        (value_loss_with_min, "max"),
        (value_loss_clips_the_value, "V_old からの変化"),
        (value_loss_without_half, "½"),
        (value_loss_around_returns, "V_old からの変化"),
        (value_loss_clipped_term_only, "V = 9.0"),
    ],
}
