"""A stand-in training module for the local launcher tests: records the torchrun environment of each rank.

``python -m _launch_probe OUT_DIR [--fail] [--sleep]`` writes ``OUT_DIR/rank<RANK>.json``; with ``--fail`` it
prints a message and exits with code 3 instead; with ``--sleep`` it first sleeps for a minute.
"""

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    out, fail = Path(argv[0]), "--fail" in argv
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    print(f"probe: rank {rank} of {world_size} starting", flush=True)
    if "--sleep" in argv:
        time.sleep(60)
    if fail:
        print(f"probe: rank {rank} fails on purpose", file=sys.stderr, flush=True)
        return 3
    info = {"rank": rank, "world_size": world_size, "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "argv": argv}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
