"""Prompt files: the schema, its errors, and generation through an OpenAI-compatible endpoint
(a local HTTP server started here plays the endpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipinspect.export import llm_client, prompt_format
from clipinspect.export.llm_client import GenerationError
from clipinspect.export.prompt_format import PromptFileError

VALID = {"format": "clipinspect-prompts", "version": 1, "source": "a person",
         "categories": {"metal nut": {"normal": ["a shiny {} with clean threads"],
                                      "anomalous": ["a {} with a bent flange", "a scratched nut"]},
                        "bottle": {"anomalous": ["a bottle with a broken rim"]}}}


def test_valid_json_and_yaml_files_load_the_same(tmp_path):
    yaml = pytest.importorskip("yaml")
    (tmp_path / "p.json").write_text(json.dumps(VALID))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(VALID))
    from_json = prompt_format.load(tmp_path / "p.json")
    assert from_json == prompt_format.load(tmp_path / "p.yaml")
    assert from_json["bottle"] == {"normal": [], "anomalous": ["a bottle with a broken rim"]}
    assert prompt_format.expand(from_json["metal nut"]["anomalous"], "metal nut") == [
        "a metal nut with a bent flange", "a scratched nut"]


def test_every_problem_is_reported_with_its_path_and_value(tmp_path):
    bad = {"format": "other", "extra": 1, "categories": {
        "bottle": {"normal": ["fine", 42, "", "fine", "a {} with {braces}"], "anomalus": []},
        "cable": [], "bad/name": {"normal": ["x"]}, "screw": {"normal": [], "anomalous": []}}}
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(PromptFileError) as e:
        prompt_format.load(tmp_path / "p.json")
    text = str(e.value)
    for expected in ("extra: unknown top-level key", "format: 'other'; expected 'clipinspect-prompts'",
                     "categories.bottle.normal[1]: expected a non-empty string, got 42 (int)",
                     "categories.bottle.normal[2]: expected a non-empty string, got ''",
                     "categories.bottle.normal[3]: 'fine' appears twice",
                     "categories.bottle.normal[4]: 'a {} with {braces}' has braces",
                     "categories.bottle.anomalus: unknown key",
                     "categories.cable: expected an object", "(and 2 more)"):
        assert expected in text, expected
    bad = {"categories": {"bad/name": {"normal": ["x"]}, "screw": {"normal": []}}}
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(PromptFileError, match=r"(?s)'bad/name'.*invalid category name.*"
                                              r"categories.screw: no descriptions"):
        prompt_format.load(tmp_path / "p.json")


def test_the_format_reads_without_the_http_client():
    """prompt_format is the format alone (the runtime's CLI loads it, no HTTP client with it)."""
    code = ("import sys; import clipinspect.export.prompt_format; "
            "print('clipinspect.export.llm_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "False"), out.stderr


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON: Expecting property name enclosed in double quotes at line 1"),
    ("[]", "expected a JSON/YAML object with a 'categories' key, got a list"),
    ('{"categories": {}}', "categories: expected an object mapping category names"),
])
def test_unreadable_files_are_explained(tmp_path, content, message):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        prompt_format.load(tmp_path / "p.json")


