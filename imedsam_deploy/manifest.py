"""Read and validate an exported artifact folder (see the artifact contract in the README / ARTIFACT notes).

Every file the manifest lists is checked against its size and sha256 before a graph is opened: a truncated
copy or a file swapped after export is refused with a one-line reason.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imedsam_core import contract
from imedsam_core.errors import UserError

SPLIT_PARTS = ("decoder_prompt", "decoder_points")
_REQUIRED = ("input_size", "embedding_shape", "num_classes", "refine_fraction", "max_points", "max_batch",
             "graphs", "files")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A validated artifact folder."""

    path: Path
    manifest: dict[str, Any]
    input_size: int
    embedding_shape: tuple[int, int, int]
    num_classes: int
    refine_fraction: float
    max_points: int
    max_batch: int
    graphs: dict[str, dict[str, str]]  # precision -> {"encoder": file, "decoder": file}
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> engine entry
    resize: str = contract.RESIZE_MODE  # the preprocessing (contract.RESIZE_MODES): stretch or the lite letterbox

    def file(self, name: str) -> Path:
        return self.path / name

    def has_split_decoder(self, precision: str = "fp32") -> bool:
        return all(p in self.graphs.get(precision, {}) for p in SPLIT_PARTS)

    def graph(self, part: str, precision: str = "fp32") -> Path:
        if precision not in self.graphs:
            raise UserError(f"{self.path}: artifact has no {precision} graphs (has {', '.join(sorted(self.graphs))})")
        return self.file(self.graphs[precision][part])


def _bad(path: Path, msg: str) -> UserError:
    return UserError(f"{path}: {msg}")


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Validate ``path`` (manifest keys, preprocessing, file sizes and sha256) and return an ``Artifact``."""
    root = Path(path)
    if not root.exists():
        raise _bad(root, "artifact folder does not exist")
    if not root.is_dir():
        raise _bad(root, "not a folder (pass the artifact folder written by imedsam-export)")
    mpath = root / contract.MANIFEST_NAME
    if not mpath.is_file():
        raise _bad(root, f"no {contract.MANIFEST_NAME}: not an imedsam artifact folder (export one with imedsam-export)")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(mpath, f"unreadable manifest ({type(e).__name__})") from None
    if not isinstance(m, dict) or m.get("format") != contract.MANIFEST_FORMAT:
        raise _bad(mpath, f"not an imedsam artifact manifest (format != {contract.MANIFEST_FORMAT!r})")
    if m.get("version") != contract.MANIFEST_VERSION:
        raise _bad(mpath, f"manifest version {m.get('version')!r}, this runtime reads version {contract.MANIFEST_VERSION}")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise _bad(mpath, f"manifest lacks {', '.join(missing)}")
    try:
        s = int(m["input_size"])
        emb = tuple(int(v) for v in m["embedding_shape"])
        k = int(m["num_classes"])
        frac = float(m["refine_fraction"])
        max_points, max_batch = int(m["max_points"]), int(m["max_batch"])
    except (TypeError, ValueError):
        raise _bad(mpath, "manifest has a malformed size field") from None
    if len(emb) != 3 or min(emb) <= 0 or s <= 0 or k <= 0 or max_points <= 0 or max_batch <= 0:
        raise _bad(mpath, "manifest has a non-positive size")
    if not 0.0 < frac <= 1.0:
        raise _bad(mpath, f"refine_fraction {frac} is not in (0, 1]")
    resize = _check_preprocessing(mpath, m.get("preprocessing"), s)

    files = m["files"]
    graphs = m["graphs"]
    if not isinstance(files, dict) or not isinstance(graphs, dict) or "fp32" not in graphs:
        raise _bad(mpath, "manifest has no fp32 graphs or no file list")
    for prec, g in graphs.items():
        for part in ("encoder", "decoder"):
            name = g.get(part) if isinstance(g, dict) else None
            if not isinstance(name, str) or name not in files:
                raise _bad(mpath, f"{prec} {part} graph is not listed in the manifest's files")
        for part in SPLIT_PARTS:  # optional: the decoder split per box / per point
            if part in g and g[part] not in files:
                raise _bad(mpath, f"{prec} {part} graph is not listed in the manifest's files")
    engines = m.get("engines") or {}
    for prec, entry in engines.items():
        for part in ("encoder", "decoder"):
            if not isinstance(entry, dict) or entry.get(part) not in files:
                raise _bad(mpath, f"{prec} {part} engine is not listed in the manifest's files")
    if verify:
        for name, meta in files.items():
            _verify_file(root, name, meta)
    return Artifact(
        path=root, manifest=m, input_size=s, embedding_shape=(emb[0], emb[1], emb[2]), num_classes=k,
        refine_fraction=frac, max_points=max_points, max_batch=max_batch,
        graphs={p: dict(g) for p, g in graphs.items()}, engines={p: dict(v) for p, v in engines.items()},
        resize=resize,
    )


def _check_preprocessing(mpath: Path, pre: Any, input_size: int) -> str:
    """The runtime implements exactly the contract's preprocessings; refuse an artifact declaring another.
    Returns its resize mode."""
    if not isinstance(pre, dict):
        raise _bad(mpath, "manifest has no preprocessing declaration")
    resize = pre.get("resize")
    if resize not in contract.RESIZE_MODES:
        raise _bad(mpath, f"preprocessing resize={resize!r}, this runtime implements "
                          f"{' or '.join(map(repr, contract.RESIZE_MODES))}")
    want = contract.preprocessing_manifest(input_size, str(resize))
    for key, val in want.items():
        got = pre.get(key)
        same = (isinstance(val, float) and isinstance(got, (int, float)) and math.isclose(got, val, rel_tol=1e-9)) \
            or got == val
        if not same:
            raise _bad(mpath, f"preprocessing {key}={got!r}, this runtime implements {key}={val!r}")
    return str(resize)


def _verify_file(root: Path, name: str, meta: Any) -> None:
    p = root / name
    if not isinstance(meta, dict) or "sha256" not in meta:
        raise _bad(p, "manifest entry has no sha256")
    if not p.is_file():
        raise _bad(p, "listed in the manifest but missing")
    size = meta.get("bytes")
    if size is not None and p.stat().st_size != int(size):
        raise _bad(p, f"{p.stat().st_size} bytes, the manifest says {size} (truncated or replaced)")
    if sha256_file(p) != meta["sha256"]:
        raise _bad(p, "sha256 does not match the manifest (file changed after export)")
