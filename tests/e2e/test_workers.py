"""`python -m app --workers 2`: one port, two worker processes, one service."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_process import free_port
from tests.serving_helpers import jpeg

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
AUTH = {"x-api-key": KEY}
FRESH = 20  # requests on fresh connections: all on one of two workers has odds 2 ** -19


def children(pid: int) -> set[int]:
    """Process ids of the worker processes `pid` has spawned."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            with_args = (entry / "cmdline").read_bytes()
            if b"spawn_main" in with_args:  # not multiprocessing's resource tracker
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_server(folder: Path, log_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--workers", "2", "--checkpoint-dir", str(folder),
         "--default-model", "colors", "--port", str(port), "--device", "cpu",
         "--max-batch-size", "8", "--max-images-per-request", "16", "--max-queue", "128",
         "--log-format", "json", "--shutdown-timeout", "10", "--api-key", KEY,
         "--torch-threads", "1", "--decode-workers", "1", *extra],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, log_path)
    return proc, url


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 120) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"server not ready:\n{log_path.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def predict(url: str, *, headers: dict[str, str] = AUTH, timeout: float = 30
            ) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": ("r.jpg", jpeg("red"), "image/jpeg")},
                      headers=headers, timeout=timeout)


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))).strip(",") == want:
            return float(match.group(2))
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


