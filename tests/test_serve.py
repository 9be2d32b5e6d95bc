"""imedsam-serve: a real Triton server (PyTriton) on 127.0.0.1, talked to with tritonclient over HTTP and gRPC.
Masks must equal the in-process runtime's (what imedsam-infer runs) on real Kvasir images; bad requests are
refused without taking a model down; a load of concurrent clients loses nothing; a stop with requests in
flight, or a tritonserver that dies, leaves no process, no shared memory and nothing of Triton's in /tmp behind."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

# These tests need the serve extra, whose PyTriton pins numpy < 2 while the training extra takes numpy 2:
# scripts/test.sh runs them in an environment of their own (.venv-serve), and fails if they cannot run.
import pytriton  # noqa: E402, F401
import tritonclient.grpc  # noqa: E402, F401

from imedsam_core.paths import shipped_artifact  # noqa: E402
from imedsam_deploy.backends import open_backend  # noqa: E402
from imedsam_deploy.client import ServeClient, ServeError  # noqa: E402
from imedsam_deploy.manifest import load_artifact  # noqa: E402
from imedsam_deploy.runtime import Segmenter  # noqa: E402
from imedsam_deploy.serve import (  # noqa: E402
    DECODE,
    ENCODE,
    SEGMENT,
    EmbeddingCache,
    RequestError,
    ServeLimits,
    Server,
    ServerConfig,
    Service,
    _Entry,
)
from imedsam_deploy.triton_leftovers import STUB, _argv, descendants, shm_mapped  # noqa: E402

from .conftest import SAMPLE_DATA, child_env, read_mask  # noqa: E402

MODELS = (SEGMENT, ENCODE, DECODE)
# room for every load-test client's handle at once (8), small enough to evict cheaply
LIMITS = ServeLimits(max_boxes=4, cache_size=10, ttl_s=600.0)
READY_S = 90  # a cold start on 2 busy cores: three Python backend stubs


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_ready(http_port: int, timeout_s: float = READY_S, proc: subprocess.Popen | None = None) -> None:
    import tritonclient.http as hc

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc is None or proc.poll() is None, "imedsam-serve exited during start-up"
        try:
            c = hc.InferenceServerClient(f"127.0.0.1:{http_port}", connection_timeout=2, network_timeout=2)
            try:
                if all(c.is_model_ready(m) for m in MODELS):
                    return
            finally:
                c.close()
        except Exception:
            pass
        time.sleep(0.25)
    pytest.fail(f"server on port {http_port} not ready within {timeout_s} s")


def samples(n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB image, its ground-truth box and a second box) for n real Kvasir-Sessile images."""
    from imedsam_deploy.video import read_image

    out = []
    for img in sorted((SAMPLE_DATA / "images").iterdir())[:n]:
        rgb = read_image(img)
        ys, xs = np.nonzero(read_mask(SAMPLE_DATA / "masks" / f"{img.stem}.png"))
        h, w = rgb.shape[:2]
        gt = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        out.append((rgb, np.array([gt, [w * 0.1, h * 0.2, w * 0.6, h * 0.9]], np.float32)))
    return out


@pytest.fixture(scope="module")
def artifact() -> Path:
    """The shipped model's artifact: a real trained model, and no torch needed to make it."""
    art = shipped_artifact()
    assert art is not None, "the shipped artifact is missing from this install"
    return art


@pytest.fixture(scope="module")
def reference(artifact):
    """The runtime in process, as imedsam-infer runs it."""
    art = load_artifact(artifact)
    be, _ = open_backend("ort-cpu", art)
    with be:
        yield Segmenter(be, art)


@pytest.fixture(scope="module")
def server(artifact):
    """(Service, http port, grpc port, metrics port): a real server, stopped whatever happens."""
    art = load_artifact(artifact)
    be, _ = open_backend("ort-cpu", art)
    http, grpc, metrics = free_ports(3)
    svc = Service(Segmenter(be, art), LIMITS)
    srv = Server(svc, ServerConfig(http_port=http, grpc_port=grpc, metrics_port=metrics))
    try:
        srv.start()
        wait_ready(http)
        yield svc, http, grpc, metrics
    finally:
        srv.stop()
        be.close()


