//! `kiln bench quant-accuracy`: how far a quantised model's matmuls move its predictions from
//! the same weights dequantised to f32, over held-out text. For each position: whether the
//! top-1 token agrees, and KL(p_f32 || p_quantised) in nats. Measured for kiln's kernels with
//! f32 activations, for the same kernels with 8-bit activations (`--activations q8`) and for
//! candle's (also 8-bit activations, llama.cpp's approach), so the choice of arithmetic is a
//! measured one.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use clap::Args;
use kiln_load::Weights;
use kiln_model::Llama;

use crate::commands::device;

#[derive(Args)]
pub struct BenchQuantAccuracyArgs {
    /// A quantised GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Held-out text, tokenised with the model's tokenizer; the tokens are taken from its
    /// middle.
    #[arg(long, default_value = "data/shakespeare/winters_tale_gut.txt")]
    pub text: PathBuf,
    /// Positions compared.
    #[arg(long, default_value_t = 1000)]
    pub tokens: usize,
    /// The text is cut into independent windows of this many tokens.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Agreement of one model's next-token distributions with the reference's.
#[derive(Default)]
struct Agreement {
    positions: usize,
    top1_same: usize,
    kl_sum: f64,
    kl_max: f64,
}

impl Agreement {
    /// Adds the positions of one window: `reference` and `other` are `(t, v)` logits.
    fn add(&mut self, reference: &Tensor, other: &Tensor) -> Result<()> {
        let lp = log_softmax_f64(reference)?;
        let lq = log_softmax_f64(other)?;
        // KL(p || q) = sum_v p (log p - log q), per position.
        let kl: Vec<f64> = (lp.exp()? * (&lp - &lq)?)?.sum(D::Minus1)?.to_vec1()?;
        let a: Vec<u32> = reference.argmax(D::Minus1)?.to_vec1()?;
        let b: Vec<u32> = other.argmax(D::Minus1)?.to_vec1()?;
        self.positions += kl.len();
        self.top1_same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        for k in kl {
            self.kl_sum += k;
            self.kl_max = self.kl_max.max(k);
        }
        Ok(())
    }

    fn top1(&self) -> f64 {
        self.top1_same as f64 / self.positions.max(1) as f64
    }

    fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions.max(1) as f64
    }
}

/// `log_softmax` over the last dimension, in f64 so that tiny KLs are not rounding noise.
fn log_softmax_f64(logits: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F64)?;
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

fn load(a: &BenchQuantAccuracyArgs, weights: Weights, candle: bool) -> Result<(Llama, String)> {
    kiln_model::set_candle_qmatmul(candle);
    let loaded = kiln_load::load_llama(&a.model, weights, &device());
    kiln_model::set_candle_qmatmul(false);
    let (model, _, desc) = loaded?;
    Ok((model, desc))
}

pub fn run(a: BenchQuantAccuracyArgs) -> Result<()> {
    if a.window < 2 || a.tokens == 0 {
        bail!("--window must be at least 2 and --tokens at least 1");
    }
    if kiln_load::ModelFormat::detect(&a.model)? != kiln_load::ModelFormat::Gguf {
        bail!(
            "--model {} is not a GGUF file: quant-accuracy compares a GGUF's quantised weights \
             with the same weights dequantised",
            a.model.display()
        );
    }
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading --text {}", a.text.display()))?;
    let tok = kiln_load::load_tokenizer(&a.model)?;
    let ids = tok
        .tokenizer
        .encode(&text)
        .with_context(|| format!("tokenising {}", a.text.display()))?;
    // Each window of w tokens predicts w - 1 positions.
    let windows = a.tokens.div_ceil(a.window - 1);
    let need = windows * a.window;
    if ids.len() < need {
        bail!(
            "{} has {} tokens; {} windows of {} need {need}",
            a.text.display(),
            ids.len(),
            windows,
            a.window
        );
    }
    let start = (ids.len() - need) / 2;
    let (reference, ref_desc) = load(&a, Weights::Dense, false)?;
    let (kiln_q, desc) = load(&a, Weights::Native, false)?;
    let (candle_q, _) = load(&a, Weights::Native, true)?;
    let mut kiln = Agreement::default();
    let mut kiln_q8 = Agreement::default();
    let mut candle = Agreement::default();
    let mut left = a.tokens;
    for w in 0..windows {
        let chunk = &ids[start + w * a.window..start + (w + 1) * a.window];
        let x = Tensor::new(chunk, &device())?.unsqueeze(0)?;
        // Positions 0..w-1 predict the next token; keep only as many as are still wanted.
        let keep = left.min(a.window - 1);
        left -= keep;
        let logits =
            |m: &Llama| -> Result<Tensor> { Ok(m.logits(&x)?.squeeze(0)?.narrow(0, 0, keep)?) };
        let r = logits(&reference)?;
        kiln.add(&r, &logits(&kiln_q)?)?;
        // The same kernels with the activations rounded to 8 bits (`--activations q8`).
        let was = kiln_kernels::q8_activations();
        kiln_kernels::set_q8_activations(true);
        let q8 = logits(&kiln_q);
        kiln_kernels::set_q8_activations(was);
        kiln_q8.add(&r, &q8?)?;
        candle.add(&r, &logits(&candle_q)?)?;
    }
    if a.json {
        let one = |g: &Agreement| serde_json::json!({"top1_agreement": g.top1(), "mean_kl": g.mean_kl(), "max_kl": g.kl_max});
        println!(
            "{}",
            serde_json::json!({
                "model": a.model.display().to_string(), "weights": desc, "text": a.text.display().to_string(),
                "positions": kiln.positions, "kiln": one(&kiln), "kiln_q8_activations": one(&kiln_q8),
                "candle_q8_activations": one(&candle),
            })
        );
    } else {
        println!(
            "{} ({desc}) against {ref_desc}, {} positions of {}:",
            a.model.display(),
            kiln.positions,
            a.text.display()
        );
        println!("| matmuls | top-1 agreement | mean KL (nats) | max KL (nats) |");
        println!("|---|---:|---:|---:|");
        for (name, g) in [
            ("kiln (f32 activations)", &kiln),
            ("kiln --activations q8", &kiln_q8),
            ("candle (8-bit activations)", &candle),
        ] {
            println!(
                "| {name} | {:.2}% | {:.2e} | {:.2e} |",
                100.0 * g.top1(),
                g.mean_kl(),
                g.kl_max
            );
        }
    }
    Ok(())
}
