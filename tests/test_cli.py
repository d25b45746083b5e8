"""The `ocula` command line: run and chat (library path) against generate(); batch (engine) with resume."""

from __future__ import annotations

import io
import json
import sys

import pytest

from ocula import cli
from tests.checkpoints import make_image
from tests.test_server import data_uri


def _library(ckpt):
    from ocula import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(ckpt), AutoModelForImageTextToText.from_pretrained(ckpt)


def _greedy(processor, model, conversation, max_tokens: int) -> str:
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "shapes.png"
    make_image(56, 84, seed=4).save(path)
    return path


def test_run_streams_the_greedy_answer(qwen2_vl_ckpt, png, capsys):
    code = cli.main(["run", "--model", str(qwen2_vl_ckpt), "--image", str(png), "--max-tokens", "6",
                     "What is shown in the picture?"])
    assert code == 0
    processor, model = _library(qwen2_vl_ckpt)
    conversation = cli._conversation("What is shown in the picture?", [str(png)], None)
    want = _greedy(processor, model, conversation, 6)
    captured = capsys.readouterr()
    assert captured.out.strip() == want.strip()
    assert "loading" in captured.err


def test_run_without_the_bundled_model_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "missing-model")
    assert cli.main(["run", "hi"]) == 2
    assert "--model" in capsys.readouterr().err


def test_chat_keeps_history_and_attaches_images(qwen2_vl_ckpt, png, monkeypatch, capsys):
    script = f"/image {png}\nWhat is shown in the picture?\n/image /no/such/file.png\nCount them.\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert cli.main(["chat", "--model", str(qwen2_vl_ckpt), "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    answers = [line.removeprefix("ocula> ") for line in captured.out.splitlines() if line.startswith("ocula> ")]
    assert len(answers) == 2
    processor, model = _library(qwen2_vl_ckpt)
    first = [{"role": "user", "content": [{"type": "image", "url": str(png)},
                                          {"type": "text", "text": "What is shown in the picture?"}]}]
    want_first = _greedy(processor, model, first, 4)
    second = first + [{"role": "assistant", "content": [{"type": "text", "text": want_first}]},
                      {"role": "user", "content": [{"type": "text", "text": "Count them."}]}]
    assert answers == [want_first.strip(), _greedy(processor, model, second, 4).strip()]
    assert "no such file" in captured.err


# ---- batch -------------------------------------------------------------------------------------------------


class _Interrupt:
    """Wraps an engine so that its step raises KeyboardInterrupt after `after` finished requests."""

    def __init__(self, engine, after: int):
        self.engine, self.after, self.finished = engine, after, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        if self.finished >= self.after:
            raise KeyboardInterrupt
        outputs = self.engine.step()
        self.finished += sum(o.finished for o in outputs)
        return outputs


def _write_input(path, png) -> list[dict]:
    good = [
        {"id": "a", "prompt": "What is shown in the picture?", "images": [png.name]},
        {"id": "b", "messages": [{"role": "user", "content": "Hello, how are you today?"}], "max_tokens": 3},
        {"id": "c", "prompt": "Count them.", "images": [str(png), str(png)]},
        {"id": "d", "prompt": "Where is the train station?"},
        {"id": "e", "prompt": "Describe this image.", "images": ["missing.png"]},
    ]
    lines = [json.dumps(g) for g in good[:2]] + ["{this is not json", json.dumps({"id": "x"})]
    lines += [json.dumps(g) for g in good[2:]]
    path.write_text("\n".join(lines) + "\n")
    return good


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_batch_appends_resumes_and_reports_bad_lines(qwen2_vl_ckpt, png, tmp_path, monkeypatch, capsys):
    (tmp_path / png.name).write_bytes(png.read_bytes())
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = _write_input(source, png)
    load_engine = cli.load_engine

    def interrupted(args):
        engine, processor = load_engine(args)
        return _Interrupt(engine, after=1), processor

    monkeypatch.setattr(cli, "load_engine", interrupted)
    argv = ["batch", str(source), str(output), "--model", str(qwen2_vl_ckpt), "--max-tokens", "5"]
    assert cli.main(argv) == 130  # interrupted after the first answer ("b" asks for 3 tokens only)
    first = _records(output)
    assert [r["id"] for r in first if "text" in r] == ["b"]
    with output.open("a") as torn:
        torn.write('{"id": "d", "te')  # a crash while writing a line

    monkeypatch.setattr(cli, "load_engine", load_engine)
    assert cli.main(argv) == 0
    records = _records_tolerant(output)
    answers = {r["id"]: r for r in records if "text" in r}
    assert sorted(r["id"] for r in records if "text" in r) == ["a", "b", "c", "d"]  # each once
    errors = {r["id"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {"line-3", "line-4", "e"} and "missing.png" in errors["e"]
    assert "line 3" in capsys.readouterr().err

    count = len(records)
    assert cli.main(argv) == 0  # a third run has nothing left to do and repeats no record
    assert len(_records_tolerant(output)) == count

    processor, model = _library(qwen2_vl_ckpt)
    for job in good[:4]:
        conversation = _batch_conversation(job, tmp_path)
        want = _greedy(processor, model, conversation, job.get("max_tokens", 5))
        assert answers[job["id"]]["text"] == want.rstrip("\ufffd"), job["id"]
        assert answers[job["id"]]["usage"]["completion_tokens"] == job.get("max_tokens", 5)


def _batch_conversation(job: dict, base) -> list[dict]:
    if "messages" in job:
        return job["messages"]
    images = [{"type": "image", "url": str(base / i)} for i in job.get("images", [])]
    return [{"role": "user", "content": images + [{"type": "text", "text": job["prompt"]}]}]


def _records_tolerant(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_serve_starts_on_loopback_with_its_flags(qwen2_vl_ckpt):
    import signal
    import socket
    import subprocess
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "ocula.cli", "serve", str(qwen2_vl_ckpt), "--port", str(port),
               "--served-model-name", "tiny", "--api-key", "k", "--max-model-len", "512", "--max-num-seqs", "4",
               "--mm-processor-kwargs", '{"max_pixels": 3136}', "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.1)
        models = httpx.get(f"{base}/v1/models", headers=headers).json()
        assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 512
        assert httpx.get(f"{base}/v1/models").status_code == 401
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 3
        image = {"type": "image_url", "image_url": {"url": data_uri(make_image(112, 112))}}
        body["messages"][0]["content"] = [image, {"type": "text", "text": "Hello"}]
        with_image = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60).json()
        # 112x112 is 16 image tokens by default; max_pixels=3136 makes it 4 (+ vision start / end)
        assert with_image["usage"]["prompt_tokens"] - answer["usage"]["prompt_tokens"] == 4 + 2
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/v1" in output


@pytest.mark.parametrize("flag, graphs", [([], True), (["--enforce-eager"], False)])
def test_engine_commands_take_enforce_eager(qwen2_vl_ckpt, flag, graphs):
    args = cli.build_parser().parse_args(["serve", str(qwen2_vl_ckpt), "--device", "cpu", *flag])
    engine, _ = cli.load_engine(args)
    assert engine.config.cuda_graphs is graphs
    assert engine.runner.graphs is None  # a CPU never captures
