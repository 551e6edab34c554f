//! Which instruction set the kernels use: the best this CPU runs, or one forced for comparisons
//! (`kiln --isa avx2 bench generate ...`). One process-wide choice, read once at the entry of
//! each kernel call (quantised matmuls, attention) and passed down, so a call never mixes paths.
//!
//! The element-wise training kernels (norms, RoPE, activations, cross-entropy, AdamW) are
//! portable loops that the compiler vectorises for the build's baseline target, and the dense
//! matmuls are candle's (the `gemm` crate picks its own ISA at run time); neither has a switch.

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level with kernels of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable code: the reference every other path is tested against.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C (most laptops, desktops and servers since 2013-15).
    Avx2,
    /// AVX2 plus AVX-512 F and BW.
    Avx512,
    /// aarch64 (NEON is its baseline; the portable kernels are compiled with it).
    Neon,
}

/// Why a level cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum IsaError {
    #[error("unknown instruction set {0:?} (expected auto, avx512, avx2, neon or scalar)")]
    Unknown(String),
    #[error(
        "this CPU cannot run the {wanted} kernels (it has: {features}; the best it runs is {best})"
    )]
    Unavailable {
        wanted: &'static str,
        features: String,
        best: &'static str,
    },
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// `auto` is None (the best level); anything else names a level.
    pub fn parse(s: &str) -> Result<Option<Isa>, IsaError> {
        Ok(Some(match s.to_ascii_lowercase().as_str() {
            "auto" => return Ok(None),
            "scalar" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "avx512" | "avx-512" => Isa::Avx512,
            "neon" => Isa::Neon,
            _ => return Err(IsaError::Unknown(s.to_string())),
        }))
    }

    /// Whether this CPU runs the level's kernels.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
            }
            Isa::Neon => cfg!(target_arch = "aarch64"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best level this CPU runs.
    pub fn detected() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2, Isa::Neon]
                .into_iter()
                .find(|l| l.available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Every level this CPU runs, scalar first (tests run each).
    pub fn all_available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon]
            .into_iter()
            .filter(|l| l.available())
            .collect()
    }
}

/// 0: auto; otherwise `1 + ` the forced level's index.
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Forces a level for every later kernel call (None: the best the CPU runs). Errors, changing
/// nothing, when the CPU cannot run it.
pub fn set_isa(isa: Option<Isa>) -> Result<(), IsaError> {
    let code = match isa {
        None => 0,
        Some(l) if !l.available() => {
            return Err(IsaError::Unavailable {
                wanted: l.name(),
                features: cpu_features().join(" "),
                best: Isa::detected().name(),
            })
        }
        Some(l) => 1 + l as u8,
    };
    FORCED.store(code, Ordering::Relaxed);
    Ok(())
}

/// The level kernels use now.
pub fn active_isa() -> Isa {
    match FORCED.load(Ordering::Relaxed) {
        1 => Isa::Scalar,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        4 => Isa::Neon,
        _ => Isa::detected(),
    }
}

/// The SIMD features of this CPU that matter to kiln's and llama.cpp's kernels, for reports
/// next to every figure.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found: Vec<&'static str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {
                $(if is_x86_feature_detected!($f) { found.push($f); })*
            };
        }
        probe!(
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avxvnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        found.push("neon");
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            found.push("dotprod");
        }
        if std::arch::is_aarch64_feature_detected!("i8mm") {
            found.push("i8mm");
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_scalar_is_always_there() {
        for l in [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon] {
            assert_eq!(Isa::parse(l.name()).unwrap(), Some(l));
        }
        assert_eq!(Isa::parse("auto").unwrap(), None);
        assert!(Isa::parse("sse9").is_err());
        assert_eq!(Isa::all_available()[0], Isa::Scalar);
        assert!(Isa::all_available().contains(&Isa::detected()));
    }

    #[test]
    fn a_level_the_cpu_lacks_is_refused_naming_what_it_has() {
        let missing = [Isa::Avx2, Isa::Avx512, Isa::Neon]
            .into_iter()
            .find(|l| !l.available())
            .expect("no CPU runs both x86 and ARM kernels");
        let err = set_isa(Some(missing)).unwrap_err().to_string();
        assert!(
            err.contains(missing.name()) && err.contains("best"),
            "{err}"
        );
        assert_eq!(
            active_isa(),
            Isa::detected(),
            "a refused level changes nothing"
        );
    }
}
