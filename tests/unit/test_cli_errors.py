"""Every ``vllm-bidkv`` command turns bad input and broken servers into one line on stderr and a
non-zero exit. ``top`` is tested against real sockets on 127.0.0.1 (one refusing connections,
one answering bytes that are not HTTP, one closing mid-body), so ``fetch``'s error handling runs."""

from __future__ import annotations

import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from rich.console import Console

from tests.unit.test_top import METRICS
from vllm_bidkv import cli
from vllm_bidkv.top import fetch, run_top

pytestmark = pytest.mark.unit


def _read_request(conn: socket.socket) -> None:
    """Read the request's headers first: closing with unread bytes sends a reset, not the answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


@pytest.fixture
def tcp_server() -> Iterator[Callable[[bytes], str]]:
    """``start(answer)``: a server on 127.0.0.1 that reads each request, sends ``answer`` raw and
    closes the connection; returns its URL."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def serve(sock: socket.socket, answer: bytes) -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                _read_request(conn)
                conn.sendall(answer)

    def start(answer: bytes) -> str:
        sock = socket.create_server(("127.0.0.1", 0))
        sock.settimeout(0.1)
        socks.append(sock)
        threads.append(threading.Thread(target=serve, args=(sock, answer), daemon=True))
        threads[-1].start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
    for sock in socks:
        sock.close()


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A port bound but not listening: connections to it are refused (and no one else gets it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


NOT_HTTP = b"SSH-2.0-OpenSSH_9.6\r\n"
CLOSES_MID_BODY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4000\r\n\r\n# TYPE vllm:"


@pytest.fixture
def broken_servers(tcp_server: Callable[[bytes], str], refusing_url: str) -> dict[str, str]:
    return {"down": refusing_url, "not HTTP": tcp_server(NOT_HTTP), "restarting": tcp_server(CLOSES_MID_BODY)}


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, list[float]]]:
    """A server answering METRICS; its URL and the times of the requests it answered."""
    body = METRICS.encode()
    hits: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@pytest.fixture
def metrics_url(metrics_server: tuple[str, list[float]]) -> str:
    return metrics_server[0]


def test_fetch_names_the_state_of_each_broken_server(broken_servers: dict[str, str]) -> None:
    for state, url in broken_servers.items():
        snapshot = fetch(url, timeout=5)
        assert snapshot.error is not None and snapshot.error.startswith(state), (state, snapshot.error)
    assert "SSH-2.0" in str(fetch(broken_servers["not HTTP"]).error)


def test_top_once_shows_each_state_and_fails_only_when_every_server_does(
    broken_servers: dict[str, str], metrics_url: str
) -> None:
    out = io.StringIO()
    console = Console(file=out, width=400, color_system=None)
    urls = list(broken_servers.values())
    assert run_top(urls, once=True, interval=0.01, console=console) == 1
    text = out.getvalue()
    assert all(f"error: {state}" in text for state in broken_servers), text
    assert run_top([*urls, metrics_url], once=True, interval=0.01, console=console) == 0


def test_live_top_keeps_running_past_broken_servers(broken_servers: dict[str, str]) -> None:
    console = Console(file=io.StringIO(), width=400, color_system=None)
    assert run_top(list(broken_servers.values()), interval=0.01, iterations=2, console=console) == 0


def test_cli_top_once_against_broken_servers_exits_1_without_a_traceback(
    broken_servers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["top", "--once", "--interval", "0.01"]
    for url in broken_servers.values():
        argv += ["--url", url]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("interval", ["inf", "nan", "0", "-1"])
def test_top_interval_must_be_finite_and_positive(
    interval: str, refusing_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["top", "--once", "--url", refusing_url, "--interval", interval]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--interval {float(interval)} is invalid; expected a finite number of seconds > 0" in err


def test_ctrl_c_in_top_exits_130_quietly(metrics_server: tuple[str, list[float]]) -> None:
    url, hits = metrics_server
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_bidkv.cli", "top", "--url", url, "--interval", "0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A Ctrl-C as a terminal sends it: a shell's background job inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while len(hits) < 3:  # in its sampling loop: imports and the first samples done
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("bench", "sim", "--runs", "-1"), "argument --runs: -1 is not >= 1"),
        (("bench", "sim", "--runs", "0"), "argument --runs: 0 is not >= 1"),
        (("bench", "engine", "--num-requests", "0"), "argument --num-requests: 0 is not >= 1"),
        (("bench", "sim", "--rates", "2,0"), "argument --rates: '0' is not a finite number > 0"),
        (("bench", "sim", "--rates", "inf"), "argument --rates: 'inf' is not a finite number > 0"),
        (("bench", "calibrate", "--seeds", "0"), "argument --seeds: 0 is not >= 1"),
        (
            ("bench", "trace", "mixed", "--rate", "nan", "--num-requests", "4", "--out", "x"),
            "argument --rate: 'nan' is not a finite number > 0",
        ),
        (
            (
                "bench",
                "trace",
                "mixed",
                "--rate",
                "1",
                "--num-requests",
                "4",
                "--out",
                "x",
                "--length-scale",
                "0",
            ),
            "argument --length-scale: '0' is not a finite number > 0",
        ),
        (("bench", "soak", "--gpu-blocks", "0"), "argument --gpu-blocks: 0 is not >= 1"),
        (("bench", "soak", "--gpu-blocks", "-3"), "argument --gpu-blocks: -3 is not >= 1"),
        (
            ("bench", "soak", "--cpu-bytes", "lots"),
            "argument --cpu-bytes: 'lots' is invalid; expected a whole number of bytes, or a number with a unit",
        ),
        (
            ("bench", "engine", "--cpu-bytes", "1PiB"),
            "argument --cpu-bytes: '1PiB' is invalid; expected a whole number of bytes",
        ),
        (("top", "--url", "http://h:1", "--interval", "soon"), "argument --interval: invalid float value"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bench_engine_cpu_bytes_takes_units() -> None:
    from vllm_bidkv_bench.cli import matrix_from_args

    from tests.unit.test_bench_engine_args import parse

    assert matrix_from_args(parse("--cpu-bytes", "512MiB")).preset.cpu_bytes == 512 * 2**20


def test_config_lists_ignored_variables_and_the_hook(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in os.environ:
        if name.startswith(("BIDKV_", "VLLM_BIDKV_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BIDKV_STRATEGY", "bidkv")  # the bidkv package on PyPI's: ignored
    monkeypatch.setenv("BIDKV_VICTIM_POLICY", "random")  # ours: used
    assert cli.main(["config"]) == 0
    captured = capsys.readouterr()
    assert '"victim_policy": "random"' in captured.out
    assert "ignored BIDKV_* variables (unknown names): BIDKV_STRATEGY\n" in captured.err
    assert "fault-injection test hook: off" in captured.err
