"""lm-evaluation-harness tasks on the shipped NQ-open data, prompted and scored as meft_ds
prompts and scores them (``lm_eval --include_path`` this directory; see
:mod:`meft_ds.integrations.lm_eval`)."""
