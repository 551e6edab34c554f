//! Structured output: `response_format` `json_object` and `json_schema`, enforced token by
//! token.
//!
//! A JSON Schema is compiled into a small grammar ([`Node`]s), and a byte-level pushdown
//! automaton ([`Machine`]) walks the output. Before each token is sampled, every vocabulary
//! token is tried on a copy of the automaton and the ones that cannot continue a valid value
//! are masked out (tokens are grouped by first byte, so most are ruled out by one check). The
//! sequence ends when the value is complete, so the reply always parses and validates.
//!
//! What is enforced: objects (every listed property, in the schema's order), arrays (`items`,
//! `minItems`, `maxItems`), `enum` and `const` (any JSON values), strings, numbers, integers,
//! booleans, null, unions by `type` lists or `anyOf` whose members start differently, and
//! local `$ref`s into `$defs`/`definitions`. A schema using anything else (`pattern`,
//! `format`, bounds on strings and numbers, `oneOf`, `allOf`, ...) is refused with 400
//! instead of being half-enforced. The root must be an object, as OpenAI requires.

use std::sync::Arc;

use kiln_data::KilnTokenizer;
use kiln_infer::TokenConstraint;
use serde_json::{Map, Value};

use crate::engine::ConstraintFactory;
use crate::openai::ApiError;
use crate::Ready;

/// Longest run of whitespace between tokens of the value (a model stuck on newlines stops).
const MAX_WHITESPACE: u8 = 8;
/// Deepest nesting of a free-form (`json_object`) value.
const MAX_DEPTH: usize = 32;
/// Longest number, in bytes.
const MAX_NUMBER: u16 = 24;
/// Deepest `$ref` chain followed while compiling.
const MAX_REF_DEPTH: usize = 16;

/// Node 0 of every grammar: any value (free-form objects and arrays hold these).
const ANY: u32 = 0;
/// Literal set 0 of every grammar: `true`, `false`, `null`.
const ANY_LITERALS: u32 = 0;

/// A compiled schema node; children are indices into [`Grammar::nodes`].
#[derive(Debug, Clone)]
enum Node {
    /// Any JSON value.
    Any,
    /// Any object.
    AnyObject,
    /// An object with exactly these properties, in this order.
    Object {
        props: Vec<(u32, u32)>,
    },
    Array {
        items: u32,
        min: u32,
        max: Option<u32>,
    },
    String,
    Number {
        integer: bool,
    },
    /// One of these JSON texts (enum, const, true/false, null, property keys).
    Literals(u32),
    /// One of these nodes, told apart by their first byte.
    Union(Vec<u32>),
    /// These nodes one after the other (a tool call's tags around its JSON).
    Seq(Vec<u32>),
}

/// The compiled schema: nodes and literal sets (each literal as its JSON text's bytes).
#[derive(Debug, Default)]
pub(crate) struct Grammar {
    nodes: Vec<Node>,
    literals: Vec<Vec<Vec<u8>>>,
    root: u32,
}

fn refuse(what: String) -> ApiError {
    ApiError::invalid(
        "response_format",
        format!("`response_format`: this schema cannot be enforced: {what}"),
    )
}

/// Keywords that only describe a schema.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "strict",
    "deprecated",
    "readOnly",
    "writeOnly",
];

struct Compiler<'a> {
    g: Grammar,
    root_schema: &'a Value,
}

impl<'a> Compiler<'a> {
    /// A grammar holding what every grammar starts with: node [`ANY`] and literal set
    /// [`ANY_LITERALS`].
    fn new(root_schema: &'a Value) -> Self {
        let mut c = Self {
            g: Grammar::default(),
            root_schema,
        };
        c.push(Node::Any);
        c.g.literals
            .push(vec![b"true".to_vec(), b"false".to_vec(), b"null".to_vec()]);
        c
    }

    fn push(&mut self, n: Node) -> u32 {
        self.g.nodes.push(n);
        (self.g.nodes.len() - 1) as u32
    }

    fn literals(&mut self, texts: Vec<Vec<u8>>) -> u32 {
        self.g.literals.push(texts);
        self.push(Node::Literals((self.g.literals.len() - 1) as u32))
    }