def client(server, protocol: str) -> ServeClient:
    _, http, grpc, _ = server
    return ServeClient(f"127.0.0.1:{http if protocol == 'http' else grpc}", protocol, timeout_s=60)  # type: ignore[arg-type]


def expected(reference: Segmenter, rgb: np.ndarray, boxes: np.ndarray, out_hw=None):
    res = reference.segment(rgb, boxes.astype(np.float64), out_hw)
    return np.stack([o.mask() for o in res.objects]).astype(np.uint8), np.array(
        [o.mean_probability for o in res.objects], np.float32)


def test_health_ready_metrics(server):
    import tritonclient.grpc as gc
    import tritonclient.http as hc

    _, http, grpc, metrics = server
    for c in (hc.InferenceServerClient(f"127.0.0.1:{http}"), gc.InferenceServerClient(f"127.0.0.1:{grpc}")):
        try:
            assert c.is_server_live() and c.is_server_ready()
            assert all(c.is_model_ready(m) for m in MODELS)
        finally:
            c.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
        assert b"nv_inference_request_success" in r.read()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_segment_and_encode_decode_equal_in_process(server, reference, protocol):
    with client(server, protocol) as c:
        for rgb, boxes in samples():
            for out_hw in (None, (97, 131)):
                want, prob = expected(reference, rgb, boxes, out_hw)
                got = c.segment(rgb, boxes, out_hw)
                assert got.masks.dtype == np.uint8 and got.masks.shape == want.shape
                assert np.array_equal(got.masks, want)
                np.testing.assert_array_equal(got.mean_probability, prob)
                assert all(s in ("ok", "empty", "low-confidence") for s in got.status)
            handle = c.encode(rgb)
            for k in range(len(boxes)):  # one embedding, several prompts
                want, prob = expected(reference, rgb, boxes[k : k + 1])
                got = c.decode(handle, boxes[k : k + 1])
                assert np.array_equal(got.masks, want)
                np.testing.assert_array_equal(got.mean_probability, prob)


def _bad_requests(c: ServeClient, rgb: np.ndarray) -> list[tuple[str, object, str]]:
    """(what, a call that must be refused, a word the reason must contain)."""
    tc = c.tc  # tritonclient.http or tritonclient.grpc
    h, w = rgb.shape[:2]
    good = np.array([[10, 10, 60, 60]], np.float32)

    def raw(model: str, **arrays: tuple[np.ndarray, str]):
        def call():
            ins = []
            for name, (a, dt) in arrays.items():
                ins.append(tc.InferInput(name, list(a.shape), dt))
                ins[-1].set_data_from_numpy(a)
            try:
                c.client.infer(model, ins)
            except tc.InferenceServerException as e:
                raise ServeError(str(e)) from None
        return call

    return [
        ("float image", raw(SEGMENT, image=(rgb.astype(np.float32), "FP32"), boxes=(good, "FP32")), "data-type"),
        ("grey image", raw(SEGMENT, image=(rgb[..., 0].copy(), "UINT8"), boxes=(good, "FP32")), "shape"),
        ("boxes (K, 5)", raw(SEGMENT, image=(rgb, "UINT8"), boxes=(np.zeros((1, 5), np.float32), "FP32")), "shape"),
        ("float64 boxes", raw(SEGMENT, image=(rgb, "UINT8"), boxes=(good.astype(np.float64), "FP64")), "data-type"),
        ("empty image, raw", raw(SEGMENT, image=(np.zeros((0, 5, 3), np.uint8), "UINT8"), boxes=(good, "FP32")), ""),
        ("empty encode, raw", raw(ENCODE, image=(np.zeros((1, 4, 0, 3), np.uint8), "UINT8")), ""),
        ("empty image", lambda: c.segment(np.zeros((0, 4, 3), np.uint8), good), "empty"),
        ("box outside", lambda: c.segment(rgb, [[10, 10, w + 5, 50]]), "outside"),
        ("inverted box", lambda: c.segment(rgb, [[50, 10, 10, 50]]), "area"),
        ("NaN box", lambda: c.segment(rgb, [[np.nan, 10, 20, 50]]), "finite"),
        ("too many boxes", lambda: c.segment(rgb, np.repeat(good, LIMITS.max_boxes + 1, 0)), "at most"),
        ("oversized output", lambda: c.segment(rgb, good, (8192, 8192)), "exceed"),
        ("zero output", lambda: c.segment(rgb, good, (0, 10)), "positive"),
        ("unknown handle", lambda: c.decode("0" * 32, good), "unknown or expired"),
        ("box outside, decode", lambda: c.decode(c.encode(rgb), [[0, 0, w, h + 1]]), "outside"),
    ]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_refused_and_server_keeps_serving(server, reference, protocol):
    rgb, boxes = samples(1)[0]
    want, _ = expected(reference, rgb, boxes)
    with client(server, protocol) as c:
        for what, call, word in _bad_requests(c, rgb):
            with pytest.raises(ServeError) as err:
                call()  # type: ignore[operator]
            assert word.lower() in str(err.value).lower(), (what, str(err.value)[:300])
            assert np.array_equal(c.segment(rgb, boxes).masks, want), f"after {what}"


