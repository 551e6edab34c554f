//! Builds the fixed reward model of the export test (the tiny HF base, its seeded head
//! trained 3 steps on the toy preferences) and exports it as an HF directory, for
//! tests/fixtures/check_reward_export.py to score with transformers:
//!
//!     cargo run -p kiln-rlhf --example tiny_reward_export -- /tmp/rm-export
//!     .cache/venv-ref/bin/python crates/kiln-rlhf/tests/fixtures/check_reward_export.py \
//!         /tmp/rm-export/hf > crates/kiln-rlhf/tests/fixtures/reward_export.json

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use kiln_rlhf::{Method, PairSource, PairTrainer, Quiet};

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: tiny_reward_export DIR"),
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::create_dir_all(&out).unwrap();
    // The same records as the test's `preferences(dir, 40)`.
    let lines: Vec<String> = (0..40)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Question {i}?"),
                "chosen": format!("yes the answer {}", i % 7),
                "rejected": format!("no the answer {}", i % 7),
            })
            .to_string()
        })
        .collect();
    let data = out.join("prefs.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let sets: Vec<String> = ["train.steps=3", "train.batch_size=4", "optim.lr=1e-3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut t = PairTrainer::new(
        Method::Rm,
        PairSource {
            model: root.join("tests/fixtures/hf_tiny/model"),
            data: vec![data],
            reference: None,
        },
        None,
        &sets,
        &out.join("rm"),
        false,
        &mut Quiet,
    )
    .unwrap();
    t.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    kiln_rlhf::export_reward_hf(&out.join("rm"), &out.join("hf"), candle_core::DType::F32).unwrap();
    eprintln!("exported {}", out.join("hf").display());
}