    fn resolve(&self, reference: &str) -> Result<&'a Value, ApiError> {
        let path = reference
            .strip_prefix("#/")
            .ok_or_else(|| refuse(format!("`$ref` {reference:?} is not a local reference")))?;
        let mut v = self.root_schema;
        for part in path.split('/') {
            v = v
                .get(part)
                .ok_or_else(|| refuse(format!("`$ref` {reference:?} points nowhere")))?;
        }
        Ok(v)
    }

    fn compile(&mut self, s: &Value, depth: usize) -> Result<u32, ApiError> {
        if depth > MAX_REF_DEPTH {
            return Err(refuse(
                "`$ref`s nest too deep (recursive schemas are not supported)".into(),
            ));
        }
        let obj = match s {
            Value::Bool(true) => return Ok(self.push(Node::Any)),
            Value::Object(o) => o,
            other => return Err(refuse(format!("a schema must be an object, got {other}"))),
        };
        if let Some(r) = obj.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| refuse("`$ref` must be a string".into()))?;
            let target = self.resolve(r)?;
            return self.compile(target, depth + 1);
        }
        if let Some(c) = obj.get("const") {
            return Ok(self.literals(vec![serde_json::to_vec(c).expect("a JSON value")]));
        }
        if let Some(e) = obj.get("enum") {
            let values = e
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| refuse("`enum` must be a non-empty array".into()))?;
            if values.len() > 64 {
                return Err(refuse(format!(
                    "an enum of {} values (at most 64)",
                    values.len()
                )));
            }
            let texts = values
                .iter()
                .map(|v| serde_json::to_vec(v).expect("a JSON value"))
                .collect();
            return Ok(self.literals(texts));
        }
        if let Some(any_of) = obj.get("anyOf") {
            let members = any_of
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| refuse("`anyOf` must be a non-empty array".into()))?;
            let ids = members
                .iter()
                .map(|m| self.compile(m, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            return self.union(ids);
        }
        for key in obj.keys() {
            let known = ANNOTATIONS.contains(&key.as_str())
                || matches!(
                    key.as_str(),
                    "type"
                        | "properties"
                        | "required"
                        | "additionalProperties"
                        | "items"
                        | "minItems"
                        | "maxItems"
                );
            if !known {
                return Err(refuse(format!("the keyword `{key}`")));
            }
        }
        match obj.get("type") {
            None => {
                if obj.contains_key("properties") {
                    self.typed("object", obj, depth)
                } else {
                    Ok(self.push(Node::Any))
                }
            }
            Some(Value::String(t)) => self.typed(t, obj, depth),
            Some(Value::Array(types)) => {
                let ids = types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some(t) => self.typed(t, obj, depth),
                        None => Err(refuse("`type` lists must hold strings".into())),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.union(ids)
            }
            Some(other) => Err(refuse(format!("`type` {other}"))),
        }
    }

    fn typed(&mut self, t: &str, obj: &Map<String, Value>, depth: usize) -> Result<u32, ApiError> {
        match t {
            "object" => self.object(obj, depth),
            "array" => {
                let items = match obj.get("items") {
                    Some(i) => self.compile(i, depth + 1)?,
                    None => self.push(Node::Any),
                };
                let bound = |k: &str| -> Result<Option<u32>, ApiError> {
                    match obj.get(k) {
                        None => Ok(None),
                        Some(v) => v
                            .as_u64()
                            .filter(|&n| n <= 10_000)
                            .map(|n| Some(n as u32))
                            .ok_or_else(|| refuse(format!("`{k}` {v}"))),
                    }
                };
                let (min, max) = (bound("minItems")?.unwrap_or(0), bound("maxItems")?);
                if max.is_some_and(|m| m < min) {
                    return Err(refuse("maxItems below minItems".into()));
                }
                Ok(self.push(Node::Array { items, min, max }))
            }
            "string" => Ok(self.push(Node::String)),
            "number" => Ok(self.push(Node::Number { integer: false })),
            "integer" => Ok(self.push(Node::Number { integer: true })),
            "boolean" => Ok(self.literals(vec![b"true".to_vec(), b"false".to_vec()])),
            "null" => Ok(self.literals(vec![b"null".to_vec()])),
            other => Err(refuse(format!("the type {other:?}"))),
        }
    }

    fn object(&mut self, obj: &Map<String, Value>, depth: usize) -> Result<u32, ApiError> {
        let Some(props) = obj.get("properties") else {
            return Ok(self.push(Node::AnyObject));
        };
        let props = props
            .as_object()
            .ok_or_else(|| refuse("`properties` must be an object".into()))?;
        if let Some(req) = obj.get("required") {
            for r in req.as_array().into_iter().flatten() {
                let name = r.as_str().unwrap_or_default();
                if !props.contains_key(name) {
                    return Err(refuse(format!(
                        "the required property {name:?} is not in `properties`"
                    )));
                }
            }
        }
        let mut out = Vec::new();
        for (name, schema) in props {
            let key = self.literals(vec![serde_json::to_vec(name).expect("a string")]);
            let value = self.compile(schema, depth + 1)?;
            out.push((key, value));
        }
        Ok(self.push(Node::Object { props: out }))
    }

    /// A union whose members must start with different bytes, so the first byte decides.
    fn union(&mut self, ids: Vec<u32>) -> Result<u32, ApiError> {
        if ids.len() == 1 {
            return Ok(ids[0]);
        }
        let mut seen = [false; 256];
        for &id in &ids {
            for b in 0..=255u8 {
                if self.g.starts_with(id, b) {
                    if seen[b as usize] {
                        return Err(refuse(format!(
                            "a union whose members can both start with {:?} (anyOf members must differ in kind: object, array, string, number, boolean, null)",
                            b as char
                        )));
                    }
                    seen[b as usize] = true;
                }
            }
        }
        Ok(self.push(Node::Union(ids)))
    }
}

