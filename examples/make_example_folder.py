"""Write the small generated "private" folder used by the smoke preset and the examples.

    python examples/make_example_folder.py                 # → examples/private_faces/
    python examples/make_example_folder.py /tmp/faces --people 20 --images 5 --size 128

The faces are drawn procedurally (no real person), one sub-folder per person, so the folder also
works with ``--privacy-unit folder``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spti.testing.example_images import write_example_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "output",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parent / "private_faces",
        help="folder to write",
    )
    parser.add_argument("--people", type=int, default=6, help="number of people (sub-folders)")
    parser.add_argument("--images", type=int, default=4, help="images per person")
    parser.add_argument("--size", type=int, default=64, help="side of each square PNG, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawing (same seed, same files)")
    args = parser.parse_args()
    root = write_example_folder(
        args.output, num_people=args.people, images_per_person=args.images, size=args.size, seed=args.seed
    )
    total = sum(f.stat().st_size for f in root.rglob("*.png"))
    print(f"wrote {args.people * args.images} images ({total / 1024:.0f} KiB) under {root}")


if __name__ == "__main__":
    main()