# ------------------------------------------------------------------------ a local endpoint
class Endpoint:
    """Answers POST requests with whatever ``reply`` returns for the parsed request body:
    (status, bytes), (status, bytes, extra headers) or a float = sleep that long first (for
    timeouts)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.reply = None
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"path": self.path, "body": body,
                                          "auth": self.headers.get("Authorization")})
                status, data, *extra = endpoint.reply(body)
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()


@pytest.fixture
def endpoint():
    e = Endpoint()
    yield e
    e.server.shutdown()
    e.server.server_close()


def chat(content) -> tuple[int, bytes]:
    return 200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                     "content": content}}]}).encode()


def answer(category: str) -> str:
    return json.dumps({"normal": [f"an intact {category}", "a clean surface"],
                       "anomalous": [f"a {category} with a crack", "a dented surface"]})


def test_generate_sends_chat_requests_and_writes_a_valid_file(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    # One answer plain, one inside a Markdown code fence, as chat models often write.
    endpoint.reply = lambda body: chat(answer("screw") if "screw" in body["messages"][1]["content"]
                                       else "```json\n" + answer("cable") + "\n```")
    out = tmp_path / "prompts.json"
    data = llm_client.generate(endpoint.url, "local-model", ["screw", "cable"], out,
                                 per_state=4, api_key_env="TEST_LLM_KEY", progress=lambda m: None)
    assert [r["path"] for r in endpoint.requests] == ["/v1/chat/completions"] * 2
    first = endpoint.requests[0]
    assert first["auth"] == "Bearer sk-test" and first["body"]["model"] == "local-model"
    assert [m["role"] for m in first["body"]["messages"]] == ["system", "user"]
    assert "screw" in first["body"]["messages"][1]["content"] and "4" in first["body"]["messages"][1]["content"]
    assert prompt_format.load(out) == data["categories"]
    assert data["categories"]["cable"]["anomalous"] == ["a cable with a crack", "a dented surface"]
    assert data["source"]["model"] == "local-model"


@pytest.mark.parametrize("reply, error, message", [
    (lambda b: (500, b'{"error": "overloaded"}'), GenerationError, r"HTTP 500.*overloaded"),
    (lambda b: (401, b"bad key"), GenerationError, r"HTTP 401.*check the API key variable"),
    (lambda b: (200, b"<html>gateway</html>"), GenerationError, "not JSON"),
    (lambda b: (200, b'{"result": "ok"}'), GenerationError, "without choices\\[0\\].message.content"),
    (lambda b: chat("Sure! Here are some descriptions: ..."), PromptFileError, "not a JSON object"),
    (lambda b: chat('{"normal": ["fine"], "anomalous": []}'), PromptFileError,
     r"answer for 'screw'.anomalous: no descriptions"),
    (lambda b: chat('{"normal": ["fine", 3], "anomalous": ["bad"]}'), PromptFileError,
     r"normal\[1\]: expected a non-empty string, got 3"),
])
def test_bad_answers_fail_clearly_and_write_nothing(endpoint, tmp_path, reply, error, message):
    endpoint.reply = reply
    out = tmp_path / "prompts.json"
    with pytest.raises(error, match=message):
        llm_client.generate(endpoint.url + "/chat/completions", "m", ["screw"], out,
                              progress=lambda m: None)
    assert not out.exists()


def test_timeout_and_unreachable_server(endpoint, tmp_path):
    def slow(body):
        time.sleep(1.5)
        return chat(answer("screw"))
    endpoint.reply = slow
    with pytest.raises(GenerationError, match="did not answer within 0.3 s"):
        llm_client.generate(endpoint.url, "m", ["screw"], tmp_path / "p.json", timeout=0.3,
                              progress=lambda m: None)
    with pytest.raises(GenerationError, match="cannot reach"):
        llm_client.generate("http://127.0.0.1:9/v1", "m", ["screw"], tmp_path / "p.json",
                              timeout=2, progress=lambda m: None)
    with pytest.raises(GenerationError, match="expected an http"):
        llm_client.generate("localhost:8000", "m", ["screw"], tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_cli_check_and_generate(endpoint, tmp_path):
    endpoint.reply = lambda body: chat(answer("screw"))
    out = tmp_path / "p.json"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "clipinspect.runtime.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120)
    proc = run("prompts", "generate", "--url", endpoint.url, "--model", "m", "--categories",
               "screw", "--out", out)
    assert proc.returncode == 0, proc.stderr
    proc = run("prompts", "check", out)
    assert proc.returncode == 0 and "screw: 2 normal, 2 anomalous" in proc.stdout
    out.write_text(json.dumps({"categories": {"screw": {"normal": "one"}}}))
    proc = run("prompts", "check", out)
    assert proc.returncode == 2
    assert "categories.screw.normal: expected a list of descriptions, got 'one' (str)" in proc.stderr


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_generate_never_follows_a_redirect_with_the_api_key(endpoint, tmp_path, monkeypatch,
                                                             status):
    elsewhere = Endpoint()  # another origin (port), which must never see the key
    elsewhere.reply = lambda body: chat(answer("screw"))
    try:
        monkeypatch.setenv("TEST_LLM_KEY", "sk-secret")
        location = elsewhere.url + "/chat/completions"
        endpoint.reply = lambda body: (status, b"", {"Location": location})
        with pytest.raises(llm_client.GenerationError, match="redirect") as e:
            llm_client.generate(endpoint.url, "m", ["screw"], tmp_path / "p.json",
                                  api_key_env="TEST_LLM_KEY", progress=lambda m: None)
        assert location in str(e.value)
        assert elsewhere.requests == []
        assert not (tmp_path / "p.json").exists()
    finally:
        elsewhere.server.shutdown()
        elsewhere.server.server_close()


def test_generate_refuses_an_oversized_answer(endpoint, tmp_path, monkeypatch):
    endpoint.reply = lambda body: (200, b"[" + b"0," * (llm_client.MAX_ANSWER_BYTES // 2)
                                   + b"0]")
    with pytest.raises(llm_client.GenerationError, match="more than"):
        llm_client.generate(endpoint.url, "m", ["screw"], tmp_path / "p.json",
                              progress=lambda m: None)


class Dripper:
    """A server on 127.0.0.1 that answers every request one byte every 0.2 s (the status line
    and headers too, or only the body), for at most ``limit_s``; records when the client cut
    the connection."""

    def __init__(self, where: str, limit_s: float = 6.0):
        import socket

        self.where, self.limit_s, self.cut_at = where, limit_s, None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(limit_s)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(self.limit_s)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            body = json.dumps({"choices": [{"message": {"content": answer("screw")}}]}).encode()
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            if self.where == "body":
                conn.sendall(head)
            slow = (head if self.where == "headers" else b"") + body
            end = time.monotonic() + self.limit_s
            for i in range(len(slow)):
                if time.monotonic() > end:
                    return
                try:
                    conn.sendall(slow[i:i + 1])
                except OSError:
                    self.cut_at = time.monotonic()
                    return
                time.sleep(0.2)

    def close(self):
        self.listener.close()
        self.thread.join(self.limit_s + 2)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_timeout_bounds_the_whole_request_against_a_dripping_server(tmp_path, where):
    server = Dripper(where)
    try:
        started = time.monotonic()
        with pytest.raises(GenerationError, match=r"did not answer within 1 s") as e:
            llm_client.generate(server.url, "m", ["screw"], tmp_path / "p.json", timeout=1.0,
                                  progress=lambda m: None)
        elapsed = time.monotonic() - started
        assert elapsed < 1.0 + 1.0, elapsed  # urllib's per-read timeout alone: about 30 s
        assert "\n" not in str(e.value)
        assert not (tmp_path / "p.json").exists()
        server.thread.join(3.0)
        assert server.cut_at is not None and server.cut_at - started < 1.0 + 3.0  # cut off
    finally:
        server.close()


def test_an_answer_broken_off_midway_is_a_one_line_error(tmp_path):
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"choices\"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        with pytest.raises(GenerationError, match="broke off its answer") as e:
            llm_client.generate(url, "m", ["screw"], tmp_path / "p.json", timeout=10,
                                  progress=lambda m: None)
        assert "\n" not in str(e.value)
    finally:
        thread.join(10)
        listener.close()
