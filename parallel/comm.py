"""Point-to-point exchange with neighbours in a process group, and a ledger of what was sent.

The ledger counts bytes sent per purpose ("attention", "fastweight_scan", "halo") and scan rounds,
so benchmarks report communication volume and tests can assert the number of rounds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
