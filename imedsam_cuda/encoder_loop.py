"""The encoder's block loop for torch-cuda: the frequency chain issued first, on a side stream on CUDA.

The frequency chain (spectrum, patch embedding, one adapter per block) never reads the tokens: on a GPU it can
run on a second stream beside the token chain, where at 576 tokens most of the GPU sits idle. ``InferenceEncoder``
is the trained ``ImageEncoder`` (its modules, shared) whose forward runs that loop where an option asks for it:
``frequency_first`` (the side stream), an ``adapter_chain`` (every block's adapter at once), or blocks whose
``step`` fuses work across block boundaries (``StepBlock.fuses_steps``). The same operations on the same values:
bitwise the embedding of the plain loop (tests/test_bench.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from imedsam_train.model.encoder import Block, ImageEncoder


def plain_step(blk: Block, x: torch.Tensor, add: torch.Tensor, wait: Callable[[], None]) -> torch.Tensor:
    """One block of the chain-first loop as the plain block computes it: the block on x, then ``wait()`` (for
    the frequency stream) and its adapter's ``add``."""
    x, _ = blk(x, None)
    wait()
    return x + add


class StepBlock(Block):
    """A ``Block`` inference form whose ``step`` may fuse work across block boundaries (``LeanBlock``'s fused
    norms): only ``InferenceEncoder``'s loop runs it as it is meant to."""

    @property
    def fuses_steps(self) -> bool:
        return False

    def step(self, x: torch.Tensor, y: torch.Tensor | None, add: torch.Tensor, wait: Callable[[], None],
             next_block: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block of the chain-first loop. ``y``: this block's norm1(x) if the previous step made it (fused
        with its last add); returns (x, the next block's norm1 output or None). Here ``plain_step``: y neither
        read nor made."""
        return plain_step(self, x, add, wait), None


class InferenceEncoder(ImageEncoder):
    """``ImageEncoder`` (the trained one's modules, shared) with the chain-first block loop: on CUDA with
    ``frequency_first`` the frequency chain runs on a side stream (an event per block joins each adapter's
    output to the token chain; captured in a CUDA graph as parallel branches)."""

    # every block's adapter at once (frequency tokens -> the (blocks, ...) additions), run by the chain-first
    # loop, without the side stream unless ``frequency_first`` (``encoder_rewrites.use_fused_frequency``)
    adapter_chain: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, encoder: ImageEncoder, frequency_first: bool) -> None:
        nn.Module.__init__(self)
        self.input_size, self.grid, self.freq_cfg = encoder.input_size, encoder.grid, encoder.freq_cfg
        self.patch_embed, self.pos_embed = encoder.patch_embed, encoder.pos_embed
        self.blocks, self.neck = encoder.blocks, encoder.neck
        self.frequency_first = frequency_first
        if isinstance(encoder, InferenceEncoder):
            self.adapter_chain = encoder.adapter_chain
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.freq_cfg.enabled and (self.frequency_first or self.adapter_chain is not None
                                      or any(isinstance(b, StepBlock) and b.fuses_steps for b in self.blocks)):
            x = self.frequency_chain_first(self.patch_embed(image) + self.pos_embed, image)
            return self.neck(x.permute(0, 3, 1, 2))
        return super().forward(image)

    def frequency_chain_first(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``ImageEncoder.forward``'s block loop with the whole frequency chain issued first, on a side stream on
        CUDA with ``frequency_first``. The same operations on the same values: bitwise the same embedding."""
        cuda = x.device.type == "cuda" and self.frequency_first
        main = torch.cuda.current_stream(x.device) if cuda else None
        side = None
        if cuda:
            streams = self._side_streams
            if x.device not in streams:  # one side stream per device, made on first use
                streams[x.device] = torch.cuda.Stream(x.device)
            side = streams[x.device]
            assert main is not None
            side.wait_stream(main)
        adds: list[torch.Tensor] = []
        events: list[torch.cuda.Event | None] = []
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            f = self.frequency_tokens(image)
            if self.adapter_chain is not None:  # every adapter in one go: one event for them all
                adds = list(self.adapter_chain(f).unbind(0))
                events = [torch.cuda.Event() if cuda else None] * len(adds)
                if events[0] is not None:
                    events[0].record(side)
            else:
                for blk in self.blocks:
                    assert isinstance(blk, Block)
                    f, add = blk.frequency_step(f)
                    adds.append(add)
                    events.append(torch.cuda.Event() if cuda else None)
                    if events[-1] is not None:
                        events[-1].record(side)
        y = None
        blocks = list(self.blocks)
        for i, (blk, add, ev) in enumerate(zip(blocks, adds, events, strict=True)):
            assert isinstance(blk, Block)

            def wait(ev: torch.cuda.Event | None = ev) -> None:
                if ev is not None and main is not None:
                    main.wait_event(ev)

            if isinstance(blk, StepBlock):
                x, y = blk.step(x, y, add, wait, blocks[i + 1] if i + 1 < len(blocks) else None)
            else:
                x, y = plain_step(blk, x, add, wait), None
        if side is not None and main is not None:
            # the adapters' outputs were allocated on the side stream and read on the main one: the side
            # stream waits for those reads before the allocator can hand the memory out again there (the
            # caching allocator's documented alternative to record_stream, which is unsafe under capture)
            side.wait_stream(main)
            main.wait_stream(side)
        return x
