"""`lorafit serve` against a real uvicorn server on 127.0.0.1 with tiny trained adapters: the official
OpenAI client, streaming, auth, adapter selection and mixed-adapter batches equal to single-adapter
references, load/unload, LRU eviction, refused paths and pickles, and the request limits."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from openai import APIStatusError, OpenAI

from lorafit.base.config import ServeConfig, TrainConfig
from lorafit.inputs import models
from lorafit.serving.server import BackgroundServer, build
from lorafit.training import loop as train

KEY = "test-key-123"
PROMPTS = ["Tell me about the sea", "Write a list of fruits", "Why is the sky blue?", "Hello"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three LoRA adapters trained hard (lr 1e-2) on different samples, so their outputs differ."""
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "adapters"
    allowed.mkdir()
    for i, name in enumerate(("a1", "a2", "a3")):
        cfg = TrainConfig(
            model="random:tiny",
            max_samples=4 * (i + 1),
            max_length=64,
            learning_rate=1e-2,
            seed=i,
            out=str(root / name),
        )
        train.train(cfg)
        shutil.copytree(root / name / "adapter", allowed / name)
    return root, allowed


@pytest.fixture(scope="module")
def server(adapters):
    root, allowed = adapters
    cfg = ServeConfig(
        model="random:tiny",
        adapters=str(allowed),
        port=0,
        api_key=KEY,
        max_adapters=2,
        batch_wait_ms=300,
        max_prompt_tokens=64,
        max_tokens_limit=32,
        max_body_bytes=20_000,
    )
    with BackgroundServer(cfg) as url:
        yield url, root, allowed


def reference(adapter_dir, prompt: str, tokens: int) -> str:
    """Greedy continuation by plain transformers + peft, one prompt, no padding."""
    from peft import PeftModel

    source = models.resolve("random:tiny")
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(source, torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)


def client(url: str, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_models_and_adapter_selection_with_the_openai_client(server):
    url, _, allowed = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["random:tiny", "a1", "a2", "a3"]
    outputs = {}
    for model, adapter_dir in (("random:tiny", None), ("a1", allowed / "a1"), ("a2", allowed / "a2")):
        r = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == reference(adapter_dir, PROMPTS[0], 8)
        assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
        outputs[model] = r.choices[0].text
    assert len(set(outputs.values())) == 3  # each adapter really changes the output


def test_mixed_adapter_batch_equals_single_requests(server):
    url, _, allowed = server
    c = client(url)
    jobs = [("a1", PROMPTS[1]), ("a2", PROMPTS[2]), ("random:tiny", PROMPTS[3]), ("a1", PROMPTS[0])]
    results: dict[int, str] = {}

    def ask(i: int, model: str, prompt: str) -> None:
        results[i] = c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    before = _metric(url, 'lorafit_batch_rows_bucket{le="2.0"}'), _metric(url, "lorafit_batch_rows_count")
    threads = [threading.Thread(target=ask, args=(i, m, p)) for i, (m, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    small = _metric(url, 'lorafit_batch_rows_bucket{le="2.0"}') - before[0]
    assert small < _metric(url, "lorafit_batch_rows_count") - before[1]  # some passes decoded 3+ requests
    for i, (model, prompt) in enumerate(jobs):
        adapter_dir = None if model == "random:tiny" else allowed / model
        assert results[i] == reference(adapter_dir, prompt, 8), (model, prompt)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_streaming_chat_equals_the_whole_answer(server):
    url, _, _ = server
    c = client(url)
    messages = [{"role": "user", "content": "Name three colours"}]
    whole = c.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = c.completions.create(model="a1", prompt=PROMPTS[2], max_tokens=6, temperature=0, stream=True)
    plain = c.completions.create(model="a1", prompt=PROMPTS[2], max_tokens=6, temperature=0)
    assert "".join(ch.choices[0].text for ch in streamed) == plain.choices[0].text


def test_sampling_seed_and_stop(server):
    url, _, _ = server
    c = client(url)
    kw = dict(model="a1", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, top_p=0.9)
    one = c.completions.create(seed=7, **kw).choices[0].text
    assert c.completions.create(seed=7, **kw).choices[0].text == one
    greedy = c.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    word = greedy.split()[1]
    stopped = c.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy[: greedy.index(word)]


def test_auth(server, adapters):
    url, _, _ = server
    assert httpx.get(f"{url}/v1/models").status_code == 401
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(APIStatusError) as info:
        client(url, "nope").completions.create(model="a1", prompt="x", max_tokens=2)
    assert info.value.status_code == 401
    _, allowed = adapters
    open_cfg = ServeConfig(model="random:tiny", adapters=str(allowed), port=0, max_adapters=1)
    old = os.environ.pop("LORAFIT_API_KEY", None)
    try:
        with BackgroundServer(open_cfg) as open_url:  # no key set: no auth
            assert httpx.get(f"{open_url}/v1/models").status_code == 200
    finally:
        if old is not None:
            os.environ["LORAFIT_API_KEY"] = old


def test_load_unload_lru_and_refused_paths(server):
    url, root, allowed = server
    h = {"Authorization": f"Bearer {KEY}"}
    c = client(url)
    loads = _metric(url, "lorafit_adapter_loads")
    for name in ("a1", "a2", "a3", "a1"):  # max_adapters=2: a3 evicts one, a1 comes back on demand
        c.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0)
        assert httpx.get(f"{url}/health").json()["adapters_resident"] <= 2
    assert _metric(url, "lorafit_adapter_loads") > loads
    shutil.copytree(allowed / "a2", allowed / "fresh")
    r = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(allowed / "fresh")}, headers=h
    )
    assert r.status_code == 200, r.text
    assert "fresh" in [m.id for m in c.models.list().data]
    assert c.completions.create(model="fresh", prompt="Hi", max_tokens=3, temperature=0).choices[0].text == (
        c.completions.create(model="a2", prompt="Hi", max_tokens=3, temperature=0).choices[0].text
    )
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "fresh"}, headers=h).status_code == 200
    with pytest.raises(APIStatusError) as info:
        c.completions.create(model="fresh", prompt="Hi", max_tokens=2)
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"
    # outside the allowed directories: '..', an absolute path, a symlink that leads out
    outside = root / "a1" / "adapter"
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    for path in (str(allowed / ".." / "a1" / "adapter"), str(outside), str(allowed / "link")):
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path}, headers=h)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_path", path
    pickled = allowed / "pickled"
    pickled.mkdir()
    shutil.copy(allowed / "a1" / "adapter_config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "pickled", "lora_path": str(pickled)}, headers=h)
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
    r = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": str(allowed / "a1")}, headers=h
    )
    assert r.status_code == 400 and "invalid adapter name" in r.json()["error"]["message"]
    # a server started on this directory serves the good adapters and skips the link and the pickle
    engine, _ = build(ServeConfig(model="random:tiny", adapters=str(allowed), max_adapters=2))
    assert sorted(engine.registry.paths) == ["a1", "a2", "a3", "fresh"]
    for extra in ("link", "pickled", "fresh"):
        path = allowed / extra
        path.unlink() if path.is_symlink() else shutil.rmtree(path)


