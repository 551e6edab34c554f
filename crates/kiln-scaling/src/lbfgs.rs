//! A small L-BFGS minimiser (Nocedal & Wright, Algorithm 7.4 two-loop recursion) with a
//! weak-Wolfe bracketing line search (Lewis & Overton 2013), which also behaves on the Huber
//! objective's kinks.

/// Stopping rules.
#[derive(Debug, Clone, Copy)]
pub struct LbfgsOptions {
    /// History pairs kept.
    pub memory: usize,
    pub max_iter: usize,
    /// Stop when `max |g_i| <= gtol`.
    pub gtol: f64,
    /// Stop when the relative decrease of f over one iteration is below `ftol`.
    pub ftol: f64,
}

impl Default for LbfgsOptions {
    fn default() -> Self {
        Self {
            memory: 10,
            max_iter: 500,
            gtol: 1e-10,
            ftol: 1e-13,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LbfgsResult {
    pub x: Vec<f64>,
    pub f: f64,
    pub iterations: usize,
    /// A stopping rule was met (not the iteration cap or a failed line search).
    pub converged: bool,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimises `f`, which returns the value and writes the gradient into its second argument.
pub fn minimize(
    mut f: impl FnMut(&[f64], &mut [f64]) -> f64,
    x0: &[f64],
    opts: &LbfgsOptions,
) -> LbfgsResult {
    let n = x0.len();
    let mut x = x0.to_vec();
    let mut g = vec![0.0; n];
    let mut fx = f(&x, &mut g);
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut rho_hist: Vec<f64> = Vec::new();
    let mut x_new = vec![0.0; n];
    let mut g_new = vec![0.0; n];
    if !fx.is_finite() {
        return LbfgsResult {
            x,
            f: fx,
            iterations: 0,
            converged: false,
        };
    }
    for iter in 0..opts.max_iter {
        if g.iter().all(|v| v.abs() <= opts.gtol) {
            return LbfgsResult {
                x,
                f: fx,
                iterations: iter,
                converged: true,
            };
        }
        // Two-loop recursion: d = -H g.
        let mut q: Vec<f64> = g.clone();
        let k = s_hist.len();
        let mut alphas = vec![0.0; k];
        for i in (0..k).rev() {
            alphas[i] = rho_hist[i] * dot(&s_hist[i], &q);
            for (qj, yj) in q.iter_mut().zip(&y_hist[i]) {
                *qj -= alphas[i] * yj;
            }
        }
        let gamma = if k > 0 {
            dot(&s_hist[k - 1], &y_hist[k - 1]) / dot(&y_hist[k - 1], &y_hist[k - 1])
        } else {
            1.0 / dot(&g, &g).sqrt().max(1e-300)
        };
        for qj in q.iter_mut() {
            *qj *= gamma;
        }
        for i in 0..k {
            let beta = rho_hist[i] * dot(&y_hist[i], &q);
            for (qj, sj) in q.iter_mut().zip(&s_hist[i]) {
                *qj += (alphas[i] - beta) * sj;
            }
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope.is_nan() || slope >= 0.0 {
            // Not a descent direction: restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            rho_hist.clear();
            let gn = dot(&g, &g).sqrt().max(1e-300);
            d = g.iter().map(|v| -v / gn).collect();
            slope = dot(&g, &d);
        }
        // Weak Wolfe line search by bracketing and bisection.
        let (c1, c2) = (1e-4, 0.9);
        let (mut lo, mut hi) = (0.0f64, f64::INFINITY);
        let mut t = 1.0;
        let mut found = false;
        let mut f_new = fx;
        for _ in 0..60 {
            for i in 0..n {
                x_new[i] = x[i] + t * d[i];
            }
            f_new = f(&x_new, &mut g_new);
            if !f_new.is_finite() || f_new > fx + c1 * t * slope {
                hi = t;
            } else if dot(&g_new, &d) < c2 * slope {
                lo = t;
            } else {
                found = true;
                break;
            }
            t = if hi.is_finite() {
                0.5 * (lo + hi)
            } else {
                2.0 * lo
            };
            if hi.is_finite() && (hi - lo) < 1e-16 * hi.max(1.0) {
                break;
            }
        }
        if !found {
            // Accept any strict decrease found at the last trial; otherwise stop here.
            if !(f_new.is_finite() && f_new < fx) {
                return LbfgsResult {
                    x,
                    f: fx,
                    iterations: iter,
                    converged: false,
                };
            }
        }
        let s: Vec<f64> = (0..n).map(|i| x_new[i] - x[i]).collect();
        let y: Vec<f64> = (0..n).map(|i| g_new[i] - g[i]).collect();
        let sy = dot(&s, &y);
        let decrease = fx - f_new;
        x.copy_from_slice(&x_new);
        g.copy_from_slice(&g_new);
        let f_old = fx;
        fx = f_new;
        if sy > 1e-12 * dot(&s, &s).sqrt() * dot(&y, &y).sqrt() && sy > 0.0 {
            if s_hist.len() == opts.memory {
                s_hist.remove(0);
                y_hist.remove(0);
                rho_hist.remove(0);
            }
            rho_hist.push(1.0 / sy);
            s_hist.push(s);
            y_hist.push(y);
        }
        if decrease.abs() <= opts.ftol * f_old.abs().max(fx.abs()).max(1e-300) {
            return LbfgsResult {
                x,
                f: fx,
                iterations: iter + 1,
                converged: true,
            };
        }
    }
    LbfgsResult {
        x,
        f: fx,
        iterations: opts.max_iter,
        converged: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rosenbrock() {
        let r = minimize(
            |x, g| {
                let (a, b) = (x[0], x[1]);
                g[0] = -2.0 * (1.0 - a) - 400.0 * a * (b - a * a);
                g[1] = 200.0 * (b - a * a);
                (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2)
            },
            &[-1.2, 1.0],
            &LbfgsOptions::default(),
        );
        assert!(r.converged, "{r:?}");
        assert!(
            (r.x[0] - 1.0).abs() < 1e-5 && (r.x[1] - 1.0).abs() < 1e-5,
            "{r:?}"
        );
    }

    #[test]
    fn quadratic_in_five_dims() {
        let target = [1.0, -2.0, 3.0, 0.5, 10.0];
        let r = minimize(
            |x, g| {
                let mut f = 0.0;
                for i in 0..5 {
                    let w = (i + 1) as f64;
                    g[i] = 2.0 * w * (x[i] - target[i]);
                    f += w * (x[i] - target[i]).powi(2);
                }
                f
            },
            &[0.0; 5],
            &LbfgsOptions::default(),
        );
        for (x, t) in r.x.iter().zip(&target) {
            assert!((x - t).abs() < 1e-6, "{r:?}");
        }
    }
}
