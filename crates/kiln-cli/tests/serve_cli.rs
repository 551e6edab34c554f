//! `kiln serve` refuses bad flags before it loads anything, naming what to do.

use std::process::Command;

fn serve(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_serve_flags_are_named_errors() {
    let model = kiln_testutil::smollm2_gguf();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let empty_key = dir.path().join("key.txt");
    std::fs::write(&empty_key, "\n").unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["--adapter", "no-equals-sign"], "expected NAME=DIR"),
        (&["--adapter", "../x=/tmp/a"], "an adapter name is"),
        (
            &["--adapter", "a=/tmp/a", "--adapter", "a=/tmp/b"],
            "already taken",
        ),
        (&["--embeddings", "avg"], "mean or last"),
        (&["--host", "0.0.0.0"], "--api-key"),
        (
            &["--api-key-file", empty_key.to_str().unwrap()],
            "the first line is empty",
        ),
        (&["--max-batch", "0"], "--max-batch must be at least 1"),
    ];
    for (args, want) in cases {
        let mut all = vec!["--model", model, "--port", "0"];
        all.extend_from_slice(args);
        let (ok, err) = serve(&all);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}
