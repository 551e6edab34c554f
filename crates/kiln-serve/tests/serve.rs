//! `kiln serve` end to end on loopback with the real SmolLM2-135M-Instruct GGUF: the OpenAI
//! endpoints, streaming, stop strings, seeds, `n`, structured output, prefix reuse, errors,
//! the queue limit, cancellation on disconnect, and batching equivalence (every response
//! under concurrency equals the same request alone).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kiln_serve::{ServeConfig, Server};
use serde_json::{json, Value};

const MODEL: &str = "smol";

/// Starts a server on a free loopback port in a thread of its own; returns its address once
/// `/health` says it is ready.
fn start(tweak: impl FnOnce(&mut ServeConfig)) -> SocketAddr {
    let mut cfg = ServeConfig::new(kiln_testutil::smollm2_gguf());
    cfg.name = Some(MODEL.into());
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg.max_batch = 4;
    cfg.max_queue = 8;
    cfg.ctx = Some(1024);
    tweak(&mut cfg);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = Server::bind(cfg).await.unwrap();
            tx.send(server.local_addr()).unwrap();
            server.run(std::future::pending()).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    let t0 = Instant::now();
    loop {
        let (status, _) = request(addr, "GET", "/health", None, None);
        if status == 200 {
            return addr;
        }
        assert_eq!(status, 503, "health while loading");
        assert!(t0.elapsed() < Duration::from_secs(60), "model never loaded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one HTTP/1.1 request and reads the whole answer: status and body (chunked bodies
/// decoded).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, String) {
    let mut reader = send(addr, method, path, body, key);
    let (status, chunked) = read_head(&mut reader);
    let mut out = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader) {
            out.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut out).unwrap();
    }
    (status, String::from_utf8(out).unwrap())
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.unwrap_or("");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    BufReader::new(s)
}

fn read_head(r: &mut BufReader<TcpStream>) -> (u16, bool) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            return (status, chunked);
        }
        if line.eq_ignore_ascii_case("transfer-encoding: chunked\r\n") {
            chunked = true;
        }
    }
}

fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let n = usize::from_str_radix(line.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = request(addr, "POST", path, Some(&body.to_string()), None);
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 24,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The `data:` payloads of an SSE body.
fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn serves_the_openai_api() {
    let addr = start(|_| {});

    // Models.
    let (s, v) = request(addr, "GET", "/v1/models", None, None);
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["data"][0]["id"], MODEL);

    // Chat, whole answer: the same text as kiln's own generate loop on the same prompt.
    let (s, whole) = post(
        addr,
        "/v1/chat/completions",
        &chat_body("What is the capital of France?", json!({})),
    );
    assert_eq!(s, 200, "{whole}");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("Paris"), "{text}");
    let m = kiln_load::load_inference(
        &kiln_testutil::smollm2_gguf(),
        kiln_load::Weights::default(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let template = kiln_infer::ChatTemplate::new(
        m.tokenizer.chat_template.as_deref().unwrap(),
        None,
        m.tokenizer.eos.as_ref().map(|e| e.1.as_str()),
    )
    .unwrap();
    let rendered = template
        .render(
            &[kiln_infer::Message::new(
                "user",
                "What is the capital of France?",
            )],
            true,
        )
        .unwrap();
    let ids = m.tokenizer.tokenizer.encode(&rendered).unwrap();
    let mut sampler = kiln_infer::Sampler::new(kiln_infer::SamplingParams::greedy()).unwrap();
    let reference = kiln_infer::generate(
        m.model.as_ref(),
        &m.tokenizer.tokenizer,
        &ids,
        &mut sampler,
        &kiln_infer::GenerateOptions {
            max_new_tokens: 24,
            stop_strings: vec![],
            stop_tokens: m.tokenizer.stop_ids.clone(),
            truncate_prompt: false,
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(text, reference.text);
    let usage = &whole["usage"];
    assert_eq!(usage["prompt_tokens"], ids.len());
    assert_eq!(usage["completion_tokens"], reference.token_ids.len());
    assert_eq!(
        whole["choices"][0]["finish_reason"],
        reference.finish_reason.openai_name()
    );

    // The same request streamed: the deltas add up to the same text; usage comes last.
    let body = chat_body(
        "What is the capital of France?",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (s, sse) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
        None,
    );
    assert_eq!(s, 200);
    let events = sse_events(&sse);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(
        last["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
    // The second request found the prompt in a slot.
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"],
        ids.len() - 1
    );

    // Stop strings: cut before the string, also when it spans tokens; finish_reason stop.
    let cut = &text[text.len() / 2..text.len() / 2 + 4];
    let (_, stopped) = post(
        addr,
        "/v1/chat/completions",
        &chat_body("What is the capital of France?", json!({"stop": [cut]})),
    );
    let stopped_text = stopped["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert_eq!(stopped_text, &text[..text.find(cut).unwrap()]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Seeds: the same seed gives the same sample; n choices each get their own.
    let sampled = |seed: u64, n: usize| {
        let (s, v) = post(
            addr,
            "/v1/chat/completions",
            &chat_body(
                "Write a short poem about the sea.",
                json!({"temperature": 1.0, "seed": seed, "n": n, "max_tokens": 16}),
            ),
        );
        assert_eq!(s, 200, "{v}");
        v
    };
    let a = sampled(7, 3);
    let b = sampled(7, 3);
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a), texts(&b));
    assert_eq!(texts(&a).len(), 3);
    assert!(texts(&a)[0] != texts(&a)[1] || texts(&a)[1] != texts(&a)[2]);
    assert!(a["usage"]["completion_tokens"].as_u64().unwrap() >= 3);

    // Logprobs: the greedy token is the most likely one.
    let (_, lp) = post(
        addr,
        "/v1/chat/completions",
        &chat_body(
            "Hi",
            json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 4}),
        ),
    );
    let content = lp["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len(),
        lp["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], t["token"]);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }

    // Completions, with echo.
    let (s, c) = post(
        addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "echo": true}),
    );
    assert_eq!(s, 200, "{c}");
    let ct = c["choices"][0]["text"].as_str().unwrap();
    assert!(ct.starts_with("The capital of France is"), "{ct}");
    assert_eq!(c["object"], "text_completion");

    // Structured output: the reply parses and has the schema's shape.
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "population": {"type": "integer"},
            "landmarks": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "capital": {"type": "boolean"}
        },
        "required": ["city", "population", "landmarks", "capital"]
    });
    for seed in 0..3 {
        let (s, j) = post(
            addr,
            "/v1/chat/completions",
            &chat_body(
                "Describe Paris as JSON.",
                json!({"temperature": 0.8, "seed": seed, "max_tokens": 200,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}}),
            ),
        );
        assert_eq!(s, 200, "{j}");
        let reply = j["choices"][0]["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(reply).unwrap_or_else(|e| panic!("{reply}: {e}"));
        assert!(
            parsed["city"].is_string() && parsed["population"].is_i64(),
            "{parsed}"
        );
        assert!(parsed["landmarks"].as_array().unwrap().len() <= 2);
        assert!(parsed["capital"].is_boolean());
        assert_eq!(j["choices"][0]["finish_reason"], "stop");
    }

    // Errors in OpenAI's shape, naming the parameter.
    let err = |body: Value, status: u16, param: Option<&str>, code: Option<&str>| {
        let (s, v) = post(addr, "/v1/chat/completions", &body);
        assert_eq!(s, status, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        assert_eq!(v["error"]["param"].as_str(), param, "{v}");
        assert_eq!(v["error"]["code"].as_str(), code, "{v}");
    };
    err(
        chat_body("x", json!({"model": "gpt-9"})),
        404,
        Some("model"),
        Some("model_not_found"),
    );
    err(
        chat_body("x", json!({"temperature": "hot"})),
        400,
        Some("temperature"),
        Some("invalid_value"),
    );
    err(
        chat_body("x", json!({"temperature": 3.5})),
        400,
        Some("temperature"),
        Some("invalid_value"),
    );
    err(
        chat_body("x", json!({"n": 100})),
        400,
        Some("n"),
        Some("invalid_value"),
    );
    err(
        chat_body("x", json!({"max_tokens": 5000})),
        400,
        Some("messages"),
        Some("context_length_exceeded"),
    );
    err(
        chat_body("x", json!({"stop": ["a", "b", "c", "d", "e"]})),
        400,
        Some("stop"),
        Some("invalid_value"),
    );
    err(
        chat_body(
            "x",
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
        ),
        400,
        Some("tools"),
        Some("unsupported_parameter"),
    );
    err(
        chat_body(
            "x",
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}}}}),
        ),
        400,
        Some("response_format"),
        Some("invalid_value"),
    );
    err(
        json!({"model": MODEL}),
        400,
        Some("messages"),
        Some("missing_required_parameter"),
    );
    let long = "word ".repeat(1100);
    err(
        chat_body(&long, json!({"max_tokens": null})),
        400,
        Some("messages"),
        Some("context_length_exceeded"),
    );
    let (s, v) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some("{not json"),
        None,
    );
    assert_eq!(s, 400, "{v}");
    let (s, _) = request(addr, "GET", "/v1/nope", None, None);
    assert_eq!(s, 404);

    // The server still answers after all that.
    let (s, _) = post(
        addr,
        "/v1/chat/completions",
        &chat_body("Hi", json!({"max_tokens": 2})),
    );
    assert_eq!(s, 200);
}

