"""A client generated from schemas/openapi.json by openapi-python-client makes a chat call."""
import importlib
import pathlib
import subprocess
import sys

from conftest import ROOT, SMOL


def test_generated_client_chat(server, tmp_path):
    gen = pathlib.Path(sys.executable).parent / "openapi-python-client"
    r = subprocess.run([str(gen), "generate", "--path", str(ROOT / "schemas/openapi.json"),
                        "--output-path", str(tmp_path / "rmlx_client"), "--meta", "none"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        client = importlib.import_module("rmlx_client")
        chat = importlib.import_module("rmlx_client.api.open_ai.create_chat_completion")
        models = importlib.import_module("rmlx_client.models")
    finally:
        sys.path.remove(str(tmp_path))
    body = models.ChatCompletionRequest.from_dict({
        "model": SMOL, "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    resp = chat.sync_detailed(client=client.Client(base_url=server), body=body)
    assert resp.status_code == 200, resp.content
    assert "Paris" in resp.parsed.choices[0].message.content
