//! Mutation fuzzing of every reader of untrusted model files: the GGUF header (`kiln_gguf`), a
//! GGUF opened as a model (`GgufFile`: config and tensor table) and as a tokenizer, HF
//! `config.json`, safetensors weights, the sharded-weights index, and `tokenizer.json`.
//!
//! ```sh
//! cargo run --release -p kiln-load --example fuzz_formats -- [CASES] [SEED]
//! ```
//!
//! Each case takes a valid seed file (from `tests/fixtures`), applies one to four mutations
//! (bit flips, interesting integers written over 1/2/4/8 bytes, cuts, deleted or repeated
//! runs), and runs the reader on it inside `catch_unwind`. A case fails when the reader panics,
//! takes longer than a second, or makes a single allocation larger than 64 MiB + 64 times the
//! input (a length field trusted before checking it against the file). Failing inputs are saved
//! under `/tmp/kiln-fuzz-*`. Not part of the test suite: a bench-style run (docs/pretrained.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use kiln_model::SplitMix64;

/// The largest single allocation since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Watch;

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static ALLOC: Watch = Watch;

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 7,
];

fn mutate(seed: &[u8], rng: &mut SplitMix64, hot: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    let n_mut = 1 + (rng.next_u64() % 4) as usize;
    for _ in 0..n_mut {
        if b.is_empty() {
            break;
        }
        // Most mutations land in the first `hot` bytes (the header), where the parsing is.
        let span = if rng.next_u64().is_multiple_of(4) {
            b.len()
        } else {
            hot.min(b.len())
        };
        let at = (rng.next_u64() as usize) % span.max(1);
        match rng.next_u64() % 7 {
            0 => b[at] ^= 1 << (rng.next_u64() % 8),
            1 => b[at] = INTERESTING[(rng.next_u64() % 12) as usize] as u8,
            2 | 3 => {
                let v = INTERESTING[(rng.next_u64() % 12) as usize].to_le_bytes();
                let w = [1, 2, 4, 8][(rng.next_u64() % 4) as usize];
                for (i, x) in v.iter().take(w).enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = *x;
                    }
                }
            }
            4 => b.truncate(at),
            5 => {
                let len = ((rng.next_u64() % 64) as usize).min(b.len() - at);
                b.drain(at..at + len);
            }
            _ => {
                let len = ((rng.next_u64() % 64) as usize).min(b.len() - at);
                let run = b[at..at + len].to_vec();
                b.splice(at..at, run);
            }
        }
    }
    b
}

/// One reader under test: a name, the seed bytes, how many leading bytes are "hot", and what
/// to run on a mutated input (the file is also written to `scratch` for path-based readers).
struct Target {
    name: &'static str,
    seed: Vec<u8>,
    hot: usize,
    run: fn(&[u8], &Path),
}

fn gguf_header(b: &[u8], _: &Path) {
    if let Ok(h) = kiln_gguf::read_header(b) {
        // The tokenizer built from whatever metadata survived.
        if let Ok(v) = kiln_data::gguf_tokenizer::GgufVocab::from_metadata(&h.metadata) {
            let _ = v.to_tokenizer();
        }
    }
}

fn gguf_model(b: &[u8], scratch: &Path) {
    let f = scratch.join("m.gguf");
    std::fs::write(&f, b).unwrap();
    if let Ok(g) = kiln_model::gguf::GgufFile::open(&f) {
        if let Ok(cfg) = g.config() {
            let _ = g.check_tensors(&cfg);
        }
    }
    let _ = kiln_load::load_tokenizer(&f);
}

fn hf_config(b: &[u8], scratch: &Path) {
    let d = scratch.join("cfg");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), b).unwrap();
    if let Ok(c) = kiln_model::hf::HfConfig::load(&d) {
        let _ = c.to_model_config(&d);
    }
}

fn safetensors(b: &[u8], scratch: &Path) {
    let d = scratch.join("st");
    std::fs::create_dir_all(&d).unwrap();
    let fixture = kiln_testutil::repo_root().join("tests/fixtures/arch_tiny/qwen2");
    std::fs::copy(fixture.join("config.json"), d.join("config.json")).unwrap();
    std::fs::write(d.join("model.safetensors"), b).unwrap();
    let _ = kiln_model::hf::load_hf_dir(&d, &Device::Cpu);
}