def test_evicted_handle_refused(server, reference):
    rgb, boxes = samples(1)[0]
    with client(server, "http") as c:
        first = c.encode(rgb)
        for _ in range(LIMITS.cache_size):  # the least recently used goes first
            c.encode(rgb)
        with pytest.raises(ServeError, match="unknown or expired"):
            c.decode(first, boxes)
        assert np.array_equal(c.decode(c.encode(rgb), boxes).masks, expected(reference, rgb, boxes)[0])


@pytest.mark.parametrize("stable", [True, False])
def test_tta_segment_and_encode_decode_equal_in_process(artifact, stable):
    """--tta: segment and decode give the in-process ``Segmenter(tta=True)``'s masks; encode keeps each image's
    pair of embeddings across calls of max_batch // 2 images. ``stable`` False is TensorRT's case (handles die at
    the next encode): the pair is encoded again from its kept pixels."""
    from imedsam_deploy.serve import OUT_MASKS, OUT_PROB

    art = load_artifact(artifact)
    be, _ = open_backend("ort-cpu", art)
    with be:
        ref, plain = Segmenter(be, art, tta=True), Segmenter(be, art)
        svc = Service(Segmenter(be, art, tta=True), LIMITS)
        svc._stable = stable
        images = samples(3)
        rgbs = [rgb for rgb, _ in images] + [np.ascontiguousarray(images[0][0][:, ::-1]), images[1][0][:, 7:].copy()]
        boxes = [b for _, b in images] + [images[0][1], images[1][1] - np.array([7, 0, 7, 0], np.float32)]
        want0, prob0 = expected(ref, rgbs[0], boxes[0])
        assert not np.array_equal(prob0, expected(plain, rgbs[0], boxes[0])[1])  # the average changes the output
        got = svc.segment(rgbs[0], boxes[0])
        assert np.array_equal(got[OUT_MASKS], want0) and np.array_equal(got[OUT_PROB], prob0)
        handles = svc.encode(rgbs)  # 5 images: two encoder calls of (up to) 4 image pairs with max_batch 8
        assert len(set(handles)) == 5
        for h, rgb, b in zip(handles, rgbs, boxes, strict=True):
            assert np.array_equal(svc.decode(np.array([h.encode()], np.object_), b)[OUT_MASKS], expected(ref, rgb, b)[0])


