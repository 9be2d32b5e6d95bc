"""imedsam-serve under load: N concurrent clients (HTTP and gRPC alternately) mixing segment, encode + decode
and refused requests against a real server on 127.0.0.1, bounded in count and time. Prints p50 / p99
latency per kind, throughput, the RSS of this process and of the server's processes before and after, the
encoder batch sizes Triton formed, and the same requests' latency run in process (the serving overhead).

    python benchmarks/serve_load.py ARTIFACT [--clients 8] [--requests 12] [--rounds 1] [--backend ort-cpu] [--max-seconds 60]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imedsam_deploy.client import ServeClient, ServeError  # noqa: E402
from imedsam_deploy.runtime import open_segmenter  # noqa: E402
from imedsam_deploy.serve import Server, ServerConfig, Service  # noqa: E402
from imedsam_deploy.triton_leftovers import descendants  # noqa: E402
from imedsam_deploy.video import read_image  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "kvasir-sessile"


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=12, help="per client")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=1, help="repeat the load, RSS after each round")
    a = p.parse_args()

    images = []
    for path in sorted((SAMPLE / "images").iterdir())[:3]:
        rgb = read_image(path)
        h, w = rgb.shape[:2]
        images.append((rgb, np.array([[w * 0.2, h * 0.2, w * 0.7, h * 0.8]], np.float32)))
    seg, how = open_segmenter(a.artifact, a.backend, None, None, None)
    be, art = seg.backend, seg.artifact
    # in process: the same requests through the runtime directly
    local: dict[str, list[float]] = {"segment": [], "encode+decode": []}
    for _ in range(3):
        for rgb, boxes in images:
            t = time.perf_counter()
            seg.segment(rgb, boxes.astype(np.float64))
            local["segment"].append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            embs, _ = seg.embed([rgb])
            seg.segment_embedded(embs, rgb.shape[:2], boxes.astype(np.float64))
            local["encode+decode"].append((time.perf_counter() - t) * 1e3)

    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    http, grpc, metrics = (s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    me = os.getpid()
    rss0 = rss_mb(me)
    svc = Service(seg)
    srv = Server(svc, ServerConfig(http_port=http, grpc_port=grpc, metrics_port=metrics))
    t0 = time.perf_counter()
    srv.start()
    start_s = time.perf_counter() - t0
    servers = descendants(me)
    rss_srv0 = sum(rss_mb(p) for p in servers)
    rss1 = rss_mb(me)
    # one client, one request at a time: the serving overhead per request without contention
    seq: dict[str, list[float]] = {"http": [], "grpc": []}
    for proto, port in (("http", http), ("grpc", grpc)):
        with ServeClient(f"127.0.0.1:{port}", proto, timeout_s=a.max_seconds) as c:  # type: ignore[arg-type]
            for _ in range(2):
                for rgb, boxes in images:
                    t = time.perf_counter()
                    c.segment(rgb, boxes)
                    seq[proto].append((time.perf_counter() - t) * 1e3)
    lat: dict[str, list[float]] = {"segment": [], "encode+decode": [], "refused": []}
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + a.max_seconds

    def worker(i: int) -> None:
        proto = "grpc" if i % 2 else "http"
        with ServeClient(f"127.0.0.1:{grpc if i % 2 else http}", proto, timeout_s=a.max_seconds) as c:  # type: ignore[arg-type]
            for j in range(a.requests):
                if time.monotonic() > deadline:
                    break
                rgb, boxes = images[(i + j) % len(images)]
                kind = ("segment", "encode+decode", "refused")[j % 3]
                t = time.perf_counter()
                try:
                    if kind == "segment":
                        c.segment(rgb, boxes)
                    elif kind == "encode+decode":
                        c.decode(c.encode(rgb), boxes)
                    else:
                        try:
                            c.segment(rgb, [[0, 0, rgb.shape[1] + 1, 10]])
                            raise AssertionError("not refused")
                        except ServeError:
                            pass
                    ms = (time.perf_counter() - t) * 1e3
                    with lock:
                        lat[kind].append(ms)
                except Exception as e:
                    with lock:
                        failures.append(f"{kind}: {type(e).__name__}: {str(e)[:120]}")

    # the load in rounds, RSS after each: memory that keeps growing round after round is a leak, memory that
    # stops after the first rounds is warm-up (allocator pools, per-shape buffers)
    per_round: list[tuple[float, float]] = []
    wall = 0.0
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall += time.perf_counter() - t0
        per_round.append((rss_mb(me), sum(rss_mb(p) for p in servers)))
    # concurrent encodes of one image size: what Triton's dynamic batcher merges
    batches_before = dict(svc.stats.encode_batches)
    barrier = threading.Barrier(a.clients)

    def encoder(i: int) -> None:
        with ServeClient(f"127.0.0.1:{http}", timeout_s=a.max_seconds) as c:
            barrier.wait(timeout=30)
            for _ in range(4):
                c.encode(images[0][0])

    ths = [threading.Thread(target=encoder, args=(i,)) for i in range(a.clients)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    burst = {b: n - batches_before.get(b, 0) for b, n in svc.stats.encode_batches.items()
             if n - batches_before.get(b, 0)}
    rss_srv1 = sum(rss_mb(p) for p in servers)
    rss2 = rss_mb(me)
    t0 = time.perf_counter()
    srv.stop()
    stop_s = time.perf_counter() - t0
    be.close()

    done = sum(len(v) for v in lat.values())
    print(f"backend: {how}; artifact {a.artifact} (input {art.input_size}); {os.cpu_count()} CPUs")
    print(f"server start {start_s:.1f} s, stop {stop_s:.1f} s")
    print(f"load: {a.rounds} round(s) of {a.clients} clients x {a.requests} requests (HTTP/gRPC alternately): {done} answered, "
          f"{len(failures)} failed, in {wall:.1f} s -> {done / wall:.1f} requests/s")
    for proto, xs in seq.items():
        print(f"one client, {proto}: segment p50 {pct(xs, 50):.1f} ms vs in process p50 "
              f"{pct(local['segment'], 50):.1f} ms -> serving overhead {pct(xs, 50) - pct(local['segment'], 50):+.1f} ms")
    for kind, xs in lat.items():
        line = f"  {kind:14s} n={len(xs):3d}  p50 {pct(xs, 50):7.1f} ms  p99 {pct(xs, 99):7.1f} ms"
        if kind in local:
            line += (f"   in process p50 {pct(local[kind], 50):6.1f} ms  (serving overhead p50 "
                     f"{pct(xs, 50) - pct(local[kind], 50):+.1f} ms, under {a.clients}-way contention)")
        print(line)
    sizes = ", ".join(f"{b}x{n}" for b, n in sorted(svc.stats.encode_batches.items()))
    print(f"encode batch sizes (size x calls), all: {sizes}; {a.clients} simultaneous encoders x 4: "
          f"{', '.join(f'{b}x{n}' for b, n in sorted(burst.items()))}")
    print(f"RSS this process: {rss0:.0f} MB before the server, {rss1:.0f} MB started, {rss2:.0f} MB after the load; "
          f"server processes ({len(servers)}): {rss_srv0:.0f} MB started, {rss_srv1:.0f} MB after")
    print("RSS after each round, this process / server processes (MB): "
          + ", ".join(f"{x:.0f} / {y:.0f}" for x, y in per_round))
    for f in failures[:5]:
        print("  failed:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
