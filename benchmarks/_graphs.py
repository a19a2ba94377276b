"""CUDA-graph timing with the inputs read from HBM, shared by the GPU benchmarks (needs only torch).

A serving decode step replays a captured graph, and a model's layers each read their own weights and
KV cache from HBM. A benchmark that replays one call on one input measures it with the input in the
50 MB L2 of an H100/H200 instead, which flatters whatever reads less than ~50 MB. So each graph here
holds CALLS calls cycling through enough copies of the input (`copies_for`) that every call misses L2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ROTATE_BYTES = 256 << 20  # input copies per graph: at least this much, 5x the L2
CALLS = 32  # calls per graph replay, cycling through the copies


def copies_for(nbytes: int, rotate_bytes: int = ROTATE_BYTES) -> int:
    """How many copies of an input of `nbytes` one graph cycles through (at least 2)."""
    return max(2, -(-rotate_bytes // max(1, nbytes)))


def graph_ms(fns: list[Callable], check: Callable | None = None, calls: int = CALLS) -> float:
    """Median ms per call of `calls` calls (at least one per function) cycling through `fns`, replayed
    from one CUDA graph. `check` (optional) gets the output of the graph's last call and its index in
    `fns` after the replays: the graph's own result, not an eager rerun's."""
    calls = max(calls, len(fns))  # every copy read once per replay, or the unread ones do not rotate
    for fn in fns:
        fn()  # compile / allocate outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            last = fns[i % len(fns)]()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    if check is not None:
        check(last, (calls - 1) % len(fns))
    return sorted(times)[len(times) // 2]
