"""One rank of a parallel ``mask2dit`` CLI run that fails for real after its first window (issue 27, item 9).

    python faulty_rank.py kill|hang STAMP -- demo --random-weights ... --ulysses-degree 2 --out DIR

Run with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, as torchrun sets them. On rank 1, once
the last denoising step of the first window is done (its `FinishedSceneWriter` callback has run), the process kills
itself (``kill``: SIGKILL) or stops answering (``hang``: SIGSTOP, until the test kills it), having written the time
it did so (``time.time()``) to the file STAMP. Every other rank runs the unchanged CLI.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from diffusers_mask2dit import cli
from diffusers_mask2dit.finished_scenes import FinishedSceneWriter

FAULTS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}


def fail_after_first_window(fault: str, stamp: str) -> None:
    """Make every `FinishedSceneWriter` of this process end it (``fault``) right after the first window."""
    original = FinishedSceneWriter.__call__

    def call(self, pipe, step, timestep, callback_kwargs):
        outputs = original(self, pipe, step, timestep, callback_kwargs)
        if self._window == 1:
            sys.stderr.flush()
            with open(stamp, "w") as handle:
                handle.write(repr(time.time()))
            os.kill(os.getpid(), FAULTS[fault])
        return outputs

    FinishedSceneWriter.__call__ = call


if __name__ == "__main__":
    fault, stamp, separator, *arguments = sys.argv[1:]
    assert fault in FAULTS and separator == "--", sys.argv
    if os.environ.get("RANK") == "1":  # under torchrun every rank runs this file; only rank 1 fails
        fail_after_first_window(fault, stamp)
    sys.exit(cli.main(arguments))
