"""The deployment planner behind ``vllm-helix plan``: a decode cost model and layout search.

Pure Python + numpy (matplotlib only for plots); no vLLM, no torch. The package is
split by what each part decides:

* ``model_spec``, ``hardware_spec``, ``precision``: what is being run, on what;
* ``layouts``: the strategies (TP, TP x PP, DP attention + EP, Medha-style KVP,
  Helix), which layouts are valid, and the command that serves each;
* ``loads``, ``collectives``, ``cost``: bytes, FLOPs and messages of each operation
  of a decode step, and the step's TTL with a per-term breakdown;
* ``search``, ``pareto``, ``recommend``: every layout at every batch size, the
  frontiers, the paper's comparisons, the answer under a TTL budget;
* ``disagg``, ``energy``: prefill:decode sizing and tokens per joule;
* ``plots``, ``command``: the Pareto plot and the CLI verb.

This ``__init__`` imports nothing, so ``vllm-helix --help`` does not pay for numpy.
See ``docs/planner.md`` for every formula and assumption.
"""
