"""Training scripts of every common trainer, each recycled by one line (issue 22, item 2).

Each module holds a ``train(...)`` function: the script a user would write for
that trainer, where ``store`` switches on the one recycling line
``model = actstore.recycle(model, at, store)`` (``store=None``: the same script
without recycling).  Each returns a :class:`~actstore.examples.recycle.data.Run`:
the per-step losses and, for a recycled model, ``model.recycle_stats`` at the
end of each epoch.  ``python -m actstore.examples.recycle`` runs them all on
small models built from configs (and all-MiniLM-L6-v2 for sentence-transformers).

- :mod:`.hf_trainer`: ``transformers.Trainer`` on a task model (default data
  collator, default ``remove_unused_columns``);
- :mod:`.st_trainer`: ``SentenceTransformerTrainer`` with
  ``MultipleNegativesRankingLoss`` or ``CachedMultipleNegativesRankingLoss`` on
  (anchor, positive) text columns;
- :mod:`.accelerate_loop`: ``Accelerator.prepare`` and a loop;
- :mod:`.lightning_loop`: ``lightning.Trainer`` with a small ``LightningModule``;
- :mod:`.plain_loop`: a plain PyTorch loop.
"""
