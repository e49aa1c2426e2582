"""Shards over HTTP from a loopback server that answers, errors, resets and stalls: each failure
is that shard's, bounded in time; a run whose shards keep failing ends in one line; SIGTERM ends
a run whose loader is stuck in a stalled read, after saving its last completed step."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from lit_restore.config.data import NetworkConfig
from lit_restore.data.shards import CorruptCounter, read_shard

REPO = Path(__file__).resolve().parent.parent


def tar_of_pngs(n: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with wds.TarWriter(buf) as sink:
        for i in range(n):
            ok, png = cv2.imencode(".png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            sink.write({"__key__": f"s{i:03d}", "gt.png": png.tobytes()})
    return buf.getvalue()


class Server:
    """`/good*.tar` a shard; `/missing*` 404; `/error*` 500; `/reset*` half a shard then a closed
    connection; `/stall*` half a shard then silence; `/flaky*` the shard on the first request,
    silence after. `hits` counts requests per path."""

    def __init__(self, shard: bytes) -> None:
        self.shard, self.hits, self.release = shard, Counter(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _head(self, status: int = 200) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(server.shard)) if status == 200 else "0")
                self.end_headers()

            def _stall(self) -> None:
                self._head()
                self.wfile.write(server.shard[: len(server.shard) // 2])
                self.wfile.flush()
                server.release.wait(600)

            def do_GET(self):
                name = self.path.lstrip("/")
                server.hits[name] += 1
                if name.startswith("good") or (name.startswith("flaky") and server.hits[name] == 1):
                    self._head()
                    self.wfile.write(server.shard)
                elif name.startswith("missing"):
                    self._head(404)
                elif name.startswith("error"):
                    self._head(500)
                elif name.startswith("reset"):
                    self._head()
                    self.wfile.write(server.shard[: len(server.shard) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self._stall()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server(tar_of_pngs(8))
    yield s
    s.close()


def read(url: str, net: NetworkConfig) -> tuple[int, CorruptCounter, float]:
    counter = CorruptCounter(1.0)
    start = time.monotonic()
    n = sum(1 for _ in read_shard(url, counter, net=net))
    return n, counter, time.monotonic() - start


def test_each_failure_is_the_shards_own_and_bounded(server, caplog):
    net = NetworkConfig(connect_timeout=2, stall_timeout=1, retries=2)
    n, counter, _ = read(f"{server.url}/good.tar", net)
    assert n == 8 and counter.corrupt == 0
    with caplog.at_level("WARNING"):
        n, counter, _ = read(f"{server.url}/missing.tar", net)
    assert n == 0 and counter.corrupt == 1 and server.hits["missing.tar"] == 1  # a 404 is not retried
    assert "HTTP 404" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        n, counter, took = read(f"{server.url}/error.tar", net)
    assert n == 0 and counter.corrupt == 1 and server.hits["error.tar"] == 3  # 1 + 2 retries, 1 s + 2 s apart
    assert "HTTP 500" in caplog.text and "3 tries" in caplog.text and 2.5 < took < 15
    caplog.clear()
    with caplog.at_level("WARNING"):
        n, counter, took = read(f"{server.url}/stall.tar", net)
    assert counter.corrupt == 1 and took < 10 and "data.network.stall_timeout" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        n, counter, took = read(f"{server.url}/reset.tar", net)
    assert counter.corrupt == 1 and took < 10 and "connection lost" in caplog.text
    with socket.socket() as s:  # a port where nothing listens: refused, retried, counted
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n, counter, took = read(f"http://127.0.0.1:{port}/x.tar", NetworkConfig(connect_timeout=1, stall_timeout=1, retries=1))
    assert counter.corrupt == 1 and took < 10


def fit_args(run: Path, train: str, sample_shards, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lit_restore.cli", "fit", str(REPO / "configs/tiny/restorer.yaml"), f"out_dir={run}",
            f"data.train={train}", f"data.val={sample_shards}/val-000000.tar", "data.batch_size=2", "data.crop=32",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "data.network.connect_timeout=2",
            "data.network.stall_timeout=2", "data.network.retries=1", *extra]


def test_fit_on_shards_that_keep_failing_exits_4_in_one_line(server, sample_shards, tmp_path):
    out = subprocess.run(fit_args(tmp_path / "run", f"{server.url}/missing-{{0..3}}.tar", sample_shards,
                                  "data.num_workers=1", "trainer.max_steps=4"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lit-restore: 10 shards in a row gave no sample; last: http://127.0.0.1:"), last
    assert "HTTP 404 Not Found" in last and "Traceback" not in out.stderr


def test_fit_goes_on_over_the_shards_that_fail(server, sample_shards, tmp_path):
    train = f"{server.url}/{{good-0,good-1,good-2,good-3,good-4,missing,error,reset}}.tar"
    out = subprocess.run(fit_args(tmp_path / "run", train, sample_shards, "data.num_workers=0", "trainer.max_steps=6",
                                  "data.max_corrupt_fraction=0.5", "data.shuffle_buffer=0"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_ends_a_run_whose_loader_is_stuck_after_saving_its_last_step(server, sample_shards, tmp_path, workers):
    """One shard of 8 samples (4 batches), then a server that stalls for good (stall timeout 10 min)."""
    run = tmp_path / "run"
    args = fit_args(run, f"{server.url}/flaky.tar", sample_shards, f"data.num_workers={workers}",
                    "trainer.max_steps=1000", "data.shuffle_buffer=0", "data.network.stall_timeout=600",
                    "checkpoint.every_n_steps=2", "checkpoint.signal_grace=3")
    log = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 180
        while server.hits["flaky.tar"] < 2 or not (run / "checkpoints" / "step0000002.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2)  # the loader is now waiting on the stalled shard
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        assert time.monotonic() - sent < 30
    finally:
        proc.kill()
        proc.wait()
    said = (tmp_path / "stderr.txt").read_text()
    assert "the data loader delivered nothing for 3 s after the signal" in said, said[-3000:]
    # The last completed step: at least the periodic checkpoint's; below 4 because the loader and
    # Lightning read ahead, so the shard's last batches wait for the stalled next shard.
    assert 2 <= torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] < 4
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
