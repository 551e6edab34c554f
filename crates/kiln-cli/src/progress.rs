//! Console reporting for training: one indicatif bar with ETA and tokens/s (hidden when stderr
//! is not a terminal), and structured log lines printed above it.

use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_train::metrics::MetricsRow;
use kiln_train::{Observer, RunInfo};
use tracing::info;

pub struct Console {
    bar: ProgressBar,
}

/// A training-steps bar with ETA, drawn on stderr only when it is a terminal.
pub fn steps_bar() -> ProgressBar {
    let bar = ProgressBar::hidden();
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("invariant: valid template"),
    );
    bar
}

impl Console {
    pub fn new() -> Self {
        Self { bar: steps_bar() }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Observer for Console {
    fn on_start(&mut self, i: &RunInfo) {
        self.bar.set_length(i.total_steps);
        self.bar.set_position(i.start_step);
        self.bar.reset_eta();
        self.bar.suspend(|| {
            info!(
                run_dir = %i.run_dir.display(),
                params = i.total_params,
                non_embedding_params = i.non_embedding_params,
                flops_per_token = format!("{:.3e}", i.flops_per_token),
                peak_gflops = format!("{:.1}", i.peak_flops / 1e9),
                tokens_per_step = i.tokens_per_step,
                train_tokens = i.n_train_tokens,
                val_tokens = i.n_val_tokens,
                "run"
            )
        });
    }

    fn on_step(&mut self, r: &MetricsRow, logged: bool) {
        self.bar.set_position(r.step);
        let (loss, tps, mfu) = (
            r.loss.unwrap_or(f64::NAN),
            r.tokens_per_s.unwrap_or(0.0),
            r.mfu.unwrap_or(0.0),
        );
        self.bar.set_message(format!(
            "loss {loss:.4} | {tps:.0} tok/s | MFU {:.1}%",
            mfu * 100.0
        ));
        if logged {
            self.bar.suspend(|| {
                info!(
                    step = r.step,
                    tokens = r.tokens,
                    loss = format!("{loss:.4}"),
                    lr = format!("{:.3e}", r.lr.unwrap_or(0.0)),
                    grad_norm = format!("{:.3}", r.grad_norm.unwrap_or(0.0)),
                    tok_per_s = format!("{tps:.0}"),
                    mfu = format!("{:.1}%", mfu * 100.0),
                    "train"
                )
            });
        }
    }

    fn on_eval(&mut self, r: &MetricsRow) {
        let v = r.val_loss.unwrap_or(f64::NAN);
        self.bar.suspend(|| match r.val_accuracy {
            // MLM: perplexity over masked tokens means little; report accuracy instead.
            Some(acc) => info!(
                step = r.step,
                val_loss = format!("{v:.4}"),
                val_accuracy = format!("{acc:.4}"),
                "eval"
            ),
            None => info!(
                step = r.step,
                val_loss = format!("{v:.4}"),
                val_ppl = format!("{:.2}", v.exp()),
                "eval"
            ),
        });
    }

    fn on_checkpoint(&mut self, dir: &Path) {
        self.bar
            .suspend(|| info!(dir = %dir.display(), "checkpoint saved"));
    }

    fn on_message(&mut self, msg: &str) {
        self.bar.suspend(|| info!("{msg}"));
    }
}