impl Grammar {
    /// Whether a value of node `id` can start with byte `b`.
    fn starts_with(&self, id: u32, b: u8) -> bool {
        match &self.nodes[id as usize] {
            Node::Any => matches!(
                b,
                b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'
            ),
            Node::AnyObject | Node::Object { .. } => b == b'{',
            Node::Array { .. } => b == b'[',
            Node::String => b == b'"',
            Node::Number { .. } => b == b'-' || b.is_ascii_digit(),
            Node::Literals(set) => self.literals[*set as usize].iter().any(|t| t[0] == b),
            Node::Union(ids) => ids.iter().any(|&i| self.starts_with(i, b)),
            Node::Seq(ids) => ids.first().is_some_and(|&i| self.starts_with(i, b)),
        }
    }
}

/// Where the automaton is inside one value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    /// A value of this node comes next (whitespace may come first).
    Value(u32),
    /// Inside a schema object: `next` is the property whose key comes next (after `{` or
    /// `,`), `colon` whether its key is read and `:` is awaited, `after` whether its value
    /// is read and `,` or `}` comes next.
    Object {
        node: u32,
        next: u16,
        stage: ObjStage,
    },
    /// Inside a free-form object.
    AnyObject {
        stage: AnyStage,
    },
    Array {
        node: u32,
        count: u32,
        open: bool,
    },
    /// Inside a string, after the opening quote.
    String {
        escape: Escape,
    },
    Number {
        state: Num,
        len: u16,
        integer: bool,
    },
    /// Matching one of the literal texts of set `set`; `alive` marks the ones still
    /// matching after `pos` bytes.
    Literals {
        set: u32,
        pos: u16,
        alive: u64,
    },
    /// Inside a sequence: `next` is the member that starts next.
    Seq {
        node: u32,
        next: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ObjStage {
    Key,
    Colon,
    After,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AnyStage {
    /// After `{`: a key or `}`.
    Open,
    /// After `,`: a key.
    Key,
    Colon,
    After,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Escape {
    None,
    Backslash,
    /// Hex digits still due in `\uXXXX`.
    Hex(u8),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    fn can_end(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

/// The automaton: a stack of frames over a grammar.
#[derive(Clone)]
struct Machine {
    g: Arc<Grammar>,
    stack: Vec<Frame>,
    ws_run: u8,
}

/// What a frame did with a byte.
enum Step {
    Take,
    Reject,
    /// The frame is complete without this byte: pop it and give the byte to the parent.
    PopRetry,
}

impl Machine {
    fn new(g: Arc<Grammar>) -> Self {
        let root = g.root;
        Self {
            g,
            stack: vec![Frame::Value(root)],
            ws_run: 0,
        }
    }

    /// Whether the value is complete: nothing left but sequences whose members are all read.
    fn done(&self) -> bool {
        self.stack.iter().all(|f| match *f {
            Frame::Seq { node, next } => match &self.g.nodes[node as usize] {
                Node::Seq(ids) => next as usize == ids.len(),
                _ => false,
            },
            _ => false,
        })
    }

    fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }

    fn feed(&mut self, b: u8) -> bool {
        if is_ws(b) {
            self.ws_run = self.ws_run.saturating_add(1);
        }
        loop {
            let Some(&top) = self.stack.last() else {
                return false; // the value is complete: nothing may follow
            };
            match self.step(top, b) {
                Step::Take => break,
                Step::Reject => return false,
                Step::PopRetry => {
                    self.stack.pop();
                }
            }
        }
        if !is_ws(b) {
            self.ws_run = 0;
        } else if self.ws_run > MAX_WHITESPACE
            && !matches!(self.stack.last(), Some(Frame::String { .. }))
        {
            return false;
        }
        true
    }

    fn set_top(&mut self, f: Frame) {
        *self.stack.last_mut().expect("a frame") = f;
    }

    fn step(&mut self, top: Frame, b: u8) -> Step {
        let g = Arc::clone(&self.g);
        match top {
            Frame::Value(node) => {
                // Whitespace before a value, unless the value itself starts with it (a
                // literal such as a tool call's closing tag).
                if is_ws(b) && !g.starts_with(node, b) {
                    return Step::Take;
                }
                self.start_value(node, b)
            }
            Frame::Seq { node, next } => {
                let Node::Seq(ids) = &g.nodes[node as usize] else {
                    unreachable!("a Seq frame is over a sequence node")
                };
                match ids.get(next as usize) {
                    Some(&member) => {
                        self.set_top(Frame::Seq {
                            node,
                            next: next + 1,
                        });
                        self.push_value(member, b)
                    }
                    None => Step::PopRetry,
                }
            }
            Frame::Object { node, next, stage } => {
                if is_ws(b) {
                    return Step::Take;
                }
                let Node::Object { props } = &g.nodes[node as usize] else {
                    unreachable!("an Object frame is over an object node")
                };
                let n = props.len() as u16;
                match stage {
                    ObjStage::Key => {
                        if n == 0 {
                            return if b == b'}' {
                                self.pop_take()
                            } else {
                                Step::Reject
                            };
                        }
                        let key = props[next as usize].0;
                        self.set_top(Frame::Object {
                            node,
                            next,
                            stage: ObjStage::Colon,
                        });
                        self.push_value(key, b)
                    }
                    ObjStage::Colon => {
                        if b != b':' {
                            return Step::Reject;
                        }
                        let value = props[next as usize].1;
                        self.set_top(Frame::Object {
                            node,
                            next,
                            stage: ObjStage::After,
                        });
                        self.stack.push(Frame::Value(value));
                        Step::Take
                    }
                    ObjStage::After => match b {
                        b',' if next + 1 < n => {
                            self.set_top(Frame::Object {
                                node,
                                next: next + 1,
                                stage: ObjStage::Key,
                            });
                            Step::Take
                        }
                        b'}' if next + 1 == n => self.pop_take(),
                        _ => Step::Reject,
                    },
                }
            }
            Frame::AnyObject { stage } => {
                if is_ws(b) {
                    return Step::Take;
                }
                match (stage, b) {
                    (AnyStage::Open, b'}') | (AnyStage::After, b'}') => self.pop_take(),
                    (AnyStage::Open | AnyStage::Key, b'"') => {
                        self.set_top(Frame::AnyObject {
                            stage: AnyStage::Colon,
                        });
                        self.stack.push(Frame::String {
                            escape: Escape::None,
                        });
                        Step::Take
                    }
                    (AnyStage::Colon, b':') => {
                        if self.stack.len() >= MAX_DEPTH {
                            return Step::Reject;
                        }
                        self.set_top(Frame::AnyObject {
                            stage: AnyStage::After,
                        });
                        self.stack.push(Frame::Value(ANY));
                        Step::Take
                    }
                    (AnyStage::After, b',') => {
                        self.set_top(Frame::AnyObject {
                            stage: AnyStage::Key,
                        });
                        Step::Take
                    }
                    _ => Step::Reject,
                }
            }
            Frame::Array { node, count, open } => {
                if is_ws(b) {
                    return Step::Take;
                }
                let (items, min, max) = match &g.nodes[node as usize] {
                    Node::Array { items, min, max } => (*items, *min, *max),
                    // A free-form array inside a free-form value.
                    _ => (ANY, 0, None),
                };
                if b == b']' && count >= min {
                    return self.pop_take();
                }
                if open {
                    // The first element starts right away.
                    if max == Some(0) || self.stack.len() >= MAX_DEPTH {
                        return Step::Reject;
                    }
                    self.set_top(Frame::Array {
                        node,
                        count: 1,
                        open: false,
                    });
                    return self.push_value(items, b);
                }
                if b == b',' && max.is_none_or(|m| count < m) {
                    self.set_top(Frame::Array {
                        node,
                        count: count + 1,
                        open: false,
                    });
                    self.stack.push(Frame::Value(items));
                    return Step::Take;
                }
                Step::Reject
            }
            Frame::String { escape } => match escape {
                Escape::None => match b {
                    b'"' => self.pop_take(),
                    b'\\' => {
                        self.set_top(Frame::String {
                            escape: Escape::Backslash,
                        });
                        Step::Take
                    }
                    0..=0x1f => Step::Reject,
                    _ => Step::Take,
                },
                Escape::Backslash => match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        self.set_top(Frame::String {
                            escape: Escape::None,
                        });
                        Step::Take
                    }
                    b'u' => {
                        self.set_top(Frame::String {
                            escape: Escape::Hex(4),
                        });
                        Step::Take
                    }
                    _ => Step::Reject,
                },
                Escape::Hex(left) => {
                    if !b.is_ascii_hexdigit() {
                        return Step::Reject;
                    }
                    let escape = if left == 1 {
                        Escape::None
                    } else {
                        Escape::Hex(left - 1)
                    };
                    self.set_top(Frame::String { escape });
                    Step::Take
                }
            },
            Frame::Number {
                state,
                len,
                integer,
            } => {
                let next = match (state, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') if !integer => Some(Num::Dot),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if !integer => Some(Num::Exp),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
                    (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Some(Num::ExpDigits),
                    _ => None,
                };
                match next {
                    Some(s) if len < MAX_NUMBER => {
                        self.set_top(Frame::Number {
                            state: s,
                            len: len + 1,
                            integer,
                        });
                        Step::Take
                    }
                    Some(_) => Step::Reject,
                    None if state.can_end() => Step::PopRetry,
                    None => Step::Reject,
                }
            }
            Frame::Literals { set, pos, alive } => {
                let texts = &g.literals[set as usize];
                let p = pos as usize;
                let mut still = 0u64;
                for (i, t) in texts.iter().enumerate() {
                    if alive & (1 << i) != 0 && t.get(p) == Some(&b) {
                        still |= 1 << i;
                    }
                }
                if still == 0 {
                    let complete = texts
                        .iter()
                        .enumerate()
                        .any(|(i, t)| alive & (1 << i) != 0 && t.len() == p);
                    return if complete {
                        Step::PopRetry
                    } else {
                        Step::Reject
                    };
                }
                let p = p + 1;
                // Pop as soon as no live text is longer: the literal needs nothing more.
                let longer = texts
                    .iter()
                    .enumerate()
                    .any(|(i, t)| still & (1 << i) != 0 && t.len() > p);
                if longer {
                    self.set_top(Frame::Literals {
                        set,
                        pos: p as u16,
                        alive: still,
                    });
                    Step::Take
                } else {
                    self.pop_take()
                }
            }
        }
    }

    fn pop_take(&mut self) -> Step {
        self.stack.pop();
        Step::Take
    }

    /// Replaces the `Value` frame on top with the frame of a value starting with `b`.
    fn push_value(&mut self, node: u32, b: u8) -> Step {
        self.stack.push(Frame::Value(node));
        self.start_value(node, b)
    }

    fn start_value(&mut self, node: u32, b: u8) -> Step {
        let g = Arc::clone(&self.g);
        let n = &g.nodes[node as usize];
        let frame = match (n, b) {
            (Node::Union(ids), _) => {
                let Some(&member) = ids.iter().find(|&&i| g.starts_with(i, b)) else {
                    return Step::Reject;
                };
                self.set_top(Frame::Value(member));
                return self.start_value(member, b);
            }
            (Node::Any | Node::AnyObject, b'{') => Frame::AnyObject {
                stage: AnyStage::Open,
            },
            (Node::Object { .. }, b'{') => Frame::Object {
                node,
                next: 0,
                stage: ObjStage::Key,
            },
            (Node::Array { .. }, b'[') => Frame::Array {
                node,
                count: 0,
                open: true,
            },
            (Node::Any, b'[') => Frame::Array {
                node: ANY,
                count: 0,
                open: true,
            },
            (Node::Any | Node::String, b'"') => Frame::String {
                escape: Escape::None,
            },
            (Node::Any | Node::Number { .. }, b'-' | b'0'..=b'9') => {
                let state = match b {
                    b'-' => Num::Minus,
                    b'0' => Num::Zero,
                    _ => Num::Int,
                };
                let integer = matches!(n, Node::Number { integer: true });
                Frame::Number {
                    state,
                    len: 1,
                    integer,
                }
            }
            (Node::Any, b't' | b'f' | b'n') => {
                self.set_top(Frame::Literals {
                    set: ANY_LITERALS,
                    pos: 0,
                    alive: u64::MAX,
                });
                return self.step(*self.stack.last().expect("a frame"), b);
            }
            (Node::Seq(_), _) => {
                self.set_top(Frame::Seq { node, next: 0 });
                return self.step(*self.stack.last().expect("a frame"), b);
            }
            (Node::Literals(set), _) => {
                self.set_top(Frame::Literals {
                    set: *set,
                    pos: 0,
                    alive: u64::MAX,
                });
                return self.step(*self.stack.last().expect("a frame"), b);
            }
            _ => return Step::Reject,
        };
        self.set_top(frame);
        Step::Take
    }
}

/// Compiles `schema` (the root must be an object).
fn compile_schema(schema: &Value) -> Result<Grammar, ApiError> {
    let mut c = Compiler::new(schema);
    let root = c.compile(schema, 0)?;
    if !c.g.starts_with(root, b'{') || (0..=255u8).any(|b| b != b'{' && c.g.starts_with(root, b)) {
        return Err(refuse(
            "the root must be an object (`\"type\": \"object\"`)".into(),
        ));
    }
    c.g.root = root;
    Ok(c.g)
}

/// The grammar of one tool call: `{"name": N, KEY: ARGS}` where N is one of `names` and ARGS
/// an instance of `schema` (any object without one), wrapped in `open`/`close` tags when the
/// template's format has them. `KEY` is `arguments` (Hermes/Qwen style) or `parameters`
/// (Llama 3's).
pub(crate) fn tool_call_grammar(
    names: &[String],
    schema: Option<&Value>,
    arguments_key: &str,
    tags: Option<(&str, &str)>,
) -> Result<Grammar, ApiError> {
    let empty = Value::Object(Map::new());
    let mut c = Compiler::new(schema.unwrap_or(&empty));
    let name_key = c.literals(vec![b"\"name\"".to_vec()]);
    let name = c.literals(
        names
            .iter()
            .map(|n| serde_json::to_vec(n).expect("a string"))
            .collect(),
    );
    let args_key = c.literals(vec![serde_json::to_vec(arguments_key).expect("a string")]);
    let args = match schema {
        Some(s) => {
            let id = c.compile(s, 0)?;
            if !c.g.starts_with(id, b'{') {
                return Err(refuse(
                    "a tool's parameters must be an object schema".into(),
                ));
            }
            id
        }
        None => c.push(Node::AnyObject),
    };
    let call = c.push(Node::Object {
        props: vec![(name_key, name), (args_key, args)],
    });
    c.g.root = match tags {
        None => call,
        Some((open, close)) => {
            let open = c.literals(vec![open.as_bytes().to_vec()]);
            let close = c.literals(vec![close.as_bytes().to_vec()]);
            c.push(Node::Seq(vec![open, call, close]))
        }
    };
    Ok(c.g)
}

/// A grammar for any JSON object (`json_object`).
fn any_object() -> Grammar {
    let empty = Value::Object(Map::new());
    let mut c = Compiler::new(&empty);
    c.g.root = c.push(Node::AnyObject);
    c.g
}

/// The bytes each vocabulary token adds to a text, grouped by first byte.
pub(crate) struct TokenBytes {
    bytes: Vec<Vec<u8>>,
    by_first: Vec<Vec<u32>>,
}

impl TokenBytes {
    /// Each token's text in context: `decode([anchor, id])` less `decode([anchor])`, so a
    /// SentencePiece token's leading space is kept. Special tokens count with their text
    /// (Qwen's `<tool_call>` is one); stop tokens, tokens that decode to nothing and tokens
    /// that decode to part of a UTF-8 character are left out: they never continue a value.
    pub(crate) fn new(tokenizer: &KilnTokenizer, stop_ids: &[u32]) -> Self {
        let n = tokenizer.vocab_size();
        let anchor = tokenizer
            .encode("a")
            .ok()
            .and_then(|ids| ids.last().copied())
            .unwrap_or(0);
        let base = tokenizer.decode(&[anchor]).unwrap_or_default();
        let mut bytes = vec![Vec::new(); n];
        let mut by_first = vec![Vec::new(); 256];
        for (id, slot) in bytes.iter_mut().enumerate() {
            // A stop token ends the reply, so it never continues a value.
            if stop_ids.contains(&(id as u32)) {
                continue;
            }
            let Ok(text) = tokenizer.decode(&[anchor, id as u32]) else {
                continue;
            };
            let Some(piece) = text.strip_prefix(base.as_str()) else {
                continue;
            };
            if piece.is_empty() || piece.contains('\u{FFFD}') {
                continue;
            }
            *slot = piece.as_bytes().to_vec();
            by_first[slot[0] as usize].push(id as u32);
        }
        Self { bytes, by_first }
    }
}

/// One choice's walk through the grammar.
pub(crate) struct JsonConstraint {
    machine: Machine,
    tokens: Arc<TokenBytes>,
    /// Tokens allowed next (recomputed after every accepted token).
    allowed: Vec<bool>,
}

impl JsonConstraint {
    fn new(g: Arc<Grammar>, tokens: Arc<TokenBytes>) -> Self {
        let mut c = Self {
            machine: Machine::new(g),
            allowed: vec![false; tokens.bytes.len()],
            tokens,
        };
        c.refresh();
        c
    }

    fn refresh(&mut self) {
        self.allowed.iter_mut().for_each(|a| *a = false);
        for first in 0..=255u8 {
            let mut m = self.machine.clone();
            if !m.feed(first) {
                continue;
            }
            for &id in &self.tokens.by_first[first as usize] {
                let mut t = m.clone();
                if t.feed_all(&self.tokens.bytes[id as usize][1..]) {
                    self.allowed[id as usize] = true;
                }
            }
        }
    }
}

impl TokenConstraint for JsonConstraint {
    fn allows(&self, id: u32) -> bool {
        self.allowed.get(id as usize).copied().unwrap_or(false)
    }

    fn accept(&mut self, id: u32) {
        let ok = self.machine.feed_all(&self.tokens.bytes[id as usize]);
        debug_assert!(ok, "an accepted token was allowed");
        self.refresh();
    }

    fn is_complete(&self) -> bool {
        self.machine.done()
    }
}

/// A constraint factory over `grammar` for this server's vocabulary.
pub(crate) fn factory(grammar: Grammar, ready: &Ready) -> ConstraintFactory {
    let grammar = Arc::new(grammar);
    let tokens = ready.token_bytes();
    Arc::new(move || {
        Box::new(JsonConstraint::new(grammar.clone(), tokens.clone())) as Box<dyn TokenConstraint>
    })
}

/// The constraint a `response_format` asks for (`None` for plain text).
pub(crate) fn response_format(
    format: Option<&Value>,
    ready: &Ready,
) -> Result<Option<ConstraintFactory>, ApiError> {
    let Some(f) = format else { return Ok(None) };
    let grammar = match f.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => any_object(),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema.schema",
                        "`response_format.json_schema.schema` is required",
                    )
                })?;
            compile_schema(schema)?
        }
        other => {
            return Err(ApiError::invalid(
                "response_format.type",
                format!(
                    "`response_format.type` must be text, json_object or json_schema, got {}",
                    other.map_or("nothing".to_string(), |t| format!("{t:?}"))
                ),
            ))
        }
    };
    Ok(Some(factory(grammar, ready)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accepts(g: &Arc<Grammar>, text: &str) -> (bool, bool) {
        let mut m = Machine::new(g.clone());
        let ok = m.feed_all(text.as_bytes());
        (ok, m.done())
    }

    fn schema(s: Value) -> Arc<Grammar> {
        Arc::new(compile_schema(&s).unwrap())
    }

    #[test]
    fn free_objects_accept_json_and_nothing_else() {
        let g = Arc::new(any_object());
        for good in [
            "{}",
            r#"{"a": 1}"#,
            r#"{"a": [1, -2.5e3, "x\n\u00e9", true, null, {"b": false}], "c": {}}"#,
            "{ \"k\" : [ ] }",
        ] {
            assert_eq!(accepts(&g, good), (true, true), "{good}");
        }
        for bad in [
            "[1]",
            r#"{"a" 1}"#,
            r#"{"a": tru}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1,}"#,
            "{}x",
            r#"{"a": "\q"}"#,
        ] {
            let (ok, done) = accepts(&g, bad);
            assert!(!(ok && done), "{bad}");
        }
        // A prefix is accepted but not complete.
        assert_eq!(accepts(&g, r#"{"a": [1, "#), (true, false));
    }

    #[test]
    fn schemas_fix_keys_order_and_types() {
        let g = schema(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "minItems": 1, "maxItems": 2},
                "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]},
                "ok": {"type": ["boolean", "null"]}
            },
            "required": ["name", "age", "tags", "pet", "ok"],
            "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}}}}
        }));
        let good =
            r#"{"name": "Ann", "age": -3, "tags": ["b", 3], "pet": {"kind": "cat"}, "ok": null}"#;
        assert_eq!(accepts(&g, good), (true, true));
        let good2 = r#"{"name":"","age":0,"tags":["a"],"pet":null,"ok":true}"#;
        assert_eq!(accepts(&g, good2), (true, true));
        for bad in [
            r#"{"age": 3"#,                                         // wrong key order
            r#"{"name": "Ann", "age": 3.5"#,                        // not an integer
            r#"{"name": "Ann", "age": 3, "tags": []"#,              // minItems
            r#"{"name": "Ann", "age": 3, "tags": ["a", "b", "a"]"#, // maxItems
            r#"{"name": "Ann", "age": 3, "tags": ["c"]"#,           // not in the enum
            r#"{"name": "Ann", "age": 3, "tags": ["a"], "pet": {"kind": "dog"}"#,
            r#"{"name": "Ann", "age": 3, "tags": ["a"], "pet": null, "ok": 1"#,
        ] {
            assert!(!accepts(&g, bad).0, "{bad}");
        }
    }

    #[test]
    fn unenforceable_schemas_are_refused() {
        for s in [
            json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}),
            json!({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}),
            json!({"type": "array"}),
            json!({"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "number"}]}}}),
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}}),
            json!({"type": "object", "properties": {}, "required": ["x"]}),
        ] {
            let e = compile_schema(&s).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("response_format"), "{s}");
        }
    }

    #[test]
    fn tool_calls_are_tagged_objects_with_a_known_name() {
        let params = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
        let g = Arc::new(
            tool_call_grammar(
                &["get_weather".into(), "get_time".into()],
                Some(&params),
                "arguments",
                Some(("<tool_call>\n", "\n</tool_call>")),
            )
            .unwrap(),
        );
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        assert_eq!(accepts(&g, call), (true, true));
        assert_eq!(accepts(&g, &call[..call.len() - 3]), (true, false));
        assert!(!accepts(&g, "<tool_call>\n{\"name\": \"get_wind\"").0);
        assert!(!accepts(&g, "Sure! <tool_call>").0);
        assert!(!accepts(&g, &format!("{call}\n")).0);
        // Without tags (Llama 3's format): the bare object.
        let bare = Arc::new(tool_call_grammar(&["f".into()], None, "parameters", None).unwrap());
        assert_eq!(
            accepts(&bare, r#"{"name": "f", "parameters": {"x": [1]}}"#),
            (true, true)
        );
    }

    #[test]
    fn whitespace_runs_are_bounded() {
        let g = Arc::new(any_object());
        let mut m = Machine::new(g);
        assert!(m.feed_all(b"{"));
        assert!(m.feed_all(&[b' '; MAX_WHITESPACE as usize]));
        assert!(!m.feed(b' '));
    }
}
