"""The GPU check (issue 31 item 7), for the GPU machine the device tool lends as it is: its own
Python 3.12, torch and transformers, no network, no tritonserver, 64 MiB per call.

- ``prepare`` (here): the wheels it lacks (``wheels``) into ``.whl/``, the size check, the call to make;
- ``__main__`` (there, or ``--device cpu`` for the dry run): the phases under one budget, each a
  process of its own: the checkpoint built (tools.tiny_checkpoint), transformers' fp32 answers
  (``reference``), the engine's against them and its load figures (``engine_phase``), on the
  requests of ``prompts``. docs/full-size.md says how to run it and what it reports.
"""
