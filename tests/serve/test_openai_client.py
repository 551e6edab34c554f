"""`kiln serve` through the official openai client (run by scripts/test-serve-openai.sh).

Every check is a plain assert; the script stops at the first failure with its message.
"""
import concurrent.futures
import json
import os
import subprocess

import jsonschema
import openai

URL, KEY, MODEL = os.environ["KILN_URL"], os.environ["KILN_KEY"], "smol"
client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0)
USER = [{"role": "user", "content": "What is the capital of France?"}]


def kiln_token_count(text: str) -> int:
    out = subprocess.run(
        [os.environ["KILN_BIN"], "tokenize", "--model", os.environ["KILN_MODEL_FILE"], "--text", text, "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return len(json.loads(out))


def check(name, ok, detail=""):
    assert ok, f"{name}: {detail}"
    print(f"ok  {name}")


# Models.
ids = [m.id for m in client.models.list()]
check("models lists the served id", ids == [MODEL], ids)

# Chat, whole and streamed.
whole = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=24)
text = whole.choices[0].message.content
check("chat answers", "Paris" in text, text)
check("finish_reason", whole.choices[0].finish_reason in ("stop", "length"), whole.choices[0].finish_reason)
stream = client.chat.completions.create(
    model=MODEL, messages=USER, temperature=0, max_tokens=24, stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
check("streamed text equals the whole answer", "".join(pieces) == text, ("".join(pieces), text))
check("stream ends with usage", usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage)
check("prefix reuse reported", usage.prompt_tokens_details.cached_tokens > 0, usage)

# Completions: prompt tokens as the tokenizer counts them.
prompt = "The capital of France is"
comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
check("completion usage equals the tokenizer's count", comp.usage.prompt_tokens == kiln_token_count(prompt),
      (comp.usage.prompt_tokens, kiln_token_count(prompt)))
lp = comp.choices[0].logprobs
check("completion logprobs", len(lp.tokens) == comp.usage.completion_tokens and "".join(lp.tokens) == comp.choices[0].text,
      (lp.tokens, comp.choices[0].text))
echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True)
check("echo", echo.choices[0].text.startswith(prompt), echo.choices[0].text)

# n choices, seeds, stop strings, logprobs.
poem = [{"role": "user", "content": "Write a short poem about the sea."}]
a = client.chat.completions.create(model=MODEL, messages=poem, temperature=1.0, seed=11, n=3, max_tokens=16)
b = client.chat.completions.create(model=MODEL, messages=poem, temperature=1.0, seed=11, n=3, max_tokens=16)
ta, tb = [c.message.content for c in a.choices], [c.message.content for c in b.choices]
check("n choices", len(ta) == 3 and [c.index for c in a.choices] == [0, 1, 2], ta)
check("same seed, same samples", ta == tb, (ta, tb))
check("choices differ", len(set(ta)) > 1, ta)
stop = text[len(text) // 2: len(text) // 2 + 3]
s = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=24, stop=[stop])
check("stop string cuts the reply", s.choices[0].message.content == text[: text.find(stop)] and s.choices[0].finish_reason == "stop",
      (s.choices[0].message.content, stop))
l = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2)
content = l.choices[0].logprobs.content
check("chat logprobs", len(content) == l.usage.completion_tokens and all(t.top_logprobs[0].token == t.token for t in content),
      content)

# Structured output validates against its schema.
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]}]},
    },
    "required": ["name", "age", "colours", "pet"],
    "additionalProperties": False,
}
for seed in range(3):
    r = client.chat.completions.create(
        model=MODEL, temperature=0.9, seed=seed, max_tokens=200,
        messages=[{"role": "user", "content": "Invent a person and describe them as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    reply = json.loads(r.choices[0].message.content)
    jsonschema.validate(reply, schema)
check("json_schema replies validate", True)
r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=120, temperature=0.7, seed=3,
                                   response_format={"type": "json_object"})
check("json_object reply is an object", r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict),
      r.choices[0].message.content)


# The Responses API and Anthropic's Messages API on the same engine.
resp = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=24)
check("responses: same answer as chat", resp.output_text == text, (resp.output_text, text))
events = list(client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0,
                                      max_output_tokens=24, stream=True))
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
check("responses: streamed", events[-1].type == "response.completed" and deltas == text, [e.type for e in events])
import anthropic

