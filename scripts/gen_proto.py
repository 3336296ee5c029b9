#!/usr/bin/env python3
"""Regenerate the checked-in gRPC stubs under kvstore/v1/ from proto/.

Run: python scripts/gen_proto.py            (writes the stubs)
     python scripts/gen_proto.py --check    (exit 1 if the checked-in stubs are stale)
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["kvstore/v1/kvstore.proto", "kvstore/v1/admin.proto"]
OUT_FILES = [
    "kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py",
    "admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py",
]


def generate(out: Path) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in PROTOS:
        rc = protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'proto'}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(ROOT / "proto" / proto),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {rc})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        gen_dir = Path(tmp) / "kvstore" / "v1"
        stale = [f for f in OUT_FILES if not (ROOT / "kvstore/v1" / f).exists()
                 or not filecmp.cmp(gen_dir / f, ROOT / "kvstore/v1" / f, shallow=False)]
        if args.check:
            if stale:
                print(f"stale generated stubs: {stale}; run python scripts/gen_proto.py", file=sys.stderr)
                return 1
            print("generated stubs are up to date")
            return 0
        for f in OUT_FILES:
            (ROOT / "kvstore/v1" / f).write_bytes((gen_dir / f).read_bytes())
        print(f"wrote {', '.join(OUT_FILES)} to kvstore/v1/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
