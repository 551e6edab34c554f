//! The parametric law `L(N, D) = E + A / N^alpha + B / D^beta` and compute-optimal allocation.
//!
//! Allocation uses the constraint `C = 6 N D` (N all parameters), the convention the built-in
//! constant sets were fitted under. Minimising `L(N, C / (6N))` gives the closed form
//! (Hoffmann et al. 2022, eq. 4):
//!
//! `N_opt = G (C/6)^a`, `D_opt = G^-1 (C/6)^b`, `G = (alpha A / (beta B))^(1/(alpha+beta))`,
//! `a = beta / (alpha + beta)`, `b = alpha / (alpha + beta)`,
//!
//! and the first-order condition `alpha A N^-alpha = beta B D^-beta` at the optimum.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{io_err, Result, ScalingError};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParametricLaw {
    #[serde(rename = "E")]
    pub e: f64,
    #[serde(rename = "A")]
    pub a: f64,
    #[serde(rename = "B")]
    pub b: f64,
    pub alpha: f64,
    pub beta: f64,
}

impl ParametricLaw {
    /// Hoffmann et al. 2022, Approach 3 (their eq. 10).
    pub const CHINCHILLA: Self = Self {
        e: 1.69,
        a: 406.4,
        b: 410.7,
        alpha: 0.34,
        beta: 0.28,
    };

    /// Besiroglu et al. 2024 (Epoch AI), "Chinchilla Scaling: A replication attempt".
    pub const EPOCH: Self = Self {
        e: 1.8172,
        a: 482.01,
        b: 2085.43,
        alpha: 0.3478,
        beta: 0.3658,
    };

    pub fn loss(&self, n: f64, d: f64) -> f64 {
        self.e + self.a / n.powf(self.alpha) + self.b / d.powf(self.beta)
    }

    /// Exponent of `N_opt ∝ C^a`.
    pub fn exponent_a(&self) -> f64 {
        self.beta / (self.alpha + self.beta)
    }

    /// Exponent of `D_opt ∝ C^b`.
    pub fn exponent_b(&self) -> f64 {
        self.alpha / (self.alpha + self.beta)
    }

    /// `G = (alpha A / (beta B))^(1/(alpha+beta))`.
    pub fn g(&self) -> f64 {
        (self.alpha * self.a / (self.beta * self.b)).powf(1.0 / (self.alpha + self.beta))
    }

    pub fn validate(&self) -> Result<()> {
        let ok = [self.e, self.a, self.b, self.alpha, self.beta]
            .iter()
            .all(|v| v.is_finite())
            && self.a > 0.0
            && self.b > 0.0
            && self.alpha > 0.0
            && self.beta > 0.0;
        if ok {
            Ok(())
        } else {
            Err(ScalingError::Fit(format!(
                "law constants must be finite with A, B, alpha, beta > 0: {self:?}"
            )))
        }
    }

    /// Compute-optimal allocation for `flops` under `C = 6 N D`.
    pub fn optimal(&self, flops: f64) -> Allocation {
        let g = self.g();
        let c6 = flops / 6.0;
        let n = g * c6.powf(self.exponent_a());
        let d = c6 / n;
        Allocation {
            flops,
            params: n,
            tokens: d,
            loss: self.loss(n, d),
            tokens_per_param: d / n,
        }
    }
}

/// An allocation of a FLOP budget (C = 6 N D).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Allocation {
    pub flops: f64,
    pub params: f64,
    pub tokens: f64,
    pub loss: f64,
    pub tokens_per_param: f64,
}

/// A law and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedLaw {
    pub name: String,
    pub law: ParametricLaw,
    /// What N counts: `params` (all parameters) for the built-in laws; for a fit, the CSV
    /// column it was fitted on (e.g. `non_embedding_params`).
    pub params_column: String,
}

