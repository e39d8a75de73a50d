"""Process and machine harness shared by the commands, the benchmarks and the tests.

:mod:`.server` starts, queries and always stops a vLLM OpenAI server in a child
process; :mod:`.split` runs three of them as a prefill/decode split behind the vLLM
project's router; :mod:`.spawn` runs a function on N local gloo ranks with timeouts and
teardown; :mod:`.machine` names the CPU a number was measured on and times calls.
None of it is on the decode path, and it imports nothing from vLLM (vLLM runs as a
subprocess).
"""
