#!/usr/bin/env python3
"""Run mypy --strict over the whole package, codecs/ and connectors/ included.

codecs/ and connectors/ install as kvstore.codecs and kvstore.connectors
(setuptools package-dir mapping), which mypy cannot follow through an
editable install.  This builds a temporary tree of symlinks with the
installed layout and runs mypy on it with the project's configuration.

Run: python scripts/typecheck.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"codecs": "codecs", "connectors": "connectors"}


def build_tree(dst: Path) -> None:
    pkg = dst / "kvstore"
    pkg.mkdir()
    for entry in (ROOT / "kvstore").iterdir():
        if entry.name in MAPPED or entry.name == "__pycache__":
            continue
        (pkg / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        if (ROOT / folder).is_dir():
            (pkg / name).symlink_to(ROOT / folder)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kvstore-mypy-") as tmp:
        build_tree(Path(tmp))
        cmd = [
            sys.executable, "-m", "mypy",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(ROOT / ".mypy_cache"),
            "-p", "kvstore",
        ]
        env = {**os.environ, "MYPYPATH": tmp}
        return subprocess.run(cmd, cwd=tmp, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
