"""
Smoke test of the benchmark harness (`python -m bench`): its quick mode, at tiny sizes, for
workloads 1 (throughput) and 3 (catch-up) against this server only (no node needed), and the
BENCH line carries sane numbers.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_throughput_and_catchup_against_ours():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "throughput,catchup",
            "--targets",
            "ours",
            "--users",
            "1",
            "--workers",
            "1",
            "--tp-tabs",
            "4",
            "--tp-messages",
            "40",
            "--tp-seconds",
            "20",
            "--drain-seconds",
            "20",
            "--catchup-messages",
            "50",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    assert len(lines) == 1, done.stdout
    assert "1 throughput (4 tabs)" in done.stdout
    report = json.loads(lines[0][len("BENCH ") :])
    assert report["machine"]["cores"] >= 1

    tp = report["results"]["throughput"]["ours"]
    assert tp["messages_stored"] == 40
    assert tp["send_errors"] == 0
    assert tp["deliveries"] == tp["deliveries_expected"] == 40 * 4
    assert tp["messages_not_at_every_tab"] == 0
    assert tp["unacked_left"] == 0
    assert tp["stored_per_s"] > 0 and tp["deliveries_per_s"] > 0
    latency = tp["latency_ms"]
    assert latency["n"] == 40
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] < 20_000
    assert tp["server"]["server_cpu_s"] > 0
    assert tp["server_tracebacks"] == 0

    cu = report["results"]["catchup"]["ours"]
    assert cu["messages"] == cu["planned"] == 50
    for path in ("reconnect", "replay"):
        assert cu[path]["received"] == 50
        assert 0 < cu[path]["seconds"] < 30
    assert cu["server_tracebacks"] == 0
