"""The one error type of the planner.

Every bad input (unknown preset, indivisible heads, a context that fits on no
layout, a dtype the GPU has no FLOP rate for) raises :class:`PlannerError` with a
message that names the violated constraint and a way out, so the CLI can print it
as-is and exit 2 instead of showing a traceback.
"""

from __future__ import annotations


class PlannerError(ValueError):
    """Bad planner input; the message names the constraint and a fix."""
