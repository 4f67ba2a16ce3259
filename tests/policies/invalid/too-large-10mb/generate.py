"""Writes this case's policy to the path given: a 10 MB policy (a valid one but for its size)."""
import sys

with open(sys.argv[1], "w") as f:
    f.write('{"version": 1, "audit": {"path": "')
    f.write("a" * (10 * 1024 * 1024))
    f.write('"}}\n')