def test_cache_ttl_and_lru():
    now = [0.0]
    cache = EmbeddingCache(2, ttl_s=10.0, clock=lambda: now[0])
    a = cache.put(_Entry((4, 4), 1, None, now[0]))
    now[0] = 5.0
    b = cache.put(_Entry((4, 4), 2, None, now[0]))
    cache.get(a)  # used: a is now the most recent
    c = cache.put(_Entry((4, 4), 3, None, now[0]))  # evicts b
    with pytest.raises(RequestError, match="unknown or expired"):
        cache.get(b)
    assert cache.get(a).embeddings == 1 and cache.get(c).embeddings == 3
    now[0] = 16.0  # 11 s unused
    with pytest.raises(RequestError, match="unknown or expired"):
        cache.get(a)
    assert len(cache) == 0


def test_load_concurrent_clients(server, reference):
    """8 clients x 9 requests (segment, encode + decode, refused), at most 60 s: nothing lost, nothing wrong."""
    svc = server[0]
    pool = samples(3)
    want = [expected(reference, rgb, boxes)[0] for rgb, boxes in pool]
    want_one = [expected(reference, rgb, boxes[:1])[0] for rgb, boxes in pool]
    before = sum(b * n for b, n in svc.stats.encode_batches.items())
    outcomes: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def worker(i: int) -> None:
        with client(server, "grpc" if i % 2 else "http") as c:
            for j in range(9):
                if time.monotonic() > deadline:
                    break
                k = (i + j) % len(pool)
                rgb, boxes = pool[k]
                kind = ("segment", "encode", "bad")[j % 3]
                try:
                    if kind == "segment":
                        ok = np.array_equal(c.segment(rgb, boxes).masks, want[k])
                    elif kind == "encode":
                        ok = np.array_equal(c.decode(c.encode(rgb), boxes[:1]).masks, want_one[k])
                    else:
                        try:
                            c.segment(rgb, [[0, 0, rgb.shape[1] + 1, 10]])
                            ok = False
                        except ServeError as e:
                            ok = "outside" in str(e)
                    res = f"{kind}:{'ok' if ok else 'WRONG'}"
                except Exception as e:
                    res = f"{kind}:LOST {type(e).__name__}: {str(e)[:200]}"
                with lock:
                    outcomes.append(res)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)
    bad = [o for o in outcomes if not o.endswith(":ok")]
    assert not bad, bad
    assert len(outcomes) == 8 * 9, f"{len(outcomes)} of 72 answered in {time.monotonic() - t0:.0f} s"
    encoded = sum(b * n for b, n in svc.stats.encode_batches.items()) - before
    assert encoded == 8 * 3  # every encode went through the encoder exactly once
    print(f"load: 72 requests in {time.monotonic() - t0:.1f} s; {svc.stats.summary()}")


