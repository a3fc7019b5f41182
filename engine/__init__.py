"""The project's inference engine: the FastChat-compatible worker process and what it runs. Imports nothing
from launch/ (it gets every setting on its command line).

- worker.py:       the worker process (FastChat's worker protocol; settings from argv only).
- protocol.py:     the worker protocol's error chunks and the workers' option defaults.
- select.py:       which engine a model gets (batching when it accepts the engine's call, else serial).
- batching.py:     the decode loop: one thread, one left-padded batch whose rows join and leave.
- prefill.py:      prompts admitted together, a shared beginning computed once.
- prefix_cache.py: finished requests' keys and values, for prompts that begin like them.
- kv_cache.py:     the batch's cache, grown in place.
- model_inputs.py: what a model's forward accepts (a ready attention mask).
- params.py:       FastChat's request dict -> typed sampling/stop parameters, and per-row token choice.
- text.py:         incremental detokenization and stop strings.
- serial.py:       one request at a time through an adapter's own generate function.
- thread.py:       the model-owning thread both engines run on.
- kernels/:        linear layers, attention and fused ops on the C sources in kernels/csrc/ or oneDNN.
- host/:           facts of the host: CPU flags and dtype, the core lease between workers, huge pages.
"""
