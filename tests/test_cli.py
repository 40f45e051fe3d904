"""The zfabric command, run as users run it: real subprocesses talking over real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import zfabric
from zfabric.cli import app
from zfabric.patterns.forwarder import ForwarderProcess

from .conftest import ROOT, Processes

runner = CliRunner()
COMMANDS = ["demo", "forwarder", "pub", "sub", "push", "pull", "request", "echo", "scatter"]


def run_zfabric(*args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zfabric", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, input=input)


def test_demo_runs_every_pattern_and_exits_zero() -> None:
    done = run_zfabric("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "queue ok, reliable queue ok, pub/sub ok, request-reply ok, scatter-gather ok" in done.stdout


def test_two_demos_at_once_do_not_collide() -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "zfabric", "demo"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    try:
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, out + err


def test_pub_and_sub_through_a_forwarder_process(processes: Processes) -> None:
    with ForwarderProcess() as fwd:
        sub = processes.zfabric("sub", "sales.", "-e", fwd.xpub_endpoint, "--count", "2", "--timeout", "20")
        processes.wait_line(sub, "subscribed to", stream="stderr")
        pub = run_zfabric("pub", "sales.eu", "-e", fwd.xsub_endpoint, input='{"order": 1}\n{"order": 2}\n')
        assert pub.returncode == 0, pub.stderr
        assert "published 2 message(s)" in pub.stderr
        out, err = sub.communicate(timeout=20)
        assert sub.returncode == 0, err
        assert out.splitlines() == ['sales.eu {"order": 1}', 'sales.eu {"order": 2}']
        fwd.stop()
        assert "messages_in=2" in "".join(fwd.output)


def test_push_and_pull(processes: Processes) -> None:
    pull = processes.zfabric("pull", "-e", "tcp://127.0.0.1:0", "--count", "3", "--timeout", "20")
    endpoint = processes.wait_line(pull, r"pulling from (\S+)", stream="stderr").group(1)
    push = run_zfabric("push", "-e", endpoint, input='{"job": 1}\n\n[2, 3]\n"four"\n')
    assert push.returncode == 0, push.stderr
    out, err = pull.communicate(timeout=20)
    assert pull.returncode == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [{"job": 1}, [2, 3], "four"]


def test_request_against_echo_and_the_timeout_exit_code(processes: Processes) -> None:
    echo = processes.zfabric("echo", "-e", "tcp://127.0.0.1:0")
    endpoint = processes.wait_line(echo, r"endpoint=(\S+)").group(1)
    done = run_zfabric("request", endpoint, '{"sku": "A-1"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sku": "A-1"}
    echo.send_signal(signal.SIGTERM)
    assert echo.wait(5) == 0
    late = run_zfabric("request", endpoint, "1", "--timeout", "0.2", "--retries", "1")
    assert late.returncode == 3
    assert "timeout" in late.stderr and "after 2 attempt(s)" in late.stderr


def test_scatter_command(processes: Processes) -> None:
    echoes = [processes.zfabric("echo", "-e", "tcp://127.0.0.1:0") for _ in range(2)]
    eps = [processes.wait_line(p, r"endpoint=(\S+)").group(1) for p in echoes]
    done = run_zfabric("scatter", '{"q": 1}', "--member", f"a={eps[0]}", "--member", f"b={eps[1]}", "--deadline", "5")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert sorted(result["answered"]) == ["a", "b"] and result["replies"]["a"] == {"q": 1} and result["missing"] == {}


def test_forwarder_stops_cleanly_on_sigterm_and_reports_counters_on_sigusr1() -> None:
    fwd = ForwarderProcess().start()
    try:
        fwd.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        deadline = time.monotonic() + 5
        while not any("counters" in line for line in fwd.output) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any("counters" in line for line in fwd.output)
        start = time.monotonic()
        assert fwd.stop() == 0
        assert time.monotonic() - start < 1.0
    finally:
        fwd.kill()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"zfabric {zfabric.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Example" in result.output


def test_bad_json_payload_is_refused_with_a_clear_message() -> None:
    result = runner.invoke(app, ["push", "{not json", "-e", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "payload is not valid JSON" in result.output and "--text" in result.output


def test_bad_endpoint_names_the_endpoint() -> None:
    result = runner.invoke(app, ["pull", "-e", "tpc://nowhere"])
    assert result.exit_code == 1
    assert re.search(r"endpoint 'tpc://nowhere': expected one of tcp://", result.output)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited peak is a Linux behaviour")
def test_a_bench_actor_reports_its_own_peak_memory_not_its_parents() -> None:
    """Linux carries a parent's peak RSS (ru_maxrss) over fork and exec: every actor of the memory row reported
    the bench process's own peak. Here the parent holds 200 MiB; the child must report its own few dozen."""
    held = bytearray(200 << 20)
    held[::4096] = b"\x01" * len(held[::4096])  # touched, so resident
    done = subprocess.run([sys.executable, "-c", "from zfabric.bench.actors import rss_mb; print(rss_mb())"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 120, f"the child reported {done.stdout.strip()} MiB: its parent's peak"
    del held


def test_bench_quick_completes_and_prints_every_row(tmp_path: Path) -> None:
    """A smoke run of the benchmark: it finishes and reports every figure. Never a timing assertion."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "zfabric", "bench", "--quick", "-o", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    figures = [r["figure"] for r in rows]
    for expected in ("queue msgs/s, 100 B", "queue msgs/s, 100 B, tcp, asyncio faces", "queue msgs/s, 4 KiB",
                     "queue msgs/s, 4 KiB, tcp, vs raw msgpack-encoding the body", "queue msgs/s, 256 KiB",
                     "request-reply p50", "request-reply req/s, 100 in flight (request_many",
                     "request-reply req/s, 100 in flight, one request per message", "scatter-gather p50, 3 members",
                     "scatter-gather p99, 10 members",
                     "pub/sub msgs/s per subscriber, 100 B, 1 sub", "pub/sub msgs/s per subscriber, 100 B, 3 sub",
                     "reliable confirmed msgs/s", "reliable processed msgs/s", "peak RSS"):
        assert any(f.startswith(expected) for f in figures), f"no row {expected!r} in {figures}"
        assert expected in done.stdout
    assert all(r["zf"] is not None or r["note"] for r in rows)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["raw-msgpack", "zf-codec"])
def test_the_extra_queue_actors_of_the_benchmark_deliver_every_message(impl: str) -> None:
    """`raw-msgpack` (the 4 KiB row against raw as issue 5 words it) and `zf-codec` (benchmarks/codec_ceiling.py):
    the consumer ends only once it has received every message; one it cannot decode ends it with an error."""
    from zfabric.bench.suite import queue_rate

    rate, peak_mb = queue_rate(impl, 2_000, 4096)
    assert rate > 0 and peak_mb > 0


def test_the_cli_imports_a_commands_library_parts_only_when_that_command_runs() -> None:
    """Loading the CLI (what `zfabric --help` and the start of every command pay) imports no pattern, no topology
    loader or YAML, no sidecar service or client and no ZeroMQ: it took 0.7 s when it imported everything."""
    heavy = ("zfabric.patterns", "zfabric.topology", "zfabric.bench", "zfabric.sidecar.service", "zfabric.sidecar.client",
             "yaml", "zmq")
    code = f"import sys, zfabric.cli; print(sorted(m for m in sys.modules if m.startswith({heavy!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
