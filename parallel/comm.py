"""Point-to-point exchange with neighbours in a process group, and a ledger of what was sent.

`exchange` talks to peers by rank; `route` delivers messages between pieces of the sequence
(`parallel.pieces`), copying those whose both ends live on this rank and packing one message per peer.

The ledger counts bytes sent per purpose ("attention", "fastweight_scan", "halo") and scan rounds,
so benchmarks report communication volume and tests can assert the number of rounds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.pieces import CPGroup


@dataclass
class CommLedger:
    bytes_sent: Counter = field(default_factory=Counter)
    rounds: Counter = field(default_factory=Counter)

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.rounds.clear()


LEDGER = CommLedger()


def exchange(group, send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor], purpose: str) -> None:
    """Send `send[peer]` to each peer and fill `recv[peer]` from each peer (group ranks), all at once."""
    ops = []
    for peer, tensor in send.items():
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), group=group, group_peer=peer))
        LEDGER.bytes_sent[purpose] += tensor.numel() * tensor.element_size()
    for peer, tensor in recv.items():
        ops.append(dist.P2POp(dist.irecv, tensor, group=group, group_peer=peer))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def route(
    cp: CPGroup, send: dict[tuple[int, int], torch.Tensor], recv: dict[tuple[int, int], torch.Tensor], purpose: str
):
    """Deliver `send[(src, dst)]` (src a piece of this rank) into `recv[(src, dst)]` (dst a piece of this
    rank) in place, for every (src piece, dst piece) message. Both ends list the messages between two
    ranks in the same sorted order, so one concatenated message per peer carries them."""
    me = cp.rank
    outgoing, incoming = defaultdict(list), defaultdict(list)
    for key in sorted(send):
        peer = cp.owner(key[1])[0]
        if peer == me:
            recv[key].copy_(send[key])
        else:
            outgoing[peer].append(send[key].reshape(-1))
    for key in sorted(recv):
        peer = cp.owner(key[0])[0]
        if peer != me:
            incoming[peer].append(recv[key])
    buffers = {peer: targets[0].new_empty(sum(t.numel() for t in targets)) for peer, targets in incoming.items()}
    exchange(cp.group, {peer: torch.cat(parts) for peer, parts in outgoing.items()}, buffers, purpose)
    for peer, targets in incoming.items():
        for target, part in zip(targets, buffers[peer].split([t.numel() for t in targets])):
            target.copy_(part.view(target.shape))
