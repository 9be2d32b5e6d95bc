"""The two exported graphs as ``nn.Module``s over a folded model (see ``merge.merge_for_export``).

EncoderGraph: image -> image embedding, the FFT replaced by DFT matrix products.
DecoderGraph: (embedding, boxes, raw coords) -> coarse, fine and uncertainty per point, (B, K, N) each (for
the lite preset the base mask head's logit, sampled border-clamped, added to both logits), with these exact
rewrites of ``IMedSAM.decode_dense`` (checked against it by the exporter and the tests):
- bilinear sampling is expressed with Gather (no ``GridSample``: TensorRT 10.13's GridSample is broken at
  opset 20, and the op's modes changed between opsets), same convention as ``grid_sample(align_corners=False,
  padding_mode="zeros")``;
- the Fourier encoding is computed in-graph from the raw coordinates;
- both trunks' first layers run as one matmul over the concatenated point features, and the fine trunk's
  coarse-feature part as a second one (the concatenation [input, coarse feature] is never built).
The decoder returns coarse logits, fine logits *at every point* and the uncertainty rather than the merged
prediction: UGS refines the top ceil(12.5% N) points by uncertainty over the whole query, a global choice that
a chunked decoder cannot make; the runtime merges after gathering all chunks, so chunking never changes a mask.
Not applied: "first layer on the low-resolution maps, then sample" (W interp(P) = interp(W P))
for the image-independent positional map. It trades a 256-wide sample and a 256 x 1280 matmul per point for a
1280-wide sample: four taps of 1280 floats per point, 3 GB of gathered fp32 (plus the weighted copy) for the
147k points of a 384^2 grid, where the matmul is 66 GMAC, a fraction of a millisecond on a GPU's tensor
cores. Measured on ONNX Runtime CPU (vit_b, 8,192 points, 2 threads, 30 interleaved runs) the two are within
5% (the table 5% faster there); the narrow sample is kept for the GPU paths' memory traffic.
Submodules ``PointTaps``, ``FourierFeatures``, ``PointUncertainty`` and ``DFTSpectrum`` are the fp32
islands of the fp16 graphs (selected by class name in ``fp16.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imedsam_export.dft import DFTSpectrum
from imedsam_train.model import IMedSAM
from imedsam_train.model.fourier import fourier_dim, fourier_encode, fourier_freqs

SQRT2 = math.sqrt(2.0)


class FusableGELU(nn.Module):
    """The exact (erf) GELU, written in the op order ONNX Runtime's GeluFusion matches: Div(x, sqrt 2), Erf,
    Add 1, Mul x, Mul 0.5. torch's own ``gelu`` exports as ``x * (0.5 * (1 + erf))``, which it does not
    match, leaving five elementwise passes over each MLP's 4C-wide activation instead of one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * (torch.erf(x / SQRT2) + 1.0)) * 0.5


def use_fusable_gelu(module: nn.Module) -> int:
    """Replace every exact ``nn.GELU`` under ``module`` by ``FusableGELU``; returns how many."""
    swaps = [(parent, name) for parent in module.modules() for name, child in parent.named_children()
             if isinstance(child, nn.GELU) and child.approximate == "none"]
    for parent, name in swaps:
        setattr(parent, name, FusableGELU())
    return len(swaps)


