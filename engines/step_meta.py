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
                    device: torch.device) -> StepMeta:
    """Index tensors for one step over a stage with ``num_layers`` layers."""
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
    groups = [PrefillGroup(torch.cat(rows).to(device), len(rows), n) for n, rows in fresh.items()]
    valid = torch.arange(width)[None, :] < ctx[:, None]
    decode_mask = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))
    ends = torch.cumsum(torch.tensor(n_tokens), 0) - 1
    sample_rows = ends[[i for i, c in enumerate(chunks) if c.sample]]
    return StepMeta(
        positions=positions.to(device), write_slots=write_slots.to(device),
        block_tables=tables.to(device), decode_rows=ends[decode_idx].to(device),
        decode_chunks=torch.tensor(decode_idx, dtype=torch.int64).to(device),
        decode_mask=decode_mask[:, None, None, :].to(device), fresh_prefills=groups,
        prefills=prefills, sample_rows=sample_rows.to(device),
    )


def context_slots(tables: torch.Tensor, layer: int, width: int, page_size: int) -> torch.Tensor:
    """``[chunks, width]`` K slots of the first ``width`` tokens of each chunk's context."""
    pages = tables[:, layer, :-(-width // page_size)]
    ar = torch.arange(page_size, device=tables.device)
    return ((pages * 2 * page_size)[:, :, None] + ar).reshape(tables.shape[0], -1)[:, :width]
