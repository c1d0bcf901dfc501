"""The store's machinery, by concern (docs/ARCHITECTURE.md).

- :mod:`actstore.engine.commit` — **the commit**: the one place a manifest is published.
- :mod:`actstore.engine.write` — the write path: checking a batch (``validate``),
  writing segment files (``segments``), the key set of pending keys (``keyset``),
  and a handle's writer state (``writer``).
- :mod:`actstore.engine.read` — the read path: memory maps (``maps.map_rows``,
  the one zero-copy function), segments and the snapshot (``snapshot``), the
  gathers (``gather``), per-segment read plans (``plans``), and the rows that
  must be decoded or fetched (``compressed``, ``zarrread``, ``prefetch``).
- :mod:`actstore.engine.lifecycle` — what happens to a store as a whole: opening
  and creating (``opening``), compaction, ``verify``, clone and delete
  (``storeops``), ``info``.
"""
