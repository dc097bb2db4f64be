"""Collective error handling: a failure on any rank is raised on every rank.

A rank that fails alone while the others go on into a collective leaves them waiting until the
process group's timeout. :func:`run_collectively` runs an action, gathers every rank's outcome,
and raises the same error on all ranks when any failed, preferring the message of a rank that
knows the root cause (an OSError) over the echoes of the others.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.api import CheckpointException

# What a failed action raises (torch's CheckpointException is a BaseException).
FAILURES = (Exception, CheckpointException)


def run_collectively(action, describe, error_type: type[Exception],
                     rank_zero_only: bool = False):
    """Run ``action`` (on every rank, or on rank 0 only); if it raised anywhere, raise
    ``error_type`` on every rank with ``describe(error)``, so no rank is left waiting in a
    collective. Returns the action's result (rank 0's when ``rank_zero_only``)."""
    result, error, report = None, None, None
    if not rank_zero_only or torch.distributed.get_rank() == 0:
        try:
            result = action()
        except FAILURES as caught:  # re-raised below, on every rank
            error = caught
            report = (root_os_error(caught) is not None, describe(caught))
    reports = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, report)
    failed = [r for r in reports if r is not None]
    if failed:
        # Prefer the ranks that know the root cause (an OSError) over their echoes.
        known = [text for cause_known, text in failed if cause_known] or [t for _, t in failed]
        message = "; ".join(dict.fromkeys(known))
        if error is not None:
            raise error_type(message) from error
        raise error_type(message)
    if rank_zero_only:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def root_os_error(error: BaseException | None) -> OSError | None:
    """The first OSError in ``error``'s cause chain, or in a torch checkpoint exception's
    per-rank failures."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return error
        for failure in getattr(error, "failures", {}).values():
            nested = root_os_error(failure[0] if isinstance(failure, tuple) else failure)
            if nested is not None:
                return nested
        error = error.__cause__ or error.__context__
    return None
