"""Every curl example in docs/SERVER.md runs (with $BASE set) and succeeds."""
import os
import re
import subprocess

import pytest

from conftest import ROOT


def blocks():
    text = (ROOT / "docs/SERVER.md").read_text()
    out = [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "curl" in b and "$BASE" in b]
    assert len(out) >= 10, "docs/SERVER.md lost its curl examples"
    return out


@pytest.mark.parametrize("block", blocks(), ids=lambda b: b.strip().splitlines()[0][:60])
def test_curl_example(server, block):
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], env={**os.environ, "BASE": server},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{block}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    if "stream" in block:
        assert "data: " in r.stdout