class EncoderGraph(nn.Module):
    """image (B, 3, S, S) in [0, 1] -> image_embedding (B, C, S/16, S/16)."""

    def __init__(self, model: IMedSAM) -> None:
        super().__init__()
        enc = model.image_encoder
        use_fusable_gelu(enc)
        self.encoder = enc
        fq = model.cfg.frequency
        self.dft = DFTSpectrum(model.cfg.input_size, fq.channel, fq.mode)
        # instance attribute shadows the method: the encoder's own forward now calls the DFT module
        object.__setattr__(enc, "frequency_spectrum", self.dft)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class PointTaps(nn.Module):
    """Bilinear taps of ``grid_sample(align_corners=False, padding_mode='zeros')`` (``'border'`` with
    ``border``): (idx, weight), (B, N, 4).

    idx indexes the row-major flattened H x W map; taps outside the map get weight 0 (index clamped).
    Computed in fp32 from the raw coordinates.
    """

    def __init__(self, height: int, width: int, border: bool = False) -> None:
        super().__init__()
        self.height, self.width, self.border = height, width, border

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = coords.float()
        ix = ((c[..., 0] + 1) * self.width - 1) * 0.5
        iy = ((c[..., 1] + 1) * self.height - 1) * 0.5
        if self.border:  # padding_mode="border": the sample point clamped onto the outermost pixel centres
            ix, iy = ix.clamp(0, self.width - 1), iy.clamp(0, self.height - 1)
        x0, y0 = torch.floor(ix), torch.floor(iy)
        wx1, wy1 = ix - x0, iy - y0
        xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
        ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
        wx = torch.stack([1 - wx1, wx1, 1 - wx1, wx1], dim=-1)
        wy = torch.stack([1 - wy1, 1 - wy1, wy1, wy1], dim=-1)
        inside = (xs >= 0) & (xs <= self.width - 1) & (ys >= 0) & (ys <= self.height - 1)
        w = wx * wy * inside.to(wx.dtype)
        xi = xs.clamp(0, self.width - 1).long()
        yi = ys.clamp(0, self.height - 1).long()
        return yi * self.width + xi, w