@pytest.fixture(scope="module")
def cluster(checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A two-worker server on its own checkpoint folder (which the tests change)."""
    folder = tmp_path_factory.mktemp("cluster") / "ckpts"
    folder.mkdir()
    shutil.copytree(checkpoint_root / "colors", folder / "colors")
    log_path = folder.parent / "server.log"
    proc, url = start_server(folder, log_path, "--worker-timeout", "3")
    yield proc, url, folder, log_path
    stop(proc)


def test_both_workers_serve_one_consistent_service(cluster) -> None:
    proc, url, _, _ = cluster
    assert len(children(proc.pid)) == 2
    answers = [predict(url) for _ in range(FRESH)]
    assert [r.status_code for r in answers] == [200] * FRESH
    assert all(r.headers["x-request-id"] for r in answers)
    assert predict(url, headers={}).status_code == 401  # auth is the same in every worker
    refused = httpx.post(f"{url}/predict", content=b"not an image",
                         headers={**AUTH, "content-type": "image/jpeg"})
    assert refused.status_code == 400 and "detail" in refused.json()
    scrapes = [httpx.get(f"{url}/metrics", headers=AUTH).text for _ in range(4)]
    for text in scrapes:  # whichever worker answers, it counts every worker's requests
        assert metric(text, "resnet_serve_requests_total", route="/predict", method="POST",
                      status="200") == FRESH
        assert metric(text, "resnet_serve_images_total", model="colors") == FRESH
        assert metric(text, "resnet_serve_workers_ready") == 2
        assert metric(text, "resnet_serve_models_loaded") == 1


def test_reload_reaches_every_worker_before_it_answers(cluster, checkpoint_root) -> None:
    _, url, folder, _ = cluster
    shutil.copytree(checkpoint_root / "tags", folder / "tags")
    answer = httpx.post(f"{url}/models/reload", headers=AUTH, timeout=60)
    assert answer.status_code == 200 and answer.json()["loaded"] == ["tags"]
    statuses = [httpx.get(f"{url}/models/tags", headers=AUTH).status_code
                for _ in range(FRESH)]
    assert statuses == [200] * FRESH


def test_sighup_reaches_every_worker(cluster) -> None:
    proc, url, folder, _ = cluster
    shutil.rmtree(folder / "tags")
    proc.send_signal(signal.SIGHUP)
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        statuses = {httpx.get(f"{url}/models/tags", headers=AUTH).status_code
                    for _ in range(FRESH)}
        if statuses == {404}:
            break
        time.sleep(0.3)
    assert statuses == {404}
    assert proc.poll() is None


def test_reloads_under_load_fail_no_request(cluster) -> None:
    _, url, folder, _ = cluster
    statuses: Counter[int] = Counter()
    done = threading.Event()

    def load() -> None:
        with httpx.Client(headers=AUTH, timeout=30) as client:
            while not done.is_set():
                response = client.post(f"{url}/predict", files={
                    "file": ("r.jpg", jpeg("red"), "image/jpeg")})
                statuses[response.status_code] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2):  # a new version of `colors` each time (the weights' mtime moves)
            weights = folder / "colors" / "model.safetensors"
            os.utime(weights, ns=(time.time_ns(), time.time_ns()))
            answer = httpx.post(f"{url}/models/reload", headers=AUTH, timeout=60)
            assert answer.json()["loaded"] == ["colors"]
            time.sleep(0.5)
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert set(statuses) == {200} and statuses[200] > 10


def metrics_folder(worker: int) -> Path:
    """The multiprocess metrics folder the supervisor handed worker `worker`."""
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    found = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(found[0].decode())


def requests_counted(url: str) -> float:
    """Every /predict answered 200 so far, by any worker that has run."""
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return metric(text, "resnet_serve_requests_total", route="/predict", method="POST",
                  status="200")


def test_a_crashed_worker_is_replaced(cluster) -> None:
    proc, url, _, log_path = cluster
    before = children(proc.pid)
    victim = min(before)
    folder = metrics_folder(victim)
    assert predict(url).status_code == 200
    counted = requests_counted(url)
    os.kill(victim, signal.SIGKILL)
    outcomes = Counter()
    for _ in range(FRESH):  # the other worker keeps answering; nothing hangs
        try:
            outcomes[predict(url, timeout=10).status_code] += 1
        except httpx.TransportError:
            outcomes["closed"] += 1
    assert outcomes[200] >= FRESH // 2
    wait_ready(proc, url, log_path, timeout=60)
    after = children(proc.pid)
    assert len(after) == 2 and victim not in after
    assert "exited with status -9" in log_path.read_text()
    # its files were folded into the archives: none left behind, none of its counts lost
    assert not list(folder.glob(f"*_{victim}.db"))
    assert requests_counted(url) >= counted + outcomes[200]


def _ready_on_fresh_connections(url: str, count: int) -> list[int]:
    """GET /ready on `count` new connections at once; the statuses of those answered
    within a second (a stopped worker's share hangs)."""
    statuses: list[int] = []

    def probe() -> None:
        with contextlib.suppress(httpx.TransportError):
            statuses.append(httpx.get(f"{url}/ready", timeout=1).status_code)

    threads = [threading.Thread(target=probe) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    return statuses


def test_a_stopped_worker_makes_the_server_not_ready_before_it_is_replaced(cluster) -> None:
    proc, url, _, log_path = cluster
    victim = min(children(proc.pid))
    os.kill(victim, signal.SIGSTOP)  # the port still hands it half the new connections
    try:
        time.sleep(1.5)  # past the heartbeat limit (1 s at --worker-timeout 3), not the 3 s
        answered = _ready_on_fresh_connections(url, 8)
    finally:
        os.kill(victim, signal.SIGCONT)
    assert answered and set(answered) == {503}, answered
    wait_ready(proc, url, log_path, timeout=60)  # resumed, or replaced if it was too late


def test_a_stalled_worker_is_replaced(cluster) -> None:
    proc, url, _, log_path = cluster
    victim = min(children(proc.pid))
    os.kill(victim, signal.SIGSTOP)
    give_up = time.monotonic() + 30
    while victim in children(proc.pid) and time.monotonic() < give_up:
        time.sleep(0.2)
    assert victim not in children(proc.pid)
    wait_ready(proc, url, log_path, timeout=60)
    assert "has not ticked" in log_path.read_text()
    assert predict(url).status_code == 200


def test_sigterm_drains_every_worker_and_exits_0(checkpoint_root, tmp_path) -> None:
    folder = tmp_path / "ckpts"
    shutil.copytree(checkpoint_root / "colors", folder / "colors")
    proc, url = start_server(folder, tmp_path / "server.log")
    workers = children(proc.pid)
    results: list[int] = []
    body = [("file", (f"{i}.jpg", jpeg("red", seed=i), "image/jpeg")) for i in range(16)]

    def in_flight() -> None:
        results.append(httpx.post(f"{url}/predict", files=body, headers=AUTH,
                                  timeout=30).status_code)

    threads = [threading.Thread(target=in_flight) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    try:
        assert proc.wait(40) == 0
    finally:
        stop(proc)
    assert results and set(results) <= {200, 503}, results  # 503: arrived after the stop
    assert results.count(200) >= 1
    assert not any(alive(pid) for pid in workers)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_workers_that_cannot_start_stop_the_server(checkpoint_root, tmp_path) -> None:
    log_path = tmp_path / "server.log"
    proc = subprocess.run(
        [sys.executable, "-m", "app", "--workers", "2", "--checkpoint-dir",
         str(checkpoint_root), "--port", str(free_port()), "--device", "cuda"],
        cwd=ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT, timeout=180)
    assert proc.returncode == 1
    assert "exited before serving" in log_path.read_text()


def test_a_port_in_use_is_reported(checkpoint_root, tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "app", "--workers", "2", "--checkpoint-dir",
             str(checkpoint_root), "--port", str(port), "--device", "cpu"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_any_free_port_and_no_orphans_when_the_supervisor_is_killed(checkpoint_root,
                                                                     tmp_path) -> None:
    folder = tmp_path / "ckpts"
    shutil.copytree(checkpoint_root / "colors", folder / "colors")
    log_path = tmp_path / "server.log"
    temp = tmp_path / "tmp"  # where the supervisor makes its metrics folder
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--workers", "2", "--checkpoint-dir", str(folder),
         "--port", "0", "--device", "cpu", "--torch-threads", "1", "--decode-workers", "1",
         "--shutdown-timeout", "5"],
        cwd=ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        give_up = time.monotonic() + 60
        while not (found := re.search(r"workers on http://127\.0\.0\.1:(\d+)",
                                      log_path.read_text())):
            assert time.monotonic() < give_up and proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        url = f"http://127.0.0.1:{found.group(1)}"
        wait_ready(proc, url, log_path)
        workers = children(proc.pid)
        answer = predict(url, headers={})
        assert len(workers) == 2, workers
        assert answer.status_code == 200, (answer.text, log_path.read_text()[-3000:])
        proc.kill()  # SIGKILL: the supervisor cannot pass anything on
        proc.wait(10)
        give_up = time.monotonic() + 30
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < give_up, "workers outlived their supervisor"
            time.sleep(0.2)
        left = list(temp.glob("resnet-serve-metrics-*"))
        assert len(left) == 1  # nobody was left to remove it
        with socket.socket() as taken:  # the next supervisor cleans up, then finds no port
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            again = subprocess.run(
                [sys.executable, "-m", "app", "--workers", "2", "--checkpoint-dir",
                 str(folder), "--port", str(taken.getsockname()[1]), "--device", "cpu"],
                cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert again.returncode == 1, again.stderr
        assert not left[0].exists(), again.stderr
    finally:
        stop(proc)
