"""Continuous batching for the project's FastChat-compatible worker (engine/worker.py).

- params.py: FastChat's request dict -> typed sampling/stop parameters, and per-row token choice.
- text.py:   incremental detokenization (no re-decoding of the whole output) and stop strings.
- engine.py: the decode loop: one thread, one left-padded batch whose rows join and leave.
- serial.py: one request at a time through an adapter's own generate function.
- thread.py: the model-owning thread both engines run on.
- kernels.py, cores.py: linear layers on faster kernels (linear.c, oneDNN), and the core lease between workers.
- select.py: which engine a model gets.
"""