#[test]
fn concurrent_requests_equal_the_same_requests_alone() {
    let addr = start(|c| c.prefill_chunk = 16);
    let prompts = [
        ("What is the capital of France?", 20),
        ("Name three colours.", 12),
        (
            "Write a haiku about autumn leaves falling slowly to the ground.",
            28,
        ),
        ("What is 2 + 2?", 6),
        ("Tell me about the moon.", 16),
        ("List the days of the week.", 24),
    ];
    let body = |i: usize| chat_body(prompts[i].0, json!({"max_tokens": prompts[i].1}));
    let alone: Vec<Value> = (0..prompts.len())
        .map(|i| post(addr, "/v1/chat/completions", &body(i)).1)
        .collect();
    // Six at once on four slots: they share decode steps, queue, join and leave.
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..prompts.len())
            .map(|i| s.spawn(move || post(addr, "/v1/chat/completions", &body(i)).1))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(
            a["choices"][0]["message"]["content"], t["choices"][0]["message"]["content"],
            "{a} vs {t}"
        );
        assert_eq!(
            a["usage"]["completion_tokens"],
            t["usage"]["completion_tokens"]
        );
    }
}

#[test]
fn keys_queue_limits_and_disconnects() {
    let addr = start(|c| {
        c.api_key = Some("sekrit".into());
        c.max_batch = 1;
        c.max_queue = 1;
    });
    // No key or a wrong key: 401; /health needs none.
    let body = chat_body("Hi", json!({"max_tokens": 2})).to_string();
    assert_eq!(
        request(addr, "POST", "/v1/chat/completions", Some(&body), None).0,
        401
    );
    assert_eq!(
        request(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&body),
            Some("sekri")
        )
        .0,
        401
    );
    assert_eq!(request(addr, "GET", "/health", None, None).0, 200);
    assert_eq!(
        request(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&body),
            Some("sekrit")
        )
        .0,
        200
    );

    // A client that disconnects mid-stream frees its slot: the next request is served.
    let long = chat_body(
        "Write a long story about a dragon.",
        json!({"max_tokens": 900, "stream": true, "temperature": 1.0, "seed": 1}),
    )
    .to_string();
    {
        let mut r = send(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&long),
            Some("sekrit"),
        );
        assert_eq!(read_head(&mut r).0, 200);
        for _ in 0..3 {
            read_chunk(&mut r).unwrap();
        }
    } // dropped: the connection closes
    let t0 = Instant::now();
    let (s, v) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        Some("sekrit"),
    );
    assert_eq!(s, 200, "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the abandoned stream kept its slot"
    );
    let (_, metrics) = request(addr, "GET", "/metrics", None, Some("sekrit"));
    assert!(
        metrics.contains("kiln_requests_cancelled_total 1"),
        "{metrics}"
    );

    // One slot, one queue place: a burst of four long requests gets 429 for the excess.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let b = chat_body(
                    "Write a long story about a dragon.",
                    json!({"max_tokens": 60 + i, "temperature": 1.0, "seed": i}),
                )
                .to_string();
                s.spawn(move || {
                    request(
                        addr,
                        "POST",
                        "/v1/chat/completions",
                        Some(&b),
                        Some("sekrit"),
                    )
                    .0
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
}

#[test]
fn listening_beyond_loopback_needs_a_key() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = ServeConfig::new(kiln_testutil::smollm2_gguf());
    cfg.addr = "0.0.0.0:0".parse().unwrap();
    let err = rt.block_on(Server::bind(cfg)).err().unwrap();
    assert!(err.to_string().contains("--api-key"), "{err}");
}

