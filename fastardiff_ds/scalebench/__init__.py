"""NextStep-shaped networks with random weights, timed on this project's own kernels (issue 26).

- ``shapes``: the NextStep-1.1 / 1-Large preset scaled in width and depth, built with random weights (no files),
  and the bytes a shape needs on a device (refused before allocation when they do not fit).
- ``calls``: per-call costs (target decode / verify, draft decode, head chains, prefill) at several KV lengths.
- ``glue``: the loops' own work between those calls (per plain-loop token, per speculative round), timed with
  every model call answered from a cache.
- ``replay``: per-image runs: the real baseline / dmd loops, and fastardiff rounds replayed with a fixed accept
  pattern from the public model calls (same kernels as speculative.py, no quality claim).
- ``costmodel``: the analytic per-image cost from the per-call costs, break-even acceptances.

launcher/bench_scale.py runs them and writes one JSON.
"""
