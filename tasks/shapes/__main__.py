"""`python -m tasks.shapes ROOT [--seed N]`: write the default world under ROOT and print its stats."""

from __future__ import annotations

import argparse
import json
import time

from . import world


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.shapes", description=world.__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    w = world.generate_world(world.WorldConfig(seed=args.seed))
    t1 = time.perf_counter()
    world.write_world(w, args.root)
    t2 = time.perf_counter()
    print(json.dumps(world.world_stats(w), indent=1))
    print(f"vocabulary: {len(world.vocabulary(w))} words; generate {t1 - t0:.2f} s, write {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
