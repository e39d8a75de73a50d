"""Named ranges for the PyTorch profiler that cost nothing when no profiler runs.

``torch.profiler.record_function`` costs about 11 us per range even with no
profiler active (measured on the 2-core Xeon here); a Helix layer opens six of
them, which is a visible share of a 4K-token decode step. :func:`hop` opens the
range only while a profiler is recording (``benchmarks/decode_step_profile.py``
reads the ``helix/...`` ranges), and is a no-op context otherwise (~1 us).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.profiler import record_function

_NOTHING = nullcontext()


def hop(name: str) -> AbstractContextManager[object]:
    """``record_function(name)`` while the profiler records, else a shared no-op context."""
    if torch.autograd._profiler_enabled():
        return record_function(name)
    return _NOTHING
