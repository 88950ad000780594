"""Per-step index tensors shared by every layer of a stage (built once per step).

Turns the step's chunks and block tables into positions, RoPE rows, the KV slots each new
token is written to, and the slots each sequence's context is read from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.step import SeqChunk


@dataclass
class PrefillGroup:
    """Fresh prompts (nothing cached yet) of one length: one batched causal attention."""

    rows: torch.Tensor
    """``[batch * length]`` rows of the group's tokens, sequence by sequence."""
    batch: int
    length: int


@dataclass
class PrefillSeq:
    """A chunk of more than one token after cached context; its attention runs on its own."""

    rows: slice
    """The chunk's rows in the step's token dimension."""
    chunk_index: int
    num_computed: int
    context_len: int


@dataclass
class StepMeta:
    positions: torch.Tensor
    """``[T]`` position of every token in the step."""
    write_slots: torch.Tensor
    """``[layers, T]`` K slot of every new token, per layer."""
    block_tables: torch.Tensor
    """``[chunks, layers, max_blocks]`` page ids, padded with page 0."""
    decode_rows: torch.Tensor
    """Rows of the one-token chunks, attended together in one padded batch."""
    decode_chunks: torch.Tensor
    decode_mask: torch.Tensor
    """``[decodes, 1, 1, C]`` additive mask: 0 where a decode's context has a token, -inf after."""
    fresh_prefills: list[PrefillGroup]
    prefills: list[PrefillSeq]
    sample_rows: torch.Tensor
    """Rows whose hidden state is sampled (the last token of each sampling chunk)."""


def build_step_meta(chunks: list[SeqChunk], num_layers: int, page_size: int,
                    device: torch.device, dtype: torch.dtype = torch.float32) -> StepMeta:
    """Index tensors for one step over a stage with ``num_layers`` layers; the decode mask
    is in ``dtype``, the queries' (SDPA's fused kernels refuse a mask of another dtype).

    Everything is computed on the host and reaches ``device`` in one copy (from pinned
    memory on CUDA), not one small blocking copy per tensor.
    """
    n_tokens = [c.num_tokens for c in chunks]
    max_blocks = max(len(row) for c in chunks for row in c.block_table)
    for c in chunks:
        if len(c.block_table) != num_layers:
            raise ValueError(f"sequence {c.seq_id}: block table has {len(c.block_table)} layers, "
                             f"stage runs {num_layers}")
    tables = torch.tensor([[row + [0] * (max_blocks - len(row)) for row in c.block_table]
                           for c in chunks], dtype=torch.int64)

    chunk_of_token = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(n_tokens))
    starts = torch.tensor([c.num_computed for c in chunks])
    offsets = torch.cumsum(torch.tensor([0] + n_tokens[:-1]), 0)
    positions = starts[chunk_of_token] + torch.arange(len(chunk_of_token)) - offsets[chunk_of_token]
    pages = tables[chunk_of_token, :, positions // page_size]          # [T, layers]
    write_slots = (pages * 2 * page_size + positions[:, None] % page_size).T.contiguous()

    decode_idx = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
    ctx = torch.tensor([chunks[i].context_len for i in decode_idx], dtype=torch.int64)
    width = int(-(-int(ctx.max()) // page_size) * page_size) if decode_idx else 0
    prefills, fresh, row = [], {}, 0
    for i, c in enumerate(chunks):
        if c.num_tokens > 1 and c.num_computed == 0:
            fresh.setdefault(c.num_tokens, []).append(torch.arange(row, row + c.num_tokens))
        elif c.num_tokens > 1:
            prefills.append(PrefillSeq(slice(row, row + c.num_tokens), i, c.num_computed, c.context_len))
        row += c.num_tokens
    ends = torch.cumsum(torch.tensor(n_tokens), 0) - 1
    host = [positions, write_slots, tables, ends[decode_idx], torch.tensor(decode_idx, dtype=torch.int64),
            ends[[i for i, c in enumerate(chunks) if c.sample]], ctx, *(torch.cat(r) for r in fresh.values())]
    positions, write_slots, tables, decode_rows, decode_chunks, sample_rows, ctx, *group_rows = _to_device(host, device)
    valid = torch.arange(width, device=device)[None, :] < ctx[:, None]
    decode_mask = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill_(~valid, float("-inf"))
    groups = [PrefillGroup(r, len(rows), n) for r, (n, rows) in zip(group_rows, fresh.items())]
    return StepMeta(
        positions=positions, write_slots=write_slots, block_tables=tables, decode_rows=decode_rows,
        decode_chunks=decode_chunks, decode_mask=decode_mask[:, None, None, :], fresh_prefills=groups,
        prefills=prefills, sample_rows=sample_rows,
    )


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """int64 host tensors on ``device``, through one flat buffer and one copy."""
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view(t.shape))
        at += t.numel()
    return out


def context_slots(tables: torch.Tensor, layer: int, width: int, page_size: int) -> torch.Tensor:
    """``[chunks, width]`` K slots of the first ``width`` tokens of each chunk's context."""
    pages = tables[:, layer, :-(-width // page_size)]
    ar = torch.arange(page_size, device=tables.device)
    return ((pages * 2 * page_size)[:, :, None] + ar).reshape(tables.shape[0], -1)[:, :width]
