"""A pause for tests only: ``NOISY_STUDENT_TEST_PAUSE=<point>`` makes the process that reaches
that point wait there until it is killed.

tests/test_faults.py kills a round's driver inside each stage and checks that the rerun resumes
there. On test data some stages are too short to hit from outside: select takes milliseconds, and
the fine-tune and the final evaluation can both end between two of Ray Train's checkpoint polls
(2 s). And a kill is not instant for the training workers: Ray ends a dead driver's actors a
moment later, and until then they go on training and checkpointing. Points: ``select`` (the
driver, once the first file is rewritten), ``train`` (each training worker, once an epoch's
checkpoint is reported), ``finetune`` and ``evaluate`` (each training worker, as the phase
starts). Unset, as everywhere outside that test, a point costs one environment lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "NOISY_STUDENT_TEST_PAUSE"


def pause_point(point: str) -> None:
    if os.environ.get(ENV) == point:
        print(f"{point}: paused ({ENV}={point}, a test's hook) until killed", file=sys.stderr,
              flush=True)
        time.sleep(3600)
