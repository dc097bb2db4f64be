"""The exact-resume check every trainer's e2e test makes: 4 steps straight equal 2 steps, a
restart, and 2 more steps, loss for loss, and the resumed run's metrics log holds each step once."""

import json
from pathlib import Path


def assert_exact_resume(straight: list[dict], first: list[dict], second: list[dict],
                        resumed_dir: Path) -> list[float]:
    """The straight run's losses, after checking the resumed run reproduced them."""
    assert len(first) == 2 and len(second) == 2  # the second run started at step 2
    losses = [m["loss"] for m in straight]
    assert losses == [m["loss"] for m in first + second]
    assert len(set(losses)) == 4  # the steps really differ
    logged = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text()
              .splitlines()]
    assert [(r["step"], r["loss"]) for r in logged] == list(enumerate(losses, start=1))
    return losses
