"""``python -m mm_pipelines.serving.verify BUNDLE_DIR``: load a bundle in this (fresh)
process with the serving runtime only, run the fixed inputs of ``verify/`` and print the
max abs difference per check against the training-side outputs, as one JSON line.

``--unsealed`` is the exporter's own check, before the manifest exists; without it the
manifest checksums are verified first and exceeding a recorded bound exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm_pipelines.serving.verify")
    parser.add_argument("bundle_dir")
    parser.add_argument("--unsealed", action="store_true", help="no manifest yet (exporter)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny inputs; never compete with training on shared cores
    from mm_pipelines.serving.manifest import BundleIntegrityError
    from mm_pipelines.serving.runtime import ServingModels

    try:
        models = ServingModels.load(args.bundle_dir, verify=not args.unsealed, audio=False)
        diffs = models.self_check()
        if not args.unsealed:
            models.check_bounds(diffs)
    except BundleIntegrityError as err:
        print(f"bundle refused: {err}", file=sys.stderr)
        return 2
    print(json.dumps(diffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
