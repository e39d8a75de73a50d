"""The ``vllm-helix`` command line: :mod:`.cli` wires one module per verb.

``serve`` (vLLM's own server with Helix), ``plan`` (lives with the planner,
:mod:`vllm_helix.planner.command`), ``make-tiny-model`` (:mod:`.twins`, the offline
models), ``demo``, ``attention-demo`` and ``build-kernel``. Commands sit on top of
everything else: they may import the core, the planner and the harness; nothing in
the package imports them (``tests/test_import_graph.py``).
"""