fn weights_index(b: &[u8], scratch: &Path) {
    let d = scratch.join("idx");
    if !d.exists() {
        std::fs::create_dir_all(&d).unwrap();
        let src = kiln_testutil::repo_root().join("tests/fixtures/hf_tiny/model");
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    std::fs::write(d.join("model.safetensors.index.json"), b).unwrap();
    let _ = kiln_model::hf::load_hf_dir(&d, &Device::Cpu);
}

fn tokenizer_json(b: &[u8], scratch: &Path) {
    let f = scratch.join("tokenizer.json");
    std::fs::write(&f, b).unwrap();
    let _ = kiln_load::load_tokenizer(&f);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cases: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let root = kiln_testutil::repo_root();
    let read = |p: &str| std::fs::read(root.join(p)).unwrap();
    let gguf = read("tests/fixtures/fuzz/seed.gguf");
    let gguf_head = kiln_gguf::read_header(&gguf).unwrap().data_start;
    let st = read("tests/fixtures/arch_tiny/qwen2/model.safetensors");
    let st_head = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    // Header-only readers are fast: they get most cases; file-based ones one in 16 each.
    let targets = [
        Target {
            name: "gguf header + tokenizer",
            seed: gguf.clone(),
            hot: gguf_head,
            run: gguf_header,
        },
        Target {
            name: "gguf model file",
            seed: gguf,
            hot: gguf_head,
            run: gguf_model,
        },
        Target {
            name: "config.json",
            seed: read("tests/fixtures/arch_tiny/gemma3/config.json"),
            hot: usize::MAX,
            run: hf_config,
        },
        Target {
            name: "safetensors",
            seed: st,
            hot: st_head,
            run: safetensors,
        },
        Target {
            name: "weights index",
            seed: read("tests/fixtures/hf_tiny/model/model.safetensors.index.json"),
            hot: usize::MAX,
            run: weights_index,
        },
        Target {
            name: "tokenizer.json",
            seed: read("tests/fixtures/hf_tiny/model/tokenizer.json"),
            hot: usize::MAX,
            run: tokenizer_json,
        },
    ];
    let scratch = PathBuf::from(format!("/dev/shm/kiln-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = SplitMix64::new(seed);
    let mut counts = [0u64; 6];
    let mut slowest = [(Duration::ZERO, 0usize); 6];
    let mut failures = 0;
    let started = Instant::now();
    for case in 0..cases {
        let t = match case % 16 {
            0 => 1,
            1 => 3,
            2 => 4,
            3 => 5,
            4 | 5 => 2,
            _ => 0,
        };
        let target = &targets[t];
        let input = mutate(&target.seed, &mut rng, target.hot);
        // The case being run, for when the process itself dies (an abort, the OOM killer).
        std::fs::write(scratch.join("current.bin"), &input).unwrap();
        std::fs::write(
            scratch.join("current.txt"),
            format!("{case} {}", target.name),
        )
        .unwrap();
        LARGEST.store(0, Ordering::Relaxed);
        let t0 = Instant::now();
        let outcome = std::panic::catch_unwind(|| (target.run)(&input, &scratch));
        let took = t0.elapsed();
        let largest = LARGEST.load(Ordering::Relaxed);
        counts[t] += 1;
        if took > slowest[t].0 {
            slowest[t] = (took, input.len());
        }
        let limit = (64 << 20) + 64 * input.len();
        let why = if outcome.is_err() {
            Some("panicked".to_string())
        } else if took > Duration::from_secs(1) {
            Some(format!("took {took:?}"))
        } else if largest > limit {
            Some(format!(
                "allocated {largest} bytes at once for a {}-byte input",
                input.len()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            failures += 1;
            let path = format!(
                "/tmp/kiln-fuzz-{}-{case}.bin",
                target.name.replace(' ', "_")
            );
            std::fs::write(&path, &input).unwrap();
            eprintln!("FAIL {}: {why} (input saved to {path})", target.name);
        }
        if (case + 1) % 100_000 == 0 {
            eprintln!(
                "{} cases, {failures} failures, {:.0} s",
                case + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("| reader | cases | slowest case |");
    println!("|---|---:|---:|");
    for (t, target) in targets.iter().enumerate() {
        println!(
            "| {} | {} | {:.1} ms ({} bytes) |",
            target.name,
            counts[t],
            slowest[t].0.as_secs_f64() * 1e3,
            slowest[t].1
        );
    }
    println!(
        "{cases} cases, {failures} failures, {:.0} s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
    if failures > 0 {
        std::process::exit(1);
    }
}
