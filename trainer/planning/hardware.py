"""The one table of GPU facts (the planners, the MFU of the GPU check and of the step-time model) and the links
between GPUs: data-sheet numbers, labelled.

    GPU        memory   dense bf16   HBM         NVLink (per GPU, each way)   network (per GPU)
    H100 SXM   80 GiB   989 TFLOP/s  3.35 TB/s   450 GB/s (NVLink 4)          400 Gb/s InfiniBand NDR = 50 GB/s
    H200 SXM   139 GiB  989 TFLOP/s  4.8 TB/s    450 GB/s (NVLink 4)          400 Gb/s InfiniBand NDR = 50 GB/s
    H100 PCIe  80 GiB   756 TFLOP/s  2.0 TB/s
    H100 NVL   93 GiB   835 TFLOP/s  3.9 TB/s
    H200 NVL   139 GiB  835 TFLOP/s  4.8 TB/s

(Data sheets; 139 GiB is what torch reports on an H200, 80 GiB what the memory planner has always planned an H100
with, 93 GiB the H100 NVL's 94 GB as torch would report it (assumed). The SXM parts are the planners' machines; the
others are here for their peak, the MFU denominator of whatever GPU a check runs on.)

A node holds `gpus_per_node` GPUs (8: DGX/HGX H100 and H200) joined by
NVLink through NVSwitches; each GPU has its own network card (rail-optimized, as in DGX SuperPOD). What the
collectives reach of these peaks is `Links.efficiency` (assumed, not measured: NCCL's bus bandwidth on large
messages is about 80% of the link), plus a latency per ring step or message (assumed: 5 us over NVLink, 10 us
across nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    peak_flops: float  # dense bf16 tensor-core FLOP/s (data sheet): the MFU denominator
    hbm_bytes_per_s: float  # data sheet


GPUS = {
    "h100": Gpu("H100 SXM", 80.0, 989e12, 3.35e12),
    "h200": Gpu("H200 SXM", 139.0, 989e12, 4.8e12),
    "h100-pcie": Gpu("H100 PCIe", 80.0, 756e12, 2.0e12),
    "h100-nvl": Gpu("H100 NVL", 93.0, 835e12, 3.9e12),
    "h200-nvl": Gpu("H200 NVL", 139.0, 835e12, 4.8e12),
}
# CUDA device names (upper-cased) -> GPUS key, the more specific first: "NVIDIA H100 80GB HBM3" is the SXM part.
_DEVICE_NAMES = (("H100 PCIE", "h100-pcie"), ("H100 NVL", "h100-nvl"), ("H200 NVL", "h200-nvl"), ("H200", "h200"),
                 ("H100", "h100"))  # fmt: skip


def gpu_of_device(name: str) -> str | None:
    """The GPUS key of a CUDA device name (`torch.cuda.get_device_name()`), None for a GPU the table lacks."""
    upper = name.upper()
    return next((kind for key, kind in _DEVICE_NAMES if key in upper), None)


@dataclass(frozen=True)
class Links:
    """Bandwidths per GPU and direction, bytes/s, and what the collectives reach of them."""

    nvlink: float = 450 * GB  # NVLink 4: 900 GB/s both ways per GPU (data sheet)
    network: float = 50 * GB  # one 400 Gb/s InfiniBand NDR card per GPU (data sheet)
    gpus_per_node: int = 8
    efficiency: float = 0.8  # assumed: NCCL's bus bandwidth on large messages
    nvlink_latency_s: float = 5e-6  # assumed, per ring step or message
    network_latency_s: float = 10e-6  # assumed, per ring step or message

    def ring_bandwidth(self, group: int, spans_nodes: bool) -> float:
        """Bus bandwidth of a ring collective (all-gather, reduce-scatter, all-reduce) over `group` ranks. Inside a
        node: NVLink. Across nodes NCCL runs one ring per rail, each crossing between nodes on its own card, so the
        ranks of a node share their cards: min(NVLink, members per node x card)."""
        if not spans_nodes:
            return self.efficiency * self.nvlink
        per_node = min(group, self.gpus_per_node)
        return self.efficiency * min(self.nvlink, per_node * self.network)

    def p2p_bandwidth(self, crosses_nodes: bool) -> float:
        """One message between two GPUs: NVLink, or one network card."""
        return self.efficiency * (self.network if crosses_nodes else self.nvlink)

    def latency(self, spans_nodes: bool) -> float:
        return self.network_latency_s if spans_nodes else self.nvlink_latency_s