#[test]
fn tool_calls_with_qwen() {
    let addr = start(|c| {
        c.model = kiln_testutil::test_asset("qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
        c.ctx = Some(2048);
    });

    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}}]);
    let ask = |content: &str, extra: Value| {
        let mut b = chat_body(content, json!({"tools": tools, "max_tokens": 60}));
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let args_of = |call: &Value| -> Value {
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap()
    };

    // auto: the model calls the tool; the call is parsed out of the reply.
    let (s, v) = post(
        addr,
        "/v1/chat/completions",
        &ask("What is the weather in Paris?", json!({})),
    );
    assert_eq!(s, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(args_of(call)["city"], "Paris");

    // Streamed: a chunk with id and name, then argument fragments; reassembled, the same call.
    let (_, sse) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&ask("What is the weather in Paris?", json!({"stream": true})).to_string()),
        None,
    );
    let mut name = String::new();
    let mut arguments = String::new();
    let mut finish = Value::Null;
    for e in sse_events(&sse) {
        if e == "[DONE]" {
            continue;
        }
        let c: Value = serde_json::from_str(&e).unwrap();
        let ch = &c["choices"][0];
        if let Some(tc) = ch["delta"]["tool_calls"].get(0) {
            assert_eq!(tc["index"], 0);
            if let Some(n) = tc["function"]["name"].as_str() {
                assert!(tc["id"].is_string());
                name.push_str(n);
            }
            arguments.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
        if !ch["finish_reason"].is_null() {
            finish = ch["finish_reason"].clone();
        }
    }
    assert_eq!(name, "get_weather");
    let streamed: Value = serde_json::from_str(&arguments).unwrap();
    assert_eq!(streamed, args_of(call));
    assert_eq!(finish, "tool_calls");

    // required: even a greeting becomes a call of an offered tool; a named choice's arguments
    // follow the tool's schema.
    for extra in [
        json!({"tool_choice": "required"}),
        json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 1.0, "seed": 5}),
    ] {
        let (s, v) = post(
            addr,
            "/v1/chat/completions",
            &ask("Hello! Who are you?", extra),
        );
        assert_eq!(s, 200, "{v}");
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather", "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let args = args_of(call);
        assert!(args.is_object(), "{args}");
    }
    let (_, v) = post(
        addr,
        "/v1/chat/completions",
        &ask(
            "Hello!",
            json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ),
    );
    let args = args_of(&v["choices"][0]["message"]["tool_calls"][0]);
    assert!(
        args["city"].is_string()
            && ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
        "{args}"
    );

    // The tool's answer goes back as a `tool` message; the model replies.
    let mut body = ask("What is the weather in Paris?", json!({}));
    body["messages"] = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 18}"}
    ]);
    let (s, v) = post(addr, "/v1/chat/completions", &body);
    assert_eq!(s, 200, "{v}");

    // tool_choice none: no tools in the prompt, a plain answer.
    let (_, v) = post(
        addr,
        "/v1/chat/completions",
        &ask("Say hello.", json!({"tool_choice": "none"})),
    );
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{v}");
    // A named tool that is not offered.
    let (s, v) = post(
        addr,
        "/v1/chat/completions",
        &ask(
            "Hi",
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ),
    );
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("tool_choice")),
        "{v}"
    );
}

#[test]
fn embeddings_equal_sentence_transformers() {
    let config = kiln_testutil::test_asset("embeddinggemma-300m/config.json");
    let addr = start(|c| {
        c.model = config.parent().unwrap().to_path_buf();
        c.ctx = None;
    });
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            kiln_testutil::repo_root().join("tests/fixtures/embeddinggemma/reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let texts = reference["texts"].clone();
    let (s, v) = post(
        addr,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": texts}),
    );
    assert_eq!(s, 200, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), texts.as_array().unwrap().len());
    let mut worst = 0f64;
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        let got = d["embedding"].as_array().unwrap();
        let want = reference["embeddings"][i].as_array().unwrap();
        assert_eq!(got.len(), 768);
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((g.as_f64().unwrap() - w.as_f64().unwrap()).abs());
        }
    }
    assert!(worst < 1e-4, "max |kiln - sentence-transformers| = {worst}");
    let tokens: usize = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ids| ids.as_array().unwrap().len())
        .sum();
    assert_eq!(v["usage"]["prompt_tokens"], tokens);

    // base64 is the same floats, little-endian; `dimensions` truncates and renormalises.
    let (_, b) = post(
        addr,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "What is the capital of France?", "encoding_format": "base64", "dimensions": 256}),
    );
    let bytes = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(b["data"][0]["embedding"].as_str().unwrap())
            .unwrap()
    };
    let short: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(short.len(), 256);
    let full = &reference["embeddings"][1].as_array().unwrap()[..256];
    let norm = full
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt();
    for (s, f) in short.iter().zip(full) {
        assert!((*s as f64 - f.as_f64().unwrap() / norm).abs() < 1e-4);
    }

    // Generation endpoints say what this server is for.
    let (s, v) = post(addr, "/v1/chat/completions", &chat_body("Hi", json!({})));
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/embeddings"));
    let (s, _) = post(
        addr,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": []}),
    );
    assert_eq!(s, 400);
}

