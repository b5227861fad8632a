"""tools/bench.py's parts: the variants (data), the peer, preparing, timing, quality and the tables."""
