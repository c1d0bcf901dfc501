"""The read path: memory maps (``maps``), the snapshot (``snapshot``), gathers (``gather``) and read plans (``plans``)."""
