"""MEFT's sparse adapter with real CPU offload (``--method sparse``).

Pieces, in the order a micro-batch meets them:

- :mod:`~meft_ds.sparse.options`: options and the resolved sizes (rank ``r``, ``N``
  experts of ``r/N`` rows, ``E`` experts per token, top-K keys per token).
- :mod:`~meft_ds.sparse.store`: the CPU row store (keys, values, Adam moments, per-row
  step counts), never part of the engine's module.
- :mod:`~meft_ds.sparse.router`: Key-Experts selection on the CPU (score each token only
  against its experts' keys, keep its top-K, unite the batch's rows).
- :mod:`~meft_ds.sparse.adapter`: the module beside each FFN (the router is its only
  engine parameter; the working set of rows is fetched per micro-batch; its backward
  sends the rows' gradient to the store).
- :mod:`~meft_ds.sparse.runtime`: ties the store to the following three, keeps the
  hot-row caches and the prefetch worker;
  :mod:`~meft_ds.sparse.transfer`: rows to the device (pinned staging on a GPU), the rows'
  gradients back to the host; :mod:`~meft_ds.sparse.step`: the store's optimizer step
  (clipping, loss scale); :mod:`~meft_ds.sparse.counters`: the per-step figures.
- :mod:`~meft_ds.sparse.optim`: row-sparse lazy AdamW (DeepSpeedCPUAdam kernel or torch).

The method itself (hooks into the model, engine integration, checkpoints, export) is
:mod:`meft_ds.methods.sparse`.
"""