#[test]
fn responses_and_anthropic_messages() {
    let addr = start(|_| {});
    let question = "What is the capital of France?";
    let (_, chat) = post(
        addr,
        "/v1/chat/completions",
        &chat_body(question, json!({})),
    );
    let answer = chat["choices"][0]["message"]["content"].as_str().unwrap();

    // Responses: the same text as chat for the same conversation; streamed deltas add up.
    let body =
        json!({"model": MODEL, "input": question, "temperature": 0, "max_output_tokens": 24});
    let (s, v) = post(addr, "/v1/responses", &body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["output"][0]["content"][0]["text"], answer);
    assert_eq!(
        v["usage"]["output_tokens"],
        chat["usage"]["completion_tokens"]
    );
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let (_, sse) = request(
        addr,
        "POST",
        "/v1/responses",
        Some(&stream_body.to_string()),
        None,
    );
    let events: Vec<Value> = sse_events(&sse)
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "response.created");
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, answer);
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());

    // Anthropic's Messages: same text, its stop reasons and stream events.
    let body = json!({"model": MODEL, "max_tokens": 24, "temperature": 0,
                      "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}]});
    let (s, v) = post(addr, "/v1/messages", &body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], answer);
    assert_eq!(v["stop_reason"], "end_turn");
    let cut = &answer[answer.len() / 2..answer.len() / 2 + 3];
    let mut stopped = body.clone();
    stopped["stop_sequences"] = json!(["zzzz", cut]);
    let (_, v) = post(addr, "/v1/messages", &stopped);
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], cut);
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let (_, sse) = request(
        addr,
        "POST",
        "/v1/messages",
        Some(&stream_body.to_string()),
        None,
    );
    let kinds: Vec<String> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_string)
        .collect();
    assert_eq!(kinds.first().unwrap(), "message_start");
    assert_eq!(kinds.last().unwrap(), "message_stop");
    let text: String = sse_events(&sse)
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| e["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, answer);
    // Errors in Anthropic's shape.
    let (s, v) = post(
        addr,
        "/v1/messages",
        &json!({"model": MODEL, "messages": []}),
    );
    assert_eq!(s, 400);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

/// Writes a PEFT adapter for SmolLM2 with random, non-zero B (a trained adapter's shape).
fn random_adapter(dir: &std::path::Path, seed: u64, rank: usize, targets: &[&str]) {
    let m = kiln_load::load_inference(
        &kiln_testutil::smollm2_gguf(),
        kiln_load::Weights::default(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let spec = kiln_model::LoraSpec {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        rslora: false,
    };
    let a = kiln_model::Params::lora_adapters(
        &m.config,
        &spec,
        seed,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    for (i, name) in a.adapter_names().into_iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let t = a.tensor(&name).unwrap();
            let b = kiln_testutil::uniform_tensor(
                seed * 1000 + i as u64,
                t.dims(),
                candle_core::DType::F32,
            )
            .unwrap();
            a.set(&name, &(b * 0.05).unwrap()).unwrap();
        }
    }
    let base = kiln_load::AdapterBase {
        base_model: "SmolLM2-135M-Instruct".into(),
        norm_fingerprint: m.model.norm_fingerprint().unwrap(),
    };
    kiln_load::save_adapter(dir, &a, &spec, &base).unwrap();
}

#[test]
fn adapters_per_request_share_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("pirate"), tmp.path().join("later"));
    random_adapter(&a_dir, 1, 8, &["wq", "wk", "wv", "wo", "w1", "w3", "w2"]);
    random_adapter(&b_dir, 2, 4, &["wq", "wv"]);
    let addr = start(|c| {
        c.adapters = vec![("pirate".into(), a_dir.clone())];
        c.adapter_dir = Some(tmp.path().to_path_buf());
        c.api_key = Some("k".into());
    });
    let post_k = |path: &str, body: &Value| {
        let (s, t) = request(addr, "POST", path, Some(&body.to_string()), Some("k"));
        (
            s,
            serde_json::from_str::<Value>(&t).unwrap_or(Value::String(t)),
        )
    };
    let (_, models) = request(addr, "GET", "/v1/models", None, Some("k"));
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, "pirate"]);

    // Loaded at run time from --adapter-dir, by name only.
    let (s, v) = post_k("/v1/adapters", &json!({"name": "later"}));
    assert_eq!(s, 200, "{v}");
    for bad in ["../later", "later/..", "/etc", ""] {
        let (s, _) = post_k("/v1/adapters", &json!({"name": bad}));
        assert_eq!(s, 400, "{bad}");
    }
    let (s, _) = post_k("/v1/adapters", &json!({"name": "later"}));
    assert_eq!(s, 400, "loaded twice");

    // Each model answers alone; the adapters change the answer.
    let ask = |model: &str, i: usize| {
        let mut b = chat_body(
            [
                "Tell me about the moon.",
                "Name three colours.",
                "What is 2 + 2?",
            ][i / 2],
            json!({"max_tokens": 20}),
        );
        b["model"] = json!(model);
        b
    };
    let models = [MODEL, "pirate", "later"];
    let alone: Vec<String> = (0..6)
        .map(|i| {
            let (s, v) = post_k("/v1/chat/completions", &ask(models[i % 3], i));
            assert_eq!(s, 200, "{v}");
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // Each prompt goes to two models in turn: base and pirate, later and base, pirate and
    // later. The adapters change the answers (they are applied).
    assert_ne!(alone[0], alone[1], "{alone:?}");
    // Base, both adapters, all at once in one batch: each equals its answer alone.
    let together: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|i| {
                let b = ask(models[i % 3], i);
                s.spawn(move || post_k("/v1/chat/completions", &b).1)
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    });
    assert_eq!(alone, together);
    // Without a key the server refuses to load adapters.
    let open = start(|c| c.adapter_dir = Some(tmp.path().to_path_buf()));
    let (s, _) = request(
        open,
        "POST",
        "/v1/adapters",
        Some(&json!({"name": "later"}).to_string()),
        None,
    );
    assert_eq!(s, 403);
}