claude = anthropic.Anthropic(base_url=URL.removesuffix("/v1"), api_key=KEY, max_retries=0)
m = claude.messages.create(model=MODEL, max_tokens=24, messages=USER, extra_body={"temperature": 0})
check("messages: same answer as chat", m.content[0].text == text and m.stop_reason in ("end_turn", "max_tokens"), m)
with claude.messages.stream(model=MODEL, max_tokens=24, messages=USER, extra_body={"temperature": 0}) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
check("messages: streamed", streamed == text and final.usage.output_tokens == m.usage.output_tokens, (streamed, text))
try:
    claude.messages.create(model="nope", max_tokens=4, messages=USER)
    raise AssertionError("expected NotFoundError")
except anthropic.NotFoundError as e:
    check("messages: unknown model is 404", e.status_code == 404)

# Errors.
def expect(exc, status, fn):
    try:
        fn()
    except exc as e:
        assert e.status_code == status, (e.status_code, status)
        return e.body
    raise AssertionError(f"expected {exc.__name__}")


body = expect(openai.NotFoundError, 404, lambda: client.chat.completions.create(model="nope", messages=USER))
check("unknown model is 404", body["code"] == "model_not_found", body)
body = expect(openai.BadRequestError, 400, lambda: client.chat.completions.create(model=MODEL, messages=USER, temperature=7))
check("bad parameter is 400 naming it", body["param"] == "temperature", body)
body = expect(openai.BadRequestError, 400, lambda: client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "word " * 1100}]))
check("prompt over the context", body["code"] == "context_length_exceeded", body)
bad_key = openai.OpenAI(base_url=URL, api_key="wrong", max_retries=0)
expect(openai.AuthenticationError, 401, lambda: bad_key.models.list())
check("wrong key is 401", True)


# A burst past --max-batch 4 + --max-queue 2 gets 429 for the excess, the rest complete.
def long_request(i):
    try:
        client.chat.completions.create(model=MODEL, messages=poem, temperature=1.0, seed=i, max_tokens=48)
        return 200
    except openai.RateLimitError:
        return 429


with concurrent.futures.ThreadPoolExecutor(12) as pool:
    codes = list(pool.map(long_request, range(12)))
check("burst: some served, the excess 429", codes.count(200) >= 6 and codes.count(429) >= 1, codes)
r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=24)
check("served after the burst", r.choices[0].message.content == text)

# Tool calls (Qwen2.5-Coder-0.5B-Instruct's template): a streamed call reassembles into valid
# arguments, the whole answer carries the same call, and the tool's reply is accepted back.
tools_client = openai.OpenAI(base_url=os.environ["KILN_TOOL_URL"], api_key=KEY, max_retries=0)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                   "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
whole = tools_client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, temperature=0, max_tokens=60)
call = whole.choices[0].message.tool_calls[0]
check("tool call parsed", whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather",
      whole.choices[0])
args = json.loads(call.function.arguments)
jsonschema.validate(args, TOOLS[0]["function"]["parameters"])
check("tool call arguments validate", args["city"] == "Paris", args)
parts, names, ids, finish = {}, {}, {}, None
for chunk in tools_client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, temperature=0,
                                                  max_tokens=60, stream=True):
    for c in chunk.choices:
        for tc in c.delta.tool_calls or []:
            if tc.id:
                ids[tc.index] = tc.id
            if tc.function and tc.function.name:
                names[tc.index] = tc.function.name
            if tc.function and tc.function.arguments:
                parts[tc.index] = parts.get(tc.index, "") + tc.function.arguments
        finish = c.finish_reason or finish
check("streamed tool call reassembles", names == {0: "get_weather"} and 0 in ids
      and json.loads(parts[0]) == args and finish == "tool_calls", (names, parts, finish))
forced = tools_client.chat.completions.create(
    model="qwen", messages=[{"role": "user", "content": "Hello!"}], tools=TOOLS, max_tokens=60,
    tool_choice={"type": "function", "function": {"name": "get_weather"}})
fargs = json.loads(forced.choices[0].message.tool_calls[0].function.arguments)
jsonschema.validate(fargs, TOOLS[0]["function"]["parameters"])
check("a named tool_choice is enforced with the tool's schema", True)
reply = tools_client.chat.completions.create(
    model="qwen", tools=TOOLS, temperature=0, max_tokens=40,
    messages=ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})}])
check("tool results are accepted back", reply.choices[0].message is not None)
print("all openai-client checks passed")