def gather_taps(rows: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows (R, C) table, idx/w (B, N, 4) -> (B, N, C) = sum_k w_k rows[idx_k]."""
    B, N, _ = idx.shape
    g = rows[idx.reshape(-1)].reshape(B, N, 4, rows.shape[-1])
    return (g * w.to(rows.dtype)[..., None]).sum(dim=2)


class FourierFeatures(nn.Module):
    """gamma(p) in fp32 (phases up to 2^9 pi: fp16 would be wrong by ~1), its frequencies a constant."""

    def __init__(self, levels: int, include_input: bool) -> None:
        super().__init__()
        self.levels, self.include_input = levels, include_input
        self.freqs: torch.Tensor
        self.register_buffer("freqs", fourier_freqs(levels), persistent=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return fourier_encode(coords.float(), self.levels, self.include_input, self.freqs)


class PointUncertainty(nn.Module):
    """The closed-form MC-dropout uncertainty of ``INR.coarse_eval``, (B, N, K), in fp32.

    (s(1-s))^2 * p/(1-p) * sum_i w_i^2 h_i^2 underflows fp16, and its ranking picks the refined points.
    """

    def __init__(self, head_weight: torch.Tensor, p: float) -> None:
        super().__init__()
        self.w2: torch.Tensor
        self.register_buffer("w2", ((p / (1.0 - p)) * head_weight * head_weight).t().contiguous())

    def forward(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        h = h.float()
        s = torch.sigmoid(logits.float())
        return (s * (1 - s)) ** 2 * ((h * h) @ self.w2)


class DecoderGraph(nn.Module):
    """(image_embedding (B,C,g,g), boxes (B,4), coords (B,N,2)) -> coarse, fine, uncertainty (B,K,N).

    Needs a folded model (``merge_for_export``): the INR trunks are Linear -> ReLU chains.
    """

    pe_map: torch.Tensor  # registered by ``use_grid_sample``

    def __init__(self, model: IMedSAM) -> None:
        super().__init__()
        cfg, dec = model.cfg, model.cfg.decoder
        self.model = model
        inr = model.inr
        c_lin = [m for m in inr.coarse_trunk if isinstance(m, nn.Linear)]
        f_lin = [m for m in inr.fine_trunk if isinstance(m, nn.Linear)]
        if len(c_lin) * 2 != len(inr.coarse_trunk) or len(f_lin) * 2 != len(inr.fine_trunk):
            raise ValueError("DecoderGraph needs INR trunks folded to Linear -> ReLU (merge_for_export)")
        d = cfg.encoder.out_chans
        cu, cp, fg = d // 8, d, fourier_dim(dec.fourier_levels, dec.fourier_include_input)
        g = cfg.grid_size
        self.K = cfg.num_classes
        self.taps_up = PointTaps(4 * g, 4 * g)
        # residual read-out (lite): the base logit map rides as the box features' last channel and is sampled
        # border-clamped (``LiteIMedSAM.base_offset``), then added to both heads' logits
        self.residual = model.residual_readout
        self.taps_low = PointTaps(4 * g, 4 * g, border=True)
        self.taps_pe = PointTaps(g, g)
        self.fourier = FourierFeatures(dec.fourier_levels, dec.fourier_include_input)
        w1c, w1f = c_lin[0].weight, f_lin[0].weight  # (H1c, cu+cp+fg), (H1f, cu+cp+fg+F)
        self.h1c = w1c.shape[0]
        n_in = cu + cp + fg
        with torch.no_grad():
            self.pe_rows: torch.Tensor  # SAM's dense positional map, image independent: (g*g, cp)
            self.register_buffer("pe_rows", model.prompt_encoder.get_dense_pe()[0].flatten(1).t().contiguous())
        # the first layers of both trunks over [up-map sample, positional sample, gamma]: one matmul
        self.first = nn.Linear(n_in, w1c.shape[0] + w1f.shape[0])
        self.first_cfeat = nn.Linear(w1f.shape[1] - n_in, w1f.shape[0], bias=False)
        with torch.no_grad():
            self.first.weight.copy_(torch.cat([w1c, w1f[:, :n_in]], dim=0))
            self.first.bias.copy_(torch.cat([c_lin[0].bias, f_lin[0].bias]))
            self.first_cfeat.weight.copy_(w1f[:, n_in:])
        self.coarse_rest = nn.Sequential(*list(inr.coarse_trunk)[2:])
        self.fine_rest = nn.Sequential(*list(inr.fine_trunk)[2:])
        self.coarse_head, self.fine_head = inr.coarse_head, inr.fine_head
        self.uncertainty = PointUncertainty(inr.coarse_head.weight[: self.K].detach(), inr.p)
        self.grid_sampling = False
        # torch paths: each point's input row as one kernel (``fused_point_features``); exported graphs: None
        self.point_features: nn.Module | None = None
        # torch paths: the uncertainty as one kernel (``fused_uncertainty``); exported graphs: None
        self.point_uncertainty: nn.Module | None = None
        # torch paths: zero-padded copies of the layers with odd widths (``align_matmuls``); exported graphs: None
        self.aligned: nn.ModuleDict | None = None
        self.feat_pad = 0
        # torch paths: each Linear -> ReLU as one GEMM with a bias-and-ReLU epilogue (``use_relu_epilogue``)
        self.relu_epilogue = False

    def use_grid_sample(self, on: bool = True) -> None:
        """Sample the two maps with ``grid_sample`` (torch paths: one kernel per map where ``PointTaps`` and
        ``gather_taps`` take ~35 small ones; exported graphs keep Gather). Same convention, in fp32; equal to
        the Gather form within fp32 rounding (tests/test_export.py)."""
        self.grid_sampling = on
        if on:  # the positional map as an image again, (1, C, g, g); not persistent: never in a state dict
            g = self.taps_pe.height
            pe_map = self.pe_rows.t().reshape(1, -1, g, g).float().contiguous()
            self.register_buffer("pe_map", pe_map, persistent=False)

    def align_matmuls(self, on: bool = True, multiple: int = 8) -> None:
        """Run the per-point layers whose widths are not a multiple of ``multiple`` as zero-padded copies
        (vit_b: the first layer's 330 inputs -> 336, the coarse head's 257 outputs -> 264 with the 256 features
        first, the fine head's K outputs -> 8). cuBLAS takes its Hopper GEMMs only for rows aligned to 16
        bytes; otherwise it falls back to align1 / align2 kernels, the heaviest of a sparse frame on an H200
        (benchmarks/HISTORY.md, session 7). Exact: the padding adds products with zeros. Torch paths only;
        made from the layers as they are now (after ``store_weights_in``)."""
        if not on:
            self.aligned, self.feat_pad = None, 0
            return
        first, head, fine = self.first, self.coarse_head, self.fine_head
        n_in, K = first.in_features, self.K
        self.feat_pad = -n_in % multiple
        self.feat_zeros: torch.Tensor  # a constant, expanded (no kernel) to the points' padding columns
        self.register_buffer("feat_zeros", torch.zeros((), device=first.weight.device), persistent=False)

        def padded(rows: torch.Tensor, bias: torch.Tensor | None, cols: int | None = None) -> nn.Linear:
            """rows (out, in) as a Linear of ``cols`` inputs (default: in) and out rounded up, zeros around."""
            cols = rows.shape[1] if cols is None else cols
            lin = nn.Linear(cols, -rows.shape[0] % multiple + rows.shape[0], bias=bias is not None)
            lin = lin.to(device=rows.device, dtype=rows.dtype)
            with torch.no_grad():
                lin.weight.zero_()
                lin.weight[: rows.shape[0], : rows.shape[1]] = rows
                if bias is not None:
                    lin.bias.zero_()
                    lin.bias[: bias.shape[0]] = bias
            return lin

        def reorder(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:  # the features first, then K logits
            w = torch.cat([lin.weight[K:], lin.weight[:K]]).detach()
            return w, None if lin.bias is None else torch.cat([lin.bias[K:], lin.bias[:K]])

        self.aligned = nn.ModuleDict({
            "first": padded(first.weight.detach(), first.bias, n_in + self.feat_pad),
            "coarse_head": padded(*reorder(head)),
            "fine_head": padded(fine.weight.detach(), fine.bias),
        })

    def use_relu_epilogue(self, on: bool = True) -> None:
        """Run each Linear -> ReLU of the trunks as ``torch._addmm_activation`` (on CUDA one cuBLASLt GEMM with its
        bias-and-ReLU epilogue: the ReLU's pass over the (points x width) activations is gone), the shared first
        layer as two GEMMs over the same rows (the coarse trunk's with the epilogue, the fine trunk's apart), and
        the fine trunk's first layer as its point part plus an in-place GEMM over the coarse feature (one kernel
        where a matmul and an add were two). ReLU commutes with rounding, so the epilogue is exact; the split
        GEMMs sum the same products (in the order their kernels choose); the in-place GEMM rounds its sum once
        instead of twice. Torch paths only (ONNX Runtime and TensorRT fuse these
        themselves); falls back to the plain layers where torch lacks the op."""
        self.relu_epilogue = on and hasattr(torch, "_addmm_activation")

    def _linear_relu(self, lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.relu_epilogue or not isinstance(lin, nn.Linear) or lin.bias is None:
            return torch.relu(lin(x))
        w = lin.weight  # in the compute dtype on torch-cuda (store_weights_in), like the activations
        y = torch._addmm_activation(lin.bias, x.reshape(-1, x.shape[-1]).to(w.dtype), w.t())
        return y.view(*x.shape[:-1], -1)

    def _trunk(self, seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """The Linear -> ReLU pairs of a folded trunk (``merge_for_export``)."""
        mods = list(seq)
        for lin, act in zip(mods[::2], mods[1::2], strict=True):
            x = self._linear_relu(lin, x) if isinstance(act, nn.ReLU) else act(lin(x))
        return x

    def forward(
        self, image_embedding: torch.Tensor, boxes: torch.Tensor, coords: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.point_outputs(self.box_features(image_embedding, boxes), coords)

    def box_features(self, image_embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The box-conditioned map (B, C/8, 4g, 4g); with a residual read-out the base logit map is appended
        as one more channel, so the split decoder's contract stays one tensor."""
        up, low = self.model.box_maps(image_embedding, boxes)
        return up if low is None else torch.cat([up, low.to(up.dtype)], dim=1)

    def prompt_graph(self) -> nn.Module:
        """(image_embedding, boxes) -> box_features: the part that depends on the box only."""
        return _PromptGraph(self)

    def points_graph(self) -> nn.Module:
        """(box_features, coords) -> coarse, fine, uncertainty: the per-point part."""
        return _PointsGraph(self)

    def point_outputs(self, up: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-point part: box features (``box_features``), coords (B, N, 2) -> (B, K, N) x 3."""
        offset = None
        if self.residual:
            up, low = up[:, :-1], up[:, -1]
            idx, w = self.taps_low(coords)
            B, hw = low.shape[0], low.shape[1] * low.shape[2]
            rows = low.reshape(B * hw, 1)
            offset = gather_taps(rows, idx + (torch.arange(B, device=idx.device) * hw)[:, None, None], w)  # (B,N,1)
        feats = self._point_rows(up, coords)
        al, K = self.aligned, self.K
        lin: nn.Linear = al["first"] if al is not None else self.first  # type: ignore[assignment]
        if self.relu_epilogue:
            # the two trunks' first layers as two GEMMs over the same rows: the coarse one with its ReLU epilogue
            # (no ReLU pass over the points x 1024 activations, nor the strided slice of a points x 1280 result),
            # the fine one contiguous for its in-place GEMM below
            x2, c = feats.reshape(-1, feats.shape[-1]).to(lin.weight.dtype), self.h1c
            h_c = torch._addmm_activation(lin.bias[:c], x2, lin.weight[:c].t()).view(*feats.shape[:-1], c)
            first_f = torch.addmm(lin.bias[c:], x2, lin.weight[c:].t()).view(*feats.shape[:-1], -1)
        else:
            first = lin(feats)
            h_c, first_f = torch.relu(first[..., : self.h1c]), first[..., self.h1c :]
        h = self._trunk(self.coarse_rest, h_c)
        if al is not None:  # (coarse features, K logits, zeros)
            out, C = al["coarse_head"](h), self.first_cfeat.in_features
            cfeat, logits = out[..., :C], out[..., C : C + K]
        else:
            out = self.coarse_head(h)
            logits, cfeat = out[..., :K], out[..., K:]
        if offset is not None:
            logits = logits + offset.to(logits.dtype)
        unc = (self.uncertainty if self.point_uncertainty is None else self.point_uncertainty)(h, logits)
        w = self.first_cfeat.weight
        if self.relu_epilogue and first_f.dtype == w.dtype:  # first_f += cfeat W^T in place (it is scratch)
            f2 = first_f.reshape(-1, first_f.shape[-1])
            h_f = torch.relu_(f2.addmm_(cfeat.reshape(-1, cfeat.shape[-1]).to(w.dtype), w.t())).view(first_f.shape)
        else:
            h_f = torch.relu(first_f + self.first_cfeat(cfeat))
        fine = (al["fine_head"] if al is not None else self.fine_head)(self._trunk(self.fine_rest, h_f))[..., :K]
        if offset is not None:
            fine = fine + offset.to(fine.dtype)
        return logits.transpose(1, 2), fine.transpose(1, 2), unc.transpose(1, 2)

    def _point_rows(self, up: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Each point's first-layer input, (B, N, n_in): [up-map sample, positional sample, gamma], and the zero
        columns of ``align_matmuls``' padded first layer."""
        al = self.aligned
        pad = self.feat_pad if al is not None else 0
        if self.point_features is not None:  # one kernel, the rows in the first GEMM's operand dtype
            dtype = (al["first"] if al is not None else self.first).weight.dtype
            return self.point_features(up, coords, self.first.in_features + pad, dtype)
        f_up, f_pe = self._grid_samples(up, coords) if self.grid_sampling else self._gather_samples(up, coords)
        parts = [f_up, f_pe, self.fourier(coords).to(f_up.dtype)]
        if pad:  # zero columns for the padded first layer's zero weights
            parts.append(self.feat_zeros.to(f_up.dtype).expand(*f_up.shape[:-1], pad))
        return torch.cat(parts, dim=-1)

    def _gather_samples(self, up: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The up-map (B, N, C/8) and positional (B, N, C) samples, as Gather ops (the exported form)."""
        B = up.shape[0]
        up_rows = up.flatten(2).transpose(1, 2).reshape(-1, up.shape[1])  # (B*4g*4g, C/8)
        idx, w = self.taps_up(coords)
        offset = (torch.arange(B, device=idx.device) * (up.shape[2] * up.shape[3]))[:, None, None]
        idx_pe, w_pe = self.taps_pe(coords)
        return gather_taps(up_rows, idx + offset, w), gather_taps(self.pe_rows, idx_pe, w_pe)

    def _grid_samples(self, up: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same samples with ``grid_sample``, as transposed views (the concatenation copies them)."""
        B, N, _ = coords.shape
        grid = coords.float()[:, :, None]  # (B, N, 1, 2)
        f_up = F.grid_sample(up.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # the positional map is shared by the batch: one sample over all B*N points
        f_pe = F.grid_sample(self.pe_map, grid.reshape(1, B * N, 1, 2), mode="bilinear", padding_mode="zeros",
                             align_corners=False)
        return f_up[..., 0].transpose(1, 2), f_pe[0, :, :, 0].t().reshape(B, N, -1)


class _PromptGraph(nn.Module):
    def __init__(self, decoder: DecoderGraph) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.decoder.box_features(image_embedding, boxes)


class _PointsGraph(nn.Module):
    def __init__(self, decoder: DecoderGraph) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, box_features: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decoder.point_outputs(box_features, coords)
