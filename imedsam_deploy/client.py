"""A Python client for ``imedsam-serve`` over HTTP or gRPC (tritonclient), and a small command line:

    python -m imedsam_deploy.client image.jpg --box 40,60,300,280 [--url 127.0.0.1:8001 --protocol grpc]
        [--out-size HxW] [--out mask.png]

    with ServeClient("127.0.0.1:8000") as c:
        res = c.segment(rgb, [[40, 60, 300, 280]])        # one request: encode + decode
        handle = c.encode(rgb)                            # once per image ...
        res = c.decode(handle, [[40, 60, 300, 280]])      # ... then any number of box prompts
        res.masks (K, H, W) uint8 0/1, res.status ["ok" | "empty" | "low-confidence"], res.mean_probability
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imedsam_core.errors import UserError

Protocol = Literal["http", "grpc"]
_REASON = re.compile(r"RequestError: (.+)")


class ServeError(Exception):
    """The server refused a request (the message says why) or could not be reached."""


@dataclass
class SegmentResult:
    masks: np.ndarray  # (K, H, W) uint8, 1 = object
    status: list[str]
    mean_probability: np.ndarray  # (K,) float32


def _reason(e: Exception) -> str:
    """The server's one-line reason from a tritonclient error (PyTriton sends the whole traceback)."""
    text = str(getattr(e, "message", lambda: None)() or e)
    found = _REASON.findall(text)
    if found:
        return str(found[-1]).strip()
    return " ".join(text.split())[:300]


class ServeClient:
    """``segment`` / ``encode`` / ``decode`` against imedsam-serve; one connection, not thread-safe (make one
    per thread)."""

    def __init__(self, url: str = "127.0.0.1:8000", protocol: Protocol = "http", timeout_s: float = 60.0) -> None:
        try:
            if protocol == "http":
                import tritonclient.http as tc
            elif protocol == "grpc":
                import tritonclient.grpc as tc  # type: ignore[no-redef]
            else:
                raise UserError(f"protocol {protocol!r}: choose http or grpc")
        except ImportError:
            raise UserError("tritonclient is not installed: pip install 'imedsam[serve]'") from None
        self.tc, self.protocol, self.timeout_s = tc, protocol, timeout_s
        if protocol == "http":
            self.client = tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            self.client = tc.InferenceServerClient(url)

    def _input(self, name: str, a: np.ndarray, dtype: str) -> Any:
        i = self.tc.InferInput(name, list(a.shape), dtype)
        i.set_data_from_numpy(a)
        return i

    def _infer(self, model: str, inputs: list[Any], outputs: list[str]) -> dict[str, np.ndarray]:
        kw: dict[str, Any] = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            res = self.client.infer(model, inputs, **kw)
        except self.tc.InferenceServerException as e:
            raise ServeError(f"{model}: {_reason(e)}") from None
        return {n: res.as_numpy(n) for n in outputs}

    def _box_inputs(self, boxes: Any, out_size: tuple[int, int] | None) -> list[Any]:
        b = np.ascontiguousarray(np.asarray(boxes, np.float32).reshape(-1, 4))
        if len(b) == 0:
            raise ServeError("boxes: no box given")
        ins = [self._input("boxes", b, "FP32")]
        if out_size is not None:
            ins.append(self._input("out_size", np.asarray(out_size, np.int32).reshape(2), "INT32"))
        return ins

    @staticmethod
    def _result(out: dict[str, np.ndarray]) -> SegmentResult:
        status = [s.decode() if isinstance(s, bytes) else str(s) for s in out["status"].reshape(-1)]
        return SegmentResult(out["masks"], status, out["mean_probability"])

    @staticmethod
    def _image(model: str, image: np.ndarray) -> np.ndarray:
        # PyTriton cannot pass a zero-sized array to the model (its error would not say why)
        if image.size == 0:
            raise ServeError(f"{model}: image: empty ({'x'.join(map(str, image.shape))})")
        return np.ascontiguousarray(image)

    def segment(self, image: np.ndarray, boxes: Any, out_size: tuple[int, int] | None = None) -> SegmentResult:
        """image (H, W, 3) uint8 RGB, boxes (K, 4) x0,y0,x1,y1 in its pixels, out_size (height, width)."""
        ins = [self._input("image", self._image("segment", image), "UINT8"), *self._box_inputs(boxes, out_size)]
        return self._result(self._infer("segment", ins, ["masks", "status", "mean_probability"]))

    def encode(self, image: np.ndarray) -> str:
        """The image's embedding, kept by the server: a handle for ``decode`` (until evicted or expired)."""
        out = self._infer("encode", [self._input("image", self._image("encode", image)[None], "UINT8")], ["handle"])
        h = out["handle"].reshape(-1)[0]
        return h.decode() if isinstance(h, bytes) else str(h)

    def decode(self, handle: str, boxes: Any, out_size: tuple[int, int] | None = None) -> SegmentResult:
        ins = [self._input("handle", np.array([handle.encode()], dtype=np.object_), "BYTES"),
               *self._box_inputs(boxes, out_size)]
        return self._result(self._infer("decode", ins, ["masks", "status", "mean_probability"]))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    from imedsam_deploy.boxes import parse_box
    from imedsam_deploy.video import read_image

    p = argparse.ArgumentParser(prog="python -m imedsam_deploy.client", description="Segment boxes on an image "
                                "through imedsam-serve.")
    p.add_argument("image", type=Path)
    p.add_argument("--box", action="append", required=True, help="x0,y0,x1,y1 in image pixels; repeatable")
    p.add_argument("--url", default="127.0.0.1:8000")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--out-size", default=None, help="HxW (default: the image's)")
    p.add_argument("--out", type=Path, default=None, help="mask PNG (the union of the objects)")
    a = p.parse_args(argv)
    try:
        rgb = read_image(a.image)
        boxes = np.stack([parse_box(b) for b in a.box])
        size = None
        if a.out_size:
            h, w = (int(v) for v in a.out_size.lower().split("x"))
            size = (h, w)
        with ServeClient(a.url, a.protocol) as c:
            res = c.segment(rgb, boxes, size)
    except (UserError, ServeError, ValueError) as e:
        print(f"error: {a.image}: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    for i, (s, pr) in enumerate(zip(res.status, res.mean_probability, strict=True)):
        print(f"object {i + 1}: {s}, area {int(res.masks[i].sum())} px, mean probability {pr:.3f}")
    if a.out is not None:
        from imedsam_deploy._cv import cv2

        cv2.imwrite(str(a.out), res.masks.max(axis=0) * 255)


if __name__ == "__main__":
    main()