def test_serve_accepts_a_training_run_directory(adapters, tmp_path):
    """`serve --adapter NAME=RUN_DIR` serves the run's adapter/, as `merge RUN_DIR` merges it; a full
    fine-tune's run has no adapter: a clear error."""
    from lorafit.base.errors import UserError
    from lorafit.run.rundir import RunDir

    root, _ = adapters
    engine, _ = build(ServeConfig(model="random:tiny", adapter=[f"run1={root / 'a1'}"], max_adapters=1))
    assert engine.registry.paths["run1"] == (root / "a1" / "adapter").resolve()
    assert list(engine.registry.resident) == ["run1"]
    full = tmp_path / "full"
    full.mkdir()
    RunDir(full).write_config(TrainConfig(model="random:tiny", method="full", out=str(full)))
    with pytest.raises(UserError, match="full fine-tune"):
        build(ServeConfig(model="random:tiny", adapter=[f"f={full}"]))


def test_limits(server):
    url, _, _ = server
    h = {"Authorization": f"Bearer {KEY}"}

    def post(body: dict | str) -> httpx.Response:
        data = body if isinstance(body, str) else json.dumps(body)
        return httpx.post(f"{url}/v1/completions", content=data, headers={**h, "Content-Type": "application/json"})

    long = post({"model": "a1", "prompt": "word " * 200, "max_tokens": 2})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    many = post({"model": "a1", "prompt": "Hi", "max_tokens": 33})
    assert many.status_code == 400 and many.json()["error"]["param"] == "max_tokens"
    n = post({"model": "a1", "prompt": "Hi", "n": 2})
    assert n.status_code == 400 and n.json()["error"]["param"] == "n"
    huge = post({"model": "a1", "prompt": "x" * 30_000})
    assert huge.status_code == 413
    bad = post("{not json")
    assert bad.status_code == 400 and "error" in bad.json()
    missing = post({"prompt": "Hi"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    unknown = post({"model": "nope", "prompt": "Hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_requests_joining_a_running_batch_get_their_own_answers(adapters):
    """Continuous batching: requests arriving while another decodes join its batch (the KV caches
    merged with left padding) and leave when done. A joiner's prompt is longer than the running row,
    so the running row is the one padded at the merge. Every row's tokens, the long running row's
    included, are the single-request greedy tokens of its own adapter, token for token."""
    from lorafit.serving.engine import GenerationRequest
    from lorafit.serving.registry import BASE
    from lorafit.serving.server import make_app

    _, allowed = adapters
    cfg = ServeConfig(model="random:tiny", adapters=str(allowed), port=0, batch_wait_ms=0, max_tokens_limit=256)
    app = make_app(cfg)
    engine, tokenizer = app.state.lorafit.engine, app.state.lorafit.tokenizer
    submitted: list[GenerationRequest] = []
    real_submit = engine.submit
    engine.submit = lambda request: (submitted.append(request), real_submit(request))[1]
    long_prompt = " ".join(PROMPTS * 16)  # 384 tokens: wider than the running row ever gets (3 + 200)
    jobs = [("a1", PROMPTS[3], 200), ("a2", long_prompt, 6), ("random:tiny", PROMPTS[1], 12)]
    answers: dict[int, tuple[str, str]] = {}
    with BackgroundServer(cfg, app) as url:
        c = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def ask(i: int, model: str, prompt: str, tokens: int) -> None:
            extra = {"ignore_eos": True} if i == 0 else {}
            r = c.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, extra_body=extra)
            answers[i] = r.choices[0].text, r.choices[0].finish_reason

        threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
        threads[0].start()
        _wait_until(lambda: submitted and len(submitted[0].tokens) >= 3)  # the long row is decoding
        for t in threads[1:]:
            t.start()
        for t in threads[1:]:
            t.join()
        running = submitted[0]
        assert not running.done  # the joiners came and went while it ran
        # so the running row was the narrower one at the merge, the one given left padding
        assert len(running.prompt_ids) + 200 < len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
        threads[0].join()
        text = httpx.get(f"{url}/metrics").text
    rows = {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lorafit_batch_rows_bucket")
    }
    assert rows["1.0"] > 0 and rows["+Inf"] > rows["1.0"]  # passes alone, then passes with others joined
    by_adapter = {r.adapter: r for r in submitted}
    for i, (model, prompt, tokens) in enumerate(jobs):
        request = by_adapter[BASE if model == "random:tiny" else model]
        assert request.prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        adapter_dir = None if model == "random:tiny" else allowed / model
        expected = greedy_reference(adapter_dir, request.prompt_ids, tokens, ignore_eos=i == 0)
        assert request.tokens == expected, (model, _first_difference(request.tokens, expected))
        text, reason = answers[i]
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert reason == ("length" if len(expected) == tokens else "stop")
    assert len(by_adapter["a1"].tokens) == 200


def greedy_reference(
    adapter_dir: Path | None, prompt_ids: list[int], tokens: int, ignore_eos: bool = False
) -> list[int]:
    """Greedy token ids of one request decoded alone by plain transformers + peft: no batch, no
    padding, no KV cache (the whole sequence is run again for each token), stopping at EOS unless
    `ignore_eos`; EOS itself is not returned (as the engine does)."""
    from peft import PeftModel

    source = models.resolve("random:tiny")
    model = models.load_model(source, torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    eos = {models.load_tokenizer(source).eos_token_id, model.config.eos_token_id}
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        while len(out) < tokens:
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if token in eos and not ignore_eos:
                break
            ids.append(token)
            out.append(token)
    return out


def _first_difference(got: list[int], expected: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return f"token {at} of {len(got)} vs {len(expected)}: {got[at : at + 3]} vs {expected[at : at + 3]}"


def _wait_until(condition: Callable[[], object], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_serve_cli_refuses_bad_options(tmp_path):
    from tests.helpers import lorafit

    bad = lorafit("serve", "--model", "random:tiny", "--adapter", "no-equals-sign")
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr
    missing = lorafit("serve", "--model", "random:tiny", "--adapters", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "adapters directory not found" in missing.stderr
    mode = lorafit("serve", "--mode", "fast")
    assert mode.returncode == 2 and "set-adapter" in mode.stderr


def test_no_secrets_or_prompts_in_logs(server, caplog):
    url, _, _ = server
    assert ServeConfig().host == "127.0.0.1" and url.startswith("http://127.0.0.1:")  # loopback unless told
    secret_prompt = "my card number is 4111-1111"
    with caplog.at_level("INFO"):
        c = client(url)
        c.completions.create(model="a1", prompt=secret_prompt, max_tokens=2, temperature=0)
        with pytest.raises(APIStatusError):
            client(url, "wrong-key-456").models.list()
    access = [r.getMessage() for r in caplog.records if r.name == "lorafit.access"]
    assert any('"/v1/completions"' in m and '"status": 200' in m for m in access)
    assert any('"status": 401' in m for m in access)
    text = caplog.text
    assert KEY not in text and "wrong-key-456" not in text and secret_prompt not in text
