"""Timing small kernels on the GPU: capture many launches in one CUDA graph and time its replays with
events, so launch gaps and host overhead stay out of the per-launch figure (METHOD.md)."""

from __future__ import annotations

import statistics

import torch


def time_graph(fn, launches: int = 20, trials: int = 11) -> float:
    """Median seconds per launch. fn(i) makes launch i (i lets callers rotate inputs so L2 can't hold them)."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000 / launches)
    return statistics.median(times)


def replay_us(graph: torch.cuda.CUDAGraph, replays: int = 64, trials: int = 7) -> float:
    """Median µs per replay of an already captured graph, over `trials` runs of back-to-back replays."""
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / replays)
    return statistics.median(times)