#[test]
fn decoder_embeddings_pool_the_final_hidden_states() {
    let addr = start(|c| c.embeddings = Some(kiln_serve::Pooling::Mean));
    let last = start(|c| c.embeddings = Some(kiln_serve::Pooling::Last));
    let texts = ["The cat sat on the mat.", "Paris is the capital of France."];
    let (llama, _, _) = kiln_load::load_llama(
        &kiln_testutil::smollm2_gguf(),
        kiln_load::Weights::default(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tok = kiln_load::load_tokenizer(&kiln_testutil::smollm2_gguf()).unwrap();
    for (server, pool_last) in [(addr, false), (last, true)] {
        let (s, v) = post(
            server,
            "/v1/embeddings",
            &json!({"model": MODEL, "input": texts}),
        );
        assert_eq!(s, 200, "{v}");
        for (i, text) in texts.iter().enumerate() {
            let ids = tok.encode_prompt(text).unwrap();
            let x =
                candle_core::Tensor::from_slice(&ids, (1, ids.len()), &candle_core::Device::Cpu)
                    .unwrap();
            let h = llama
                .forward_cached_hidden(&x, &mut kiln_model::KvCache::new())
                .unwrap();
            let pooled = if pool_last {
                h.get(ids.len() - 1).unwrap()
            } else {
                h.mean(0).unwrap()
            };
            let want: Vec<f32> = pooled.to_vec1().unwrap();
            let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
            let got = v["data"][i]["embedding"].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g.as_f64().unwrap() as f32 - w / norm).abs() < 1e-5);
            }
        }
        assert_eq!(
            v["usage"]["prompt_tokens"],
            texts
                .iter()
                .map(|t| tok.encode_prompt(t).unwrap().len())
                .sum::<usize>()
        );
    }
    // Without --embeddings a decoder refuses.
    let plain = start(|_| {});
    let (s, v) = post(
        plain,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "x"}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--embeddings"));
}
