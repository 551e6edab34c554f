//! The objectives of preference tuning as plain functions of small vectors, each returning its
//! value and its gradient with respect to what the model produced (scores, sequence or token
//! log-probabilities, values). The model's heads then carry those gradients back through the
//! trunk. Definitions follow TRL (`RewardTrainer`, `DPOTrainer`, the last `PPOTrainer`,
//! `GRPOTrainer`) so that numbers agree with it; `tests/fixtures/losses.json` holds values
//! computed by PyTorch for the same inputs (`scripts/make_loss_fixtures.py`).

use serde::{Deserialize, Serialize};

/// `log σ(x)`, stable for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// A loss over a batch and its gradient with respect to each of two inputs per item.
#[derive(Debug, Clone, PartialEq)]
pub struct PairLoss {
    /// Mean over the batch.
    pub loss: f64,
    /// `d loss / d first[i]` (the chosen side).
    pub d_chosen: Vec<f64>,
    /// `d loss / d second[i]` (the rejected side).
    pub d_rejected: Vec<f64>,
}

/// Bradley–Terry reward-model loss: `mean(-log σ(r_c - r_r - margin)) + coef * mean((r_c +
/// r_r)^2)` (the second term, TRL's `center_rewards_coefficient`, keeps rewards centred on 0).
pub fn bradley_terry(
    chosen: &[f64],
    rejected: &[f64],
    margins: &[f64],
    center_coef: f64,
) -> PairLoss {
    let n = chosen.len() as f64;
    let mut out = PairLoss {
        loss: 0.0,
        d_chosen: vec![0.0; chosen.len()],
        d_rejected: vec![0.0; chosen.len()],
    };
    for i in 0..chosen.len() {
        let z = chosen[i] - rejected[i] - margins.get(i).copied().unwrap_or(0.0);
        let sum = chosen[i] + rejected[i];
        out.loss += (-log_sigmoid(z) + center_coef * sum * sum) / n;
        // d(-log σ(z))/dz = -σ(-z); the centring term adds 2 coef (r_c + r_r) to both.
        let g = -sigmoid(-z) / n;
        let c = 2.0 * center_coef * sum / n;
        out.d_chosen[i] = g + c;
        out.d_rejected[i] = -g + c;
    }
    out
}

/// DPO's loss variants, as TRL names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// `-(1-ε) log σ(β h) - ε log σ(-β h)` (Rafailov et al.; ε: conservative DPO).
    #[default]
    Sigmoid,
    /// `(h - 1/(2β))^2` on length-normalised log-probabilities (Azar et al.).
    Ipo,
    /// `max(0, 1 - β h)` (SLiC).
    Hinge,
}

impl DpoLoss {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sigmoid" => Some(Self::Sigmoid),
            "ipo" => Some(Self::Ipo),
            "hinge" => Some(Self::Hinge),
            _ => None,
        }
    }

    /// IPO compares mean log-probabilities per completion token, the others sums.
    pub fn length_normalised(self) -> bool {
        self == Self::Ipo
    }
}

/// DPO over a batch: `h = (π_c - π_r) - (ref_c - ref_r)` from the policy's and the reference's
/// completion log-probabilities (sums, or means per token for IPO: the caller passes what
/// [`DpoLoss::length_normalised`] asks for). Gradients are with respect to `π_c` and `π_r`.
/// The implicit rewards are `β (π - ref)`.
pub fn dpo(
    kind: DpoLoss,
    beta: f64,
    label_smoothing: f64,
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    ref_chosen: &[f64],
    ref_rejected: &[f64],
) -> PairLoss {
    let n = policy_chosen.len() as f64;
    let mut out = PairLoss {
        loss: 0.0,
        d_chosen: vec![0.0; policy_chosen.len()],
        d_rejected: vec![0.0; policy_chosen.len()],
    };
    for i in 0..policy_chosen.len() {
        let h = (policy_chosen[i] - policy_rejected[i]) - (ref_chosen[i] - ref_rejected[i]);
        let (loss, dh) = match kind {
            DpoLoss::Sigmoid => {
                let e = label_smoothing;
                (
                    -(1.0 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h),
                    -(1.0 - e) * beta * sigmoid(-beta * h) + e * beta * sigmoid(beta * h),
                )
            }
            DpoLoss::Ipo => {
                let d = h - 1.0 / (2.0 * beta);
                (d * d, 2.0 * d)
            }
            DpoLoss::Hinge => {
                let m = 1.0 - beta * h;
                if m > 0.0 {
                    (m, -beta)
                } else {
                    (0.0, 0.0)
                }
            }
        };
        out.loss += loss / n;
        out.d_chosen[i] = dh / n;
        out.d_rejected[i] = -dh / n;
    }
    out
}

