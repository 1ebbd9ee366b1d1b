"""The installed versions that differ from the lock: what `make test-latest` tries, before its tests run.

    python scripts/lock_diff.py requirements/dev.lock
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def read_lock(path: Path) -> dict[str, str]:
    """name (normalized) -> pinned version, from a requirements file of ``name==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}


def main(lock: str) -> None:
    pins, have = read_lock(Path(lock)), installed()
    rows = [(n, pins[n], have.get(n, "not installed")) for n in sorted(pins) if have.get(n) != pins[n]]
    rows += [(n, "not locked", have[n]) for n in sorted(set(have) - set(pins))
             if n not in ("pip", "posequant", "torch") and not n.startswith("nvidia-")]
    if not rows:
        print(f"every package is at its {lock} version")
        return
    width = max(len(r[0]) for r in rows)
    print(f"differs from {lock}:")
    for name, locked, now in rows:
        print(f"  {name:<{width}}  {locked:>14} -> {now}")


if __name__ == "__main__":
    main(*sys.argv[1:])
