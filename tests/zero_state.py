"""The whole ZeRO-1/2 training state of a DeepSpeed engine, independent of the world size (tests only).

Each rank lists what it holds through DeepSpeed's own links between a module parameter and its piece of the
flat fp32 partition (``_hp_mapping``): for every parameter and state key, ``(offset in the parameter, values)``.
:func:`assemble` joins the pieces of every rank into whole tensors, so states saved on one world size and
loaded on another can be compared exactly, without going through the checkpoint files being tested.
"""

from __future__ import annotations

from typing import Any

import torch


def rank_pieces(engine: Any) -> dict[str, dict[str, tuple[int, torch.Tensor]]]:
    """This rank's pieces: ``{param name: {"fp32" | state key: (offset, flat values)}}``, plus its buffers."""
    zero = engine.optimizer
    out: dict[str, dict[str, tuple[int, torch.Tensor]]] = {}
    for i, params in enumerate(zero.bit16_groups):
        flat = zero.single_partition_of_fp32_groups[i]
        state = zero.optimizer.state.get(flat, {})
        for p in params:
            m = p._hp_mapping
            if m is None:
                continue
            hp, lp = m.hp_fragment_address, m.lp_fragment_address
            entry = {"fp32": (lp.start, flat.detach().narrow(0, hp.start, hp.numel).clone())}
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    entry[key] = (lp.start, value.narrow(0, hp.start, hp.numel).clone())
                elif key == "step":
                    entry["step"] = (0, torch.as_tensor(value).clone().reshape(1))
            out[zero.param_names[p]] = entry
    for name, buf in engine.module.named_buffers():
        out["buffer:" + name] = {"value": (0, buf.detach().flatten().clone())}
    return out


def assemble(per_rank: list[dict[str, dict[str, tuple[int, torch.Tensor]]]]) -> dict[str, torch.Tensor]:
    """Whole flat tensors ``{"name/key": values}`` from every rank's pieces in rank order (each element exactly once;
    buffers: rank 0's)."""
    chunks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for pieces in per_rank:
        for name, entry in pieces.items():
            for key, (offset, values) in entry.items():
                chunks.setdefault(f"{name}/{key}", []).append((offset, values))
    out = {}
    for k, parts in chunks.items():
        if k.startswith("buffer:"):
            out[k] = parts[0][1]  # rank 0's, as DeepSpeed saves them (batch-norm statistics are per rank)
            continue
        if k.endswith("/step"):
            assert all(torch.equal(v, parts[0][1]) for _, v in parts), f"ranks disagree on {k}"
            out[k] = parts[0][1]
            continue
        parts.sort(key=lambda x: x[0])
        pos = 0
        for offset, values in parts:
            assert offset == pos, f"{k}: a gap or an overlap at {pos} (next piece starts at {offset})"
            pos += values.numel()
        out[k] = torch.cat([v for _, v in parts])
    return out