/// Generalised advantage estimation over one response: per-token `rewards` and `values`
/// (`V(s_t)`, the value before token t), with the value after the last token 0.
/// `δ_t = r_t + γ V_{t+1} - V_t`, `A_t = δ_t + γ λ A_{t+1}`; returns `(advantages, returns)`
/// with `returns = A + V`.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lambda * next_adv;
        adv[t] = next_adv;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// Whitens values in place across all of them (TRL's `masked_whiten` over the valid tokens):
/// `(x - mean) / sqrt(var + 1e-8)`, adding the mean back when `shift_mean` is false. The
/// variance is the unbiased one, as `torch.var` computes it.
pub fn whiten(x: &mut [f64], shift_mean: bool) {
    let n = x.len();
    if n < 2 {
        return;
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
    let inv = 1.0 / (var + 1e-8).sqrt();
    for v in x.iter_mut() {
        let w = (*v - mean) * inv;
        *v = if shift_mean { w } else { w + mean };
    }
}

/// GRPO's group-relative advantages: `(r - mean) / (std + 1e-4)` within each group of
/// `group_size` consecutive rewards (`std` unbiased, as `torch.std`).
pub fn group_advantages(rewards: &[f64], group_size: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group_size) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let std = if g.len() > 1 {
            (g.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        out.extend(g.iter().map(|r| (r - mean) / (std + 1e-4)));
    }
    out
}

/// The clipped surrogate for one token: `max(-A ρ, -A clip(ρ, 1-ε, 1+ε))` with `ρ =
/// exp(logp - old_logp)`; returns `(loss, d loss / d logp, clipped)` where `clipped` says the
/// clipped branch was the larger (PPO's clip fraction counts these).
pub fn clipped_surrogate(logp: f64, old_logp: f64, advantage: f64, eps: f64) -> (f64, f64, bool) {
    let ratio = (logp - old_logp).exp();
    let unclipped = -advantage * ratio;
    let clamped = ratio.clamp(1.0 - eps, 1.0 + eps);
    let clipped = -advantage * clamped;
    if clipped > unclipped {
        // The clipped branch is flat in logp where the clamp is active.
        let inside = ratio > 1.0 - eps && ratio < 1.0 + eps;
        let g = if inside { -advantage * ratio } else { 0.0 };
        (clipped, g, true)
    } else {
        (unclipped, -advantage * ratio, false)
    }
}

/// PPO's clipped value loss for one token: `0.5 max((v - R)^2, (clip(v, v_old ± ε) - R)^2)`;
/// returns `(loss, d loss / d v, clipped)`.
pub fn clipped_value_loss(value: f64, old_value: f64, ret: f64, eps: f64) -> (f64, f64, bool) {
    let l1 = (value - ret) * (value - ret);
    let vc = value.clamp(old_value - eps, old_value + eps);
    let l2 = (vc - ret) * (vc - ret);
    if l2 > l1 {
        let inside = value > old_value - eps && value < old_value + eps;
        let g = if inside { value - ret } else { 0.0 };
        (0.5 * l2, g, true)
    } else {
        (0.5 * l1, value - ret, false)
    }
}

/// The k3 estimator of `KL(π || ref)` at one token (Schulman): `exp(ref - logp) - (ref - logp)
/// - 1`, always ≥ 0; returns `(kl, d kl / d logp)`.
pub fn kl_k3(logp: f64, ref_logp: f64) -> (f64, f64) {
    let d = ref_logp - logp;
    (d.exp() - d - 1.0, -d.exp() + 1.0)
}

/// Ziegler et al.'s adaptive KL coefficient: moves `coef` so that the measured KL approaches
/// `target` over `horizon` samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdaptiveKl {
    pub coef: f64,
    pub target: f64,
    pub horizon: f64,
}

