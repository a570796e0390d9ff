"""Swaps parts under loads (``python -m harness.chaos.rewriter ROOT MODE COUNT``): replaces one of the ``COUNT``
parts of version ``p00001`` with the same part of ``p00002`` (same size and header, other data), then puts it
back, again and again until it is killed. Prints ``ready`` before the first swap.

``MODE`` is how a part is replaced: ``overwrite`` (the same inode, rewritten from byte 0), ``rename`` (a new file
renamed over the old one) or ``object`` (an object store: a new object under the same key).
"""

from __future__ import annotations

import os
import random
import sys
import time

import storage


def main(root: str, mode: str, count: int) -> None:
    fs, path = storage.open_fs(root)
    names = [f"model_state.tp0.p00001.part{i}.pdparams" for i in range(count)]
    mine = [fs.cat_file(f"{path}/{n}") for n in names]
    theirs = [fs.cat_file(f"{path}/{n.replace('p00001', 'p00002')}") for n in names]

    def put(i: int, data: bytes) -> None:
        target = f"{path}/{names[i]}"
        if mode == "overwrite":
            with open(target, "r+b") as f:
                f.write(data)
        elif mode == "rename":
            with open(target + ".tmp", "wb") as f:
                f.write(data)
            os.replace(target + ".tmp", target)
        else:
            fs.pipe_file(target, data)

    print("ready", flush=True)
    rng = random.Random(7)
    while True:
        i = rng.randrange(count)
        put(i, theirs[i])
        time.sleep(rng.uniform(0, 0.002))
        put(i, mine[i])
        time.sleep(rng.uniform(0, 0.004))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
