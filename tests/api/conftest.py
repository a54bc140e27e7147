"""A `rmlx serve` on an ephemeral port for the SDK tests: the default model
(SmolLM2-135M-Instruct, `make default-model`) and the tiny llama-f32 fixture."""
import os
import pathlib
import re
import subprocess
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOL = "SmolLM2-135M-Instruct"
TINY = "llama-f32"


def default_model() -> pathlib.Path:
    if os.environ.get("RMLX_DEFAULT_MODEL"):
        return pathlib.Path(os.environ["RMLX_DEFAULT_MODEL"])
    cache = os.environ.get("RMLX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rmlx")
    return pathlib.Path(cache) / "models" / SMOL


def rmlx_bin() -> pathlib.Path:
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "rmlx"


def start_server(*extra: str):
    model = default_model()
    assert (model / "config.json").exists(), f"{model} missing: run `make default-model`"
    binary = rmlx_bin()
    assert binary.exists(), f"{binary} missing: run `make build`"
    proc = subprocess.Popen(
        [str(binary), "serve", "--port", "0", "--model", str(model),
         "--model", str(ROOT / "tests/fixtures/models" / TINY), *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    base = None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"on (http://[0-9.:]+)", line)
        if m:
            base = m.group(1)
            break
    if base is None:
        proc.kill()
        raise RuntimeError("rmlx serve did not start:\n" + "".join(lines))
    # keep draining stderr so the server never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, base


@pytest.fixture(scope="session")
def server():
    proc, base = start_server()
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def oai(server):
    import openai
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def ant(server):
    import anthropic
    return anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