/// A named law: `chinchilla`, `epoch`, or a JSON file, either `kiln scaling fit --json` output
/// (its Approach 3 constants) or a plain `{"E":..,"A":..,"B":..,"alpha":..,"beta":..}`.
pub fn load_law(spec: &str) -> Result<NamedLaw> {
    let builtin = |name: &str, law| NamedLaw {
        name: name.into(),
        law,
        params_column: "params".into(),
    };
    match spec {
        "chinchilla" => Ok(builtin(
            "Chinchilla (Hoffmann et al. 2022, Approach 3)",
            ParametricLaw::CHINCHILLA,
        )),
        "epoch" => Ok(builtin(
            "Epoch AI refit (Besiroglu et al. 2024)",
            ParametricLaw::EPOCH,
        )),
        path => {
            let p = Path::new(path);
            if !p.exists() {
                return Err(ScalingError::Config(format!(
                    "--law {path:?}: not chinchilla, epoch, or an existing JSON file"
                )));
            }
            let text = std::fs::read_to_string(p).map_err(|e| io_err(p, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ScalingError::Config(format!("{path}: not JSON: {e}")))?;
            let law =
                law_from_json(&json).map_err(|m| ScalingError::Config(format!("{path}: {m}")))?;
            law.validate()?;
            let params_column = json
                .get("params_column")
                .and_then(|v| v.as_str())
                .unwrap_or("params")
                .to_string();
            Ok(NamedLaw {
                name: format!("fitted ({path}, N = {params_column})"),
                law,
                params_column,
            })
        }
    }
}

fn law_from_json(v: &serde_json::Value) -> std::result::Result<ParametricLaw, String> {
    let obj = match v.get("approach3") {
        Some(a3) if a3.is_object() => a3,
        Some(_) => {
            return Err("\"approach3\" holds no fit (it was skipped; see approach3_skipped)".into())
        }
        None => v,
    };
    let get = |k: &str| -> std::result::Result<f64, String> {
        let x = obj
            .get(k)
            .ok_or_else(|| format!("missing key {k:?} (expected E, A, B, alpha, beta)"))?;
        x.as_f64()
            .or_else(|| x.get("value").and_then(|v| v.as_f64()))
            .ok_or_else(|| format!("key {k:?} is not a number or {{\"value\": number}}"))
    };
    Ok(ParametricLaw {
        e: get("E")?,
        a: get("A")?,
        b: get("B")?,
        alpha: get("alpha")?,
        beta: get("beta")?,
    })
}

/// Well-known training runs for the planner's comparison table.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KnownRun {
    pub name: &'static str,
    pub params: f64,
    pub tokens: f64,
}

pub const KNOWN_RUNS: &[KnownRun] = &[
    KnownRun {
        name: "GPT-3 175B",
        params: 175e9,
        tokens: 300e9,
    },
    KnownRun {
        name: "Chinchilla 70B",
        params: 70e9,
        tokens: 1.4e12,
    },
    KnownRun {
        name: "LLaMA 2 70B",
        params: 70e9,
        tokens: 2e12,
    },
];

/// A known run next to what the law says its compute should have bought.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KnownRunComparison {
    pub run: KnownRun,
    pub flops: f64,
    pub tokens_per_param: f64,
    pub loss: f64,
    pub optimal: Allocation,
}

pub fn compare_known_runs(law: &ParametricLaw) -> Vec<KnownRunComparison> {
    KNOWN_RUNS
        .iter()
        .map(|r| {
            let flops = 6.0 * r.params * r.tokens;
            KnownRunComparison {
                run: *r,
                flops,
                tokens_per_param: r.tokens / r.params,
                loss: law.loss(r.params, r.tokens),
                optimal: law.optimal(flops),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimum_beats_neighbours() {
        for law in [ParametricLaw::CHINCHILLA, ParametricLaw::EPOCH] {
            for c in [1e15, 1e19, 1e23] {
                let o = law.optimal(c);
                for f in [0.9, 1.1] {
                    let n = o.params * f;
                    assert!(law.loss(n, c / (6.0 * n)) > o.loss);
                }
            }
        }
    }

    #[test]
    fn law_json_forms() {
        let plain = serde_json::json!({"E": 1.0, "A": 2.0, "B": 3.0, "alpha": 0.3, "beta": 0.4});
        assert_eq!(law_from_json(&plain).unwrap().b, 3.0);
        let fit = serde_json::json!({"approach3": {"E": {"value": 1.0, "ci": [0.9, 1.1]},
            "A": {"value": 2.0}, "B": {"value": 3.0}, "alpha": {"value": 0.3}, "beta": {"value": 0.4}}});
        assert_eq!(law_from_json(&fit).unwrap().alpha, 0.3);
        let err = law_from_json(&serde_json::json!({"E": 1.0})).unwrap_err();
        assert!(err.contains("\"A\""), "{err}");
    }
}