def test_simultaneous_encodes_are_batched(server, reference):
    """Encodes of one image size arriving together share encoder calls (Triton's dynamic batcher), and every
    handle still decodes to its own image's masks."""
    svc = server[0]
    rgb, boxes = samples(1)[0]
    want = expected(reference, rgb, boxes)[0]
    before = dict(svc.stats.encode_batches)
    barrier = threading.Barrier(8)
    wrong: list[str] = []
    errors: list[str] = []

    def worker(i: int) -> None:
        # 4 rounds of 8 simultaneous encodes, each decoded before the next round starts: at most 8 live handles,
        # which the server's LRU cache (10) holds; 32 at once would evict some before their decode
        try:
            with client(server, "grpc" if i % 2 else "http") as c:
                for _ in range(4):
                    barrier.wait(timeout=30)
                    h = c.encode(rgb)
                    if not np.array_equal(c.decode(h, boxes).masks, want):
                        wrong.append(h)
        except Exception as e:  # a thread's exception would not fail the test by itself
            errors.append(f"worker {i}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors and not wrong, (errors, wrong)
    formed = {b: n - before.get(b, 0) for b, n in svc.stats.encode_batches.items() if n > before.get(b, 0)}
    assert sum(b * n for b, n in formed.items()) == 32
    assert max(formed) > 1, f"no batch formed: {formed}"


def _triton_tmp() -> set[str]:
    """What Triton made in /tmp: its copies of the model directories and its Python backend's environment
    directories (named in Triton's sources; the server's own code finds them another way, from its stubs' command lines)."""
    return set(glob.glob("/tmp/folder??????")) | set(glob.glob("/tmp/python_env_??????"))


def test_clients_that_disconnect_mid_request_leave_nothing_behind(server, reference):
    """Clients that hang up mid-upload, right after sending a whole request, or with a gRPC call in flight: the
    server answers the next client correctly and keeps the same processes, and no shared memory is left."""
    import tritonclient.grpc as gc
    import tritonclient.http as hc

    svc, http, grpc, _ = server
    rgb, boxes = samples(1)[0]
    want = expected(reference, rgb, boxes)[0]
    with client(server, "http") as c:  # warm: every model instance and its buffers exist before the count
        assert np.array_equal(c.segment(rgb, boxes).masks, want)
        c.decode(c.encode(rgb), boxes)
    procs = sorted(descendants(os.getpid()))
    shm_before = set(os.listdir("/dev/shm"))

    inputs = [hc.InferInput("image", list(rgb.shape), "UINT8"), hc.InferInput("boxes", list(boxes.shape), "FP32")]
    inputs[0].set_data_from_numpy(np.ascontiguousarray(rgb))
    inputs[1].set_data_from_numpy(np.ascontiguousarray(boxes.astype(np.float32)))
    body, json_size = hc.InferenceServerClient.generate_request_body(inputs)
    head = (f"POST /v2/models/segment/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {json_size}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    for part in (len(body) // 2, len(body)):  # half the upload, then the whole request with no wait for the answer
        with socket.create_connection(("127.0.0.1", http), timeout=10) as sock:
            sock.sendall(head + body[:part])
    g = gc.InferenceServerClient(f"127.0.0.1:{grpc}")
    gi = [gc.InferInput("image", list(rgb.shape), "UINT8"), gc.InferInput("boxes", list(boxes.shape), "FP32")]
    gi[0].set_data_from_numpy(np.ascontiguousarray(rgb))
    gi[1].set_data_from_numpy(np.ascontiguousarray(boxes.astype(np.float32)))
    g.async_infer("segment", gi, callback=lambda result, error: None)
    g.close()  # the call still in flight

    time.sleep(2)  # what the server does with the orphaned requests happens now
    with client(server, "grpc") as c:
        assert np.array_equal(c.segment(rgb, boxes).masks, want)
    assert sorted(descendants(os.getpid())) == procs, "the server's processes changed"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(os.listdir("/dev/shm")) - shm_before:
        time.sleep(0.2)
    assert not set(os.listdir("/dev/shm")) - shm_before, "shared memory left behind"


def _alive(pids: list[int]) -> list[str]:
    """``pid state command`` of each process still running. A zombie has exited and holds nothing but its
    table entry; it lingers where the machine's init does not reap orphans (as in some containers)."""
    out = []
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state != "Z":
            out.append(f"{p} {state} {stat.split('(', 1)[1].rsplit(')', 1)[0]}")
    return out


def _named(pid: int, name: str) -> bool:
    """A running process whose program is ``name`` (from argv[0]: /proc's comm keeps 15 characters)."""
    argv = _argv(pid)  # empty once the process is gone
    return bool(argv) and Path(argv[0]).name == name and bool(_alive([pid]))


def _assert_nothing_left(tree: list[int], ws: Path, tmp_before: set[str]) -> None:
    """After the command: no process of its tree (orphaned stubs notice their parent is gone within a few
    seconds), no workspace and nothing new of Triton's in /tmp."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(tree):
        time.sleep(0.2)
    assert not _alive(tree), f"processes left behind: {_alive(tree)}"
    assert not (ws.exists() and any(ws.iterdir())), "workspace left behind"
    assert not _triton_tmp() - tmp_before, f"left behind in /tmp: {sorted(_triton_tmp() - tmp_before)}"


def _serve_command(artifact: Path, ws: Path, sigint_ignored: bool = False) -> tuple[subprocess.Popen, int]:
    """imedsam-serve in a subprocess (output piped, text): the process and its HTTP port. ``sigint_ignored``: as
    a shell starts a background job (the process keeps its pid: the shell execs it)."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "imedsam_deploy.cli_serve", str(artifact), "--backend", "ort-cpu",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--workspace", str(ws)]
    if sigint_ignored:
        cmd = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *cmd]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), http


