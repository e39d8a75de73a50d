"""Communication times on a two-level fabric (NVLink domain, scale-out network).

Every collective of a decode step is built from one primitive, :func:`exchange_time`:
each rank of a group sends ``bytes_per_peer`` to each of its peers at once. On a
switched scale-up fabric (NVSwitch) a GPU reaches every peer directly, so one
such phase costs one message latency plus the bytes through the GPU's own link;
peers in other domains are reached over the slower scale-out link in parallel.
All-to-all, gather to a root group, broadcast from it, MoE dispatch/combine and
pipeline sends are single phases; all-reduce is the cheapest of one-shot,
two-shot (reduce-scatter + all-gather) and, across domains, the hierarchical
scheme. Times are per GPU and assume no contention beyond the GPU's own link.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_helix.planner.hardware_spec import HardwareSpec

ArrayLike = np.ndarray | float


@dataclass(frozen=True)
class GroupPlacement:
    """How the peers of one communicating group sit relative to one member.

    ``local_peers`` share the member's scale-up domain, ``remote_peers`` do not.
    """

    size: int
    local_peers: int
    remote_peers: int


def place_group(size: int, stride: int, gpus_per_domain: int) -> GroupPlacement:
    """Peers of a group whose members are ``stride`` ranks apart in a contiguous rank order.

    An instance spanning several domains is laid out rank by rank, ``gpus_per_domain``
    ranks per domain, so a group along an inner axis (small stride) stays inside a
    domain while a group along an outer axis fans out over domains.
    """
    if size <= 1:
        return GroupPlacement(1, 0, 0)
    members_per_domain = max(1, min(size, gpus_per_domain // max(stride, 1)))
    return GroupPlacement(size, members_per_domain - 1, size - members_per_domain)


def exchange_time(bytes_per_peer: ArrayLike, group: GroupPlacement, hw: HardwareSpec) -> ArrayLike:
    """One phase in which every member sends ``bytes_per_peer`` to every peer."""
    time: ArrayLike = 0.0
    if group.local_peers:
        up = hw.scale_up
        time = up.latency + group.local_peers * np.asarray(bytes_per_peer) / up.bandwidth
    if group.remote_peers:
        out = hw.link_between_domains()
        time = np.maximum(time, out.latency + group.remote_peers * np.asarray(bytes_per_peer) / out.bandwidth)
    return time


def all_reduce_time(message_bytes: ArrayLike, group: GroupPlacement, hw: HardwareSpec) -> ArrayLike:
    """Sum a ``message_bytes`` buffer over the group, leaving the result on every member.

    One-shot (each member reads every peer's whole buffer) wins for the small
    messages of low-batch decode; two-shot moves ``2 (n-1)/n`` of the buffer and
    wins for large ones; across domains the hierarchical form sends only ``1/g``
    of the buffer over the slow link.
    """
    if group.size <= 1:
        return np.zeros_like(np.asarray(message_bytes, dtype=float))
    message = np.asarray(message_bytes, dtype=float)
    one_shot = exchange_time(message, group, hw)
    two_shot = 2 * exchange_time(message / group.size, group, hw)
    best = np.minimum(one_shot, two_shot)
    if group.remote_peers and group.local_peers:
        per_domain = group.local_peers + 1
        domains = group.size // per_domain
        inside = GroupPlacement(per_domain, per_domain - 1, 0)
        across = GroupPlacement(domains, 0, domains - 1)
        hierarchical = (2 * exchange_time(message / per_domain, inside, hw)
                        + 2 * exchange_time(message / (per_domain * domains), across, hw))
        best = np.minimum(best, hierarchical)
    return best