impl AdaptiveKl {
    pub fn update(&mut self, kl: f64, n_samples: usize) {
        let error = (kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.coef *= 1.0 + error * n_samples as f64 / self.horizon;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(f: impl Fn(f64) -> f64, x: f64) -> f64 {
        let h = 1e-6;
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    #[test]
    fn gae_matches_a_hand_computation() {
        // γ = 1, λ = 0.5, rewards [0, 0, 1], values [0.5, 0.2, 0.4]:
        // δ = [0 + 0.2 - 0.5, 0 + 0.4 - 0.2, 1 + 0 - 0.4] = [-0.3, 0.2, 0.6]
        // A_2 = 0.6; A_1 = 0.2 + 0.5 * 0.6 = 0.5; A_0 = -0.3 + 0.5 * 0.5 = -0.05
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 1.0, 0.5);
        let want = [-0.05, 0.5, 0.6];
        for i in 0..3 {
            assert!((a[i] - want[i]).abs() < 1e-12, "{a:?}");
        }
        assert!((r[0] - 0.45).abs() < 1e-12 && (r[2] - 1.0).abs() < 1e-12);
        // γ = λ = 1: every advantage is the return to go minus the value.
        let (a, _) = gae(&[1.0, 2.0, 3.0], &[0.0, 0.0, 0.0], 1.0, 1.0);
        assert_eq!(a, vec![6.0, 5.0, 3.0]);
        // γ = 0.9, λ = 0: one-step TD errors.
        let (a, _) = gae(&[1.0, 1.0], &[2.0, 3.0], 0.9, 0.0);
        assert!((a[0] - (1.0 + 0.9 * 3.0 - 2.0)).abs() < 1e-12 && (a[1] + 2.0).abs() < 1e-12);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (c, r, m) = ([0.3, -1.2], [0.1, 0.4], [0.0, 0.5]);
        let bt = bradley_terry(&c, &r, &m, 0.01);
        for i in 0..2 {
            let f = |x: f64| {
                let mut cc = c;
                cc[i] = x;
                bradley_terry(&cc, &r, &m, 0.01).loss
            };
            assert!((fd(f, c[i]) - bt.d_chosen[i]).abs() < 1e-7);
            let f = |x: f64| {
                let mut rr = r;
                rr[i] = x;
                bradley_terry(&c, &rr, &m, 0.01).loss
            };
            assert!((fd(f, r[i]) - bt.d_rejected[i]).abs() < 1e-7);
        }
        for kind in [DpoLoss::Sigmoid, DpoLoss::Ipo, DpoLoss::Hinge] {
            let (pc, pr, rc, rr) = ([-10.0, -3.0], [-12.0, -2.5], [-11.0, -3.2], [-11.5, -2.0]);
            let l = dpo(kind, 0.1, 0.1, &pc, &pr, &rc, &rr);
            for i in 0..2 {
                let f = |x: f64| {
                    let mut a = pc;
                    a[i] = x;
                    dpo(kind, 0.1, 0.1, &a, &pr, &rc, &rr).loss
                };
                assert!((fd(f, pc[i]) - l.d_chosen[i]).abs() < 1e-6, "{kind:?}");
                let f = |x: f64| {
                    let mut a = pr;
                    a[i] = x;
                    dpo(kind, 0.1, 0.1, &pc, &a, &rc, &rr).loss
                };
                assert!((fd(f, pr[i]) - l.d_rejected[i]).abs() < 1e-6, "{kind:?}");
            }
        }
        for (lp, old, a) in [(-1.0, -1.05, 0.7), (-1.0, -1.5, 0.7), (-2.0, -1.0, -0.3)] {
            let (_, g, _) = clipped_surrogate(lp, old, a, 0.2);
            let f = |x: f64| clipped_surrogate(x, old, a, 0.2).0;
            assert!((fd(f, lp) - g).abs() < 1e-6, "{lp} {old} {a}");
        }
        for (v, old, ret) in [(0.1, 0.0, 1.0), (0.5, 0.0, 1.0), (-0.5, 0.0, 1.0)] {
            let (_, g, _) = clipped_value_loss(v, old, ret, 0.2);
            let f = |x: f64| clipped_value_loss(x, old, ret, 0.2).0;
            assert!((fd(f, v) - g).abs() < 1e-6, "{v}");
        }
        let (_, g) = kl_k3(-1.3, -0.9);
        assert!((fd(|x| kl_k3(x, -0.9).0, -1.3) - g).abs() < 1e-6);
    }

    #[test]
    fn at_the_rollout_policy_the_ratio_is_one_and_nothing_clips() {
        for a in [-2.0, 0.0, 3.0] {
            let (loss, g, clipped) = clipped_surrogate(-0.7, -0.7, a, 0.2);
            assert_eq!((loss, g, clipped), (-a, -a, false));
        }
        assert_eq!(kl_k3(-0.4, -0.4), (0.0, 0.0));
    }

    #[test]
    fn group_advantages_and_whitening() {
        let a = group_advantages(&[1.0, 0.0, 1.0, 0.0, 0.5, 0.5], 2);
        assert!((a[0] - 0.5 / (0.5f64.sqrt() + 1e-4)).abs() < 1e-12);
        assert_eq!(&a[4..], &[0.0, 0.0]); // a group that agrees teaches nothing
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut x, true);
        let mean: f64 = x.iter().sum::<f64>() / 4.0;
        let var: f64 = x.iter().map(|v| v * v).sum::<f64>() / 3.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-6);
        let mut y = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut y, false);
        assert!((y.iter().sum::<f64>() / 4.0 - 2.5).abs() < 1e-12);
    }

    #[test]
    fn adaptive_kl_moves_towards_the_target() {
        let mut k = AdaptiveKl {
            coef: 0.1,
            target: 6.0,
            horizon: 10_000.0,
        };
        k.update(12.0, 1000);
        assert!((k.coef - 0.1 * 1.02).abs() < 1e-12);
        k.update(0.0, 1000);
        assert!(k.coef < 0.102);
    }
}