def test_stop_with_requests_in_flight_leaves_nothing(artifact, tmp_path):
    """The real command in a subprocess, SIGTERM with 4 clients mid-request: it exits, and no tritonserver or
    Python backend stub process, no shared-memory segment of theirs, no model copy and no Python environment
    directory of Triton's in /tmp, is left. The clients hold their connections through Triton's exit timeout,
    so it exits without unloading the models: what it leaves, the server removes."""
    tmp_before = _triton_tmp()
    ws = tmp_path / "ws"
    proc, http = _serve_command(artifact, ws)
    tree: list[int] = []
    try:
        wait_ready(http, proc=proc)
        tree = descendants(proc.pid)
        cmdlines = []
        for p in tree:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmdlines.append(f.read().replace(b"\0", b" ").decode())
        assert any("tritonserver" in c for c in cmdlines) and any("python_backend_stub" in c for c in cmdlines)
        shm = shm_mapped([proc.pid, *tree])
        assert shm, "expected the server's shared-memory segments"
        made = _triton_tmp() - tmp_before
        assert len([d for d in made if "/folder" in d]) == len(MODELS), f"expected a model copy each: {made}"
        rgb, boxes = samples(1)[0]
        started = threading.Event()
        answered: list[str] = []

        def worker() -> None:
            try:
                with ServeClient(f"127.0.0.1:{http}", timeout_s=30) as c:
                    for _ in range(50):
                        started.set()
                        c.segment(rgb, boxes, (400, 400))
                        answered.append("ok")
            except Exception as e:
                answered.append(type(e).__name__)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        assert started.wait(30)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        for t in threads:
            t.join(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert "stopped; requests:" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _assert_nothing_left(tree, ws, tmp_before)
    assert not [n for n in shm if os.path.exists(f"/dev/shm/{n}")], "shared memory left behind"


def test_a_dead_tritonserver_ends_the_command_with_exit_1(artifact, tmp_path):
    """tritonserver killed under it: the command notices, stops, exits 1 (so a supervisor restarts it) and leaves
    no process, no workspace and nothing of Triton's in /tmp. The kill comes as soon as the models answer ready,
    which can still be inside PyTriton's own start-up."""
    tmp_before = _triton_tmp()
    ws = tmp_path / "ws"
    proc, http = _serve_command(artifact, ws)
    tree: list[int] = []
    try:
        wait_ready(http, proc=proc)
        tree = descendants(proc.pid)
        server = [p for p in tree if _named(p, "tritonserver")]
        assert len(server) == 1, tree
        os.kill(server[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 1, out[-3000:]
        assert re.search(r"died( during start-up)?; stopping", out) and "stopped; requests:" in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _assert_nothing_left(tree, ws, tmp_before)


@pytest.mark.parametrize("when, sigint_ignored", [("tritonserver", False), (STUB, False),
                                                   ("tritonserver", True)])
def test_a_tritonserver_dead_during_start_up_ends_the_command_at_once(artifact, tmp_path, when, sigint_ignored):
    """tritonserver killed while it starts, as soon as it runs or as soon as its first model's stub does
    (PyTriton then polls the dead server for a minute or two, holding the lock its own clean-up waits for): the
    command notices at once (also run as a background job, which ignores SIGINT), exits 1 and leaves nothing
    behind: the stubs exit by themselves before anything notes them, so their model copies in /tmp are found by
    the workspace their configs name."""
    tmp_before = _triton_tmp()
    ws = tmp_path / "ws"
    proc, _ = _serve_command(artifact, ws, sigint_ignored)
    tree: list[int] = []
    try:
        end = time.monotonic() + READY_S
        seen: list[int] = []
        while not seen and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.02)
            tree = descendants(proc.pid)
            seen = [p for p in tree if _named(p, when)]
        assert seen, f"no {when} process started"
        server = [p for p in tree if _named(p, "tritonserver")]
        assert len(server) == 1, tree
        os.kill(server[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=45)  # PyTriton's own start-up waits would hold it 60 s or more
        assert proc.returncode == 1, out[-3000:]
        assert "died during start-up; stopping" in out and "stopped; requests:" in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _assert_nothing_left(tree, ws, tmp_before)


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port"])
def test_a_port_in_use_is_refused_in_one_line(artifact, flag):
    """A port something else listens on: refused before the model loads, naming the option, in one line
    (tritonserver would exit on it with a log of its own)."""
    from typer.testing import CliRunner

    from imedsam_deploy.cli_serve import app

    from .reliability_helpers import assert_one_line_error

    ports = dict(zip(["--http-port", "--grpc-port", "--metrics-port"], free_ports(3), strict=True))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports[flag] = held.getsockname()[1]
        args = [str(artifact), *[a for k, v in ports.items() for a in (k, str(v))]]
        assert_one_line_error(CliRunner().invoke(app, args), f"{flag} {ports[flag]}", "in use")


def test_an_existing_workspace_is_refused_in_one_line(artifact, tmp_path):
    from typer.testing import CliRunner

    from imedsam_deploy.cli_serve import app

    from .reliability_helpers import assert_one_line_error

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "keep.txt").write_text("mine")
    http, grpc, metrics = free_ports(3)
    res = CliRunner().invoke(app, [str(artifact), "--http-port", str(http), "--grpc-port", str(grpc),
                                   "--metrics-port", str(metrics), "--workspace", str(ws)])
    assert_one_line_error(res, f"--workspace {ws}", "already exists")
    assert (ws / "keep.txt").read_text() == "mine"


def test_serve_is_torch_free():
    code = ("import sys; import imedsam_deploy.serve, imedsam_deploy.client, imedsam_deploy.cli_serve, "
            "pytriton.triton, tritonclient.grpc; assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("args, needle", [
    (["/nonexistent/art"], "does not exist"),
    (["--http-port", "9000", "--grpc-port", "9000"], "must differ"),
    (["--backend", "nope"], "--backend"),
    (["--http-port", "70000"], "--http-port"),
])
def test_cli_refusals(args, needle, tmp_path):
    from typer.testing import CliRunner

    from imedsam_deploy.cli_serve import app

    from .reliability_helpers import assert_one_line_error

    res = CliRunner().invoke(app, args if args[0].startswith("/") else [str(tmp_path / "missing"), *args])
    assert_one_line_error(res, needle)


def test_cli_tta_refuses_a_one_image_artifact(artifact, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from imedsam_deploy.cli_serve import app

    from .reliability_helpers import assert_one_line_error

    one = tmp_path / "one"
    shutil.copytree(artifact, one)
    m = json.loads((one / "manifest.json").read_text())
    m["max_batch"] = 1
    (one / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(CliRunner().invoke(app, [str(one), "--tta"]), "--batch 2")


def test_numpy2_refused(monkeypatch):
    """Under numpy 2 PyTriton 0.7 would hand the model corrupted tensors: the server refuses to start."""
    from imedsam_core.errors import UserError
    from imedsam_deploy import serve

    monkeypatch.setattr(serve.np, "__version__", "2.4.6")
    with pytest.raises(UserError, match="numpy < 2"):
        serve.check_numpy()
