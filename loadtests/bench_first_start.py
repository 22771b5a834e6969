"""First start: seconds from launching ``sparkserve serve`` to ``/ready`` with an empty cache (issue 22).

An empty ``XDG_CACHE_HOME`` makes the server measure its CPU plan and SPS(B, R) profile as a new user's
first start does. The JSON names the CPU (model and flags) and the machine's load average before the run
(a shared machine's timings are noisy: say so).

    python -m sparkserve.loadtests.bench_first_start --sparkserve .venv/bin/sparkserve --label after \
        --out bench_results/first_start.json -- --port 8123
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from sparkserve.loadtests.bench.client import launch_servers, stop_servers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparkserve", default="sparkserve", help="the sparkserve executable to start")
    parser.add_argument("--label", required=True, help="name of this run in the JSON (before / after)")
    parser.add_argument("--out", required=True, help="JSON file; runs are merged in under their label")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("serve_args", nargs="*", help="extra `sparkserve serve` flags (after --)")
    ns = parser.parse_args(argv)
    from sparkserve.engine.cpu_plan import cpu_signature

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        (server,) = launch_servers([("first-start", shlex.join(ns.serve_args))], ns.timeout_s, ports=[ns.port],
                                   program=[ns.sparkserve], env={"XDG_CACHE_HOME": cache, "PYTHONDONTWRITEBYTECODE": "1"})
        seconds = time.perf_counter() - start
        stop_servers([server])
    cmd = [str(a) for a in server.proc.args]
    shutil.move(server.log_path, Path(ns.out).with_suffix(f".{ns.label}.log"))
    sig = cpu_signature()
    out = Path(ns.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("cpu", {"model": sig.model, "flags": list(sig.flags), "capability": sig.capability,
                            "cores": os.cpu_count()})
    data.setdefault("runs", {})[ns.label] = {"seconds_to_ready": round(seconds, 1), "command": " ".join(cmd),
                                             "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                                             "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(json.dumps(data["runs"][ns.label]))


if __name__ == "__main__":
    main()
