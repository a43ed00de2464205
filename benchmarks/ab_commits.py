"""Run one benchmark against two commits, alternating, and compare the medians.

    .venv/bin/python benchmarks/ab_commits.py --base 33e8225 [--head HEAD] [--rounds 3] \\
        [--pattern 'median ([0-9.]+) ms'] -- benchmarks/decode_step.py --seqs 64 --steps 30

Each commit is checked out into a temporary git worktree, and the benchmark (this checkout's
copy of the script, so both sides take the same flags) runs with that worktree first on
PYTHONPATH, in this virtualenv: base, head, base, head, ... for --rounds rounds, so both see the
same machine. The C kernels build per worktree (their cache key is the sources). From each run
the last match of --pattern is the figure; prints every run's, the medians and head / base.
OMP_WAIT_POLICY defaults to PASSIVE, as the engine sets it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(commit: str, where: Path) -> Path:
    """A detached worktree of `commit` under `where`."""
    path = where / commit.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), commit],
        check=True,
    )
    return path


def run(tree: Path, command: list[str], pattern: re.Pattern[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    where = subprocess.run(  # from the worktree: `-c` puts the working directory first
        [sys.executable, "-c", "import headrace; print(headrace.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not where.startswith(str(tree)):
        raise SystemExit(f"headrace imported from {where}, not from the worktree {tree}")
    done = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True
    )
    found = pattern.findall(done.stdout + done.stderr)
    if done.returncode != 0 or not found:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-2000:])
        raise SystemExit(f"{' '.join(command)} at {tree.name}: exit {done.returncode}")
    return float(found[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--head", default="HEAD")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pattern", default=r"median ([0-9.]+) ms")
    p.add_argument("command", nargs="+", help="the benchmark script and its flags, after --")
    args = p.parse_args()
    pattern = re.compile(args.pattern)
    with tempfile.TemporaryDirectory(prefix="headrace-ab-") as tmp:
        trees = {name: worktree(commit, Path(tmp)) for name, commit in
                 (("base", args.base), ("head", args.head))}  # fmt: skip
        try:
            figures: dict[str, list[float]] = {"base": [], "head": []}
            for i in range(args.rounds):
                for name, tree in trees.items():
                    figures[name].append(run(tree, args.command, pattern))
                    print(f"round {i + 1} {name}: {figures[name][-1]}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    base, head = (statistics.median(figures[k]) for k in ("base", "head"))
    print(f"base {args.base}: median {base}   head {args.head}: median {head}")
    print(f"head / base: {head / base:.3f}")


if __name__ == "__main__":
    main()
