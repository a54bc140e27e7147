"""Runs schemathesis (every check, positive and negative data) against a
live rmlx server and sums up what it sent: requests per operation, status
classes, 5xx. Used by test_openapi_contract.py (a short run) and
scripts/schemathesis-full.sh (the full one):

    .venv-dev/bin/python tests/api/st_run.py --max-examples 100
"""
import argparse
import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tiny_chat  # noqa: E402
from conftest import ROOT  # noqa: E402

SPEC = ROOT / "schemas/openapi.json"


def run(base: str, max_examples: int, out: pathlib.Path, seed: int = 1, extra=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCHEMATHESIS_HOOKS="st_hooks", PYTHONPATH=str(HERE),
               RMLX_ST_MODEL=tiny_chat.NAME, RMLX_ST_VOCAB=str(tiny_chat.VOCAB))
    st = pathlib.Path(sys.executable).parent / "st"
    cmd = [str(st), "--config-file", str(HERE / "schemathesis.toml"), "run", str(SPEC), "--url", base, "--checks", "all", "--mode", "all",
           "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1",
           "--request-timeout", "60", "--suppress-health-check", "all",
           "--report", "har", "--report-har-path", str(out / "run.har"), "--no-color", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)


def summary(har: pathlib.Path, doc: dict) -> dict:
    """Requests per documented operation, status classes, and the 5xx seen."""
    templates = [(m.upper(), p, re.compile("^" + re.sub(r"\{[^/]+\}", "[^/]+", p) + "$"))
                 for p, ops in doc["paths"].items() for m in ops]
    entries = json.loads(har.read_text())["log"]["entries"]
    per_op = collections.Counter()
    ok_per_op = collections.Counter()
    statuses = collections.Counter()
    server_errors = []
    for e in entries:
        method, url = e["request"]["method"], e["request"]["url"]
        path = re.sub(r"^https?://[^/]+", "", url).split("?")[0]
        op = next((f"{m} {p}" for m, p, rx in templates if m == method and rx.match(path)), f"{method} {path} (undocumented)")
        per_op[op] += 1
        status = e["response"]["status"]
        statuses[f"{status // 100}xx"] += 1
        ok_per_op[op] += 200 <= status < 300
        if status >= 500 or status == 0:
            server_errors.append((op, status, (e["request"].get("postData") or {}).get("text", "")[:300]))
    return {"requests": len(entries), "per_operation": dict(per_op),
            "2xx_per_operation": {k: v for k, v in ok_per_op.items() if "undocumented" not in k},
            "statuses": dict(statuses),
            "server_errors": server_errors}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="where the HAR report and the log go")
    args = ap.parse_args()
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="rmlx-st-"))
    out.mkdir(parents=True, exist_ok=True)
    proc, base = tiny_chat.serve(out)
    try:
        r = run(base, args.max_examples, out, args.seed)
    finally:
        tiny_chat.stop(proc)
    (out / "st.log").write_text(r.stdout + r.stderr)
    print(r.stdout[-6000:])
    s = summary(out / "run.har", json.loads(SPEC.read_text()))
    print(json.dumps(s, indent=1))
    print(f"schemathesis exit {r.returncode}; {s['requests']} requests; 5xx: {len(s['server_errors'])}; report in {out}")
    sys.exit(0 if r.returncode == 0 and not s["server_errors"] else 1)


if __name__ == "__main__":
    main()
