#!/usr/bin/env python3
"""Write ebsfs's cut of botocore's EC2 model: the DescribeSnapshots operation and the
shapes it reaches, nothing else (ebsfs/service/models/README.md says why).

Run it after upgrading botocore when tests/test_ec2_model.py says the cut differs
from the installed model:

    .venv/bin/python scripts/trim_ec2_model.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import botocore.loaders

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ebsfs.service.session import EC2_API_VERSION, EC2_OPERATIONS, MODELS  # noqa: E402


def reachable_shapes(model: dict[str, Any], roots: list[str]) -> set[str]:
    """The shapes named by `roots` and every shape they refer to."""
    found: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        shape = model["shapes"][name]
        todo.extend(shape[key]["shape"] for key in ("member", "key", "value") if key in shape)
        todo.extend(member["shape"] for member in shape.get("members", {}).values())
    return found


def undocumented(value: Any) -> Any:
    """`value` without its "documentation" entries (docstrings ebsfs never shows)."""
    if isinstance(value, dict):
        return {k: undocumented(v) for k, v in value.items() if k != "documentation"}
    if isinstance(value, list):
        return [undocumented(v) for v in value]
    return value


def trimmed(model: dict[str, Any]) -> dict[str, Any]:
    """`model` with only EC2_OPERATIONS and their shapes, undocumented."""
    operations = {name: model["operations"][name] for name in EC2_OPERATIONS}
    roots = [op[part]["shape"] for op in operations.values() for part in ("input", "output")]
    shapes = reachable_shapes(model, roots)
    return undocumented(
        {
            "version": model["version"],
            "metadata": model["metadata"],
            "operations": operations,
            "shapes": {name: model["shapes"][name] for name in sorted(shapes)},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=MODELS / "ec2" / EC2_API_VERSION / "service-2.json",
        help="where to write it (default: the one ebsfs ships)",
    )
    target = parser.parse_args().output
    full = botocore.loaders.create_loader().load_service_model("ec2", "service-2", EC2_API_VERSION)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(trimmed(full), indent=1, sort_keys=True) + "\n")
    print(f"{target}: {target.stat().st_size} bytes")


if __name__ == "__main__":
    main()
