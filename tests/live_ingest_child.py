"""A live ingestor in its own process, for the crash test (which SIGKILLs it mid-stream).

    QMACHINA_TEST_LIVE_KEY=... python -m tests.live_ingest_child PORT ROOT SESSION START SYMBOL...

The key comes from the environment so it never shows in the process list. The process ingests
until it is killed.
"""

from __future__ import annotations

import os
import sys

from pydantic import SecretStr

from qmachina.live.bronze import Bronze
from qmachina.live.ingest import LiveIngestor, LiveTarget, ReconnectPolicy

KEY_VARIABLE = "QMACHINA_TEST_LIVE_KEY"
DATASET = "GLBX.MDP3"


def main(argv: list[str]) -> None:
    port, root, session, start, *symbols = argv
    target = LiveTarget(
        host="127.0.0.1",
        port=int(port),
        dataset=DATASET,
        symbols=tuple(symbols),
        key=SecretStr(os.environ[KEY_VARIABLE]),
    )
    bronze = Bronze.open(root, session)
    policy = ReconnectPolicy(initial_seconds=0.02, max_seconds=0.2)
    LiveIngestor(
        target, bronze, policy=policy, watchdog_seconds=2.0, session_start=int(start)
    ).run()


if __name__ == "__main__":
    main(sys.argv[1:])
