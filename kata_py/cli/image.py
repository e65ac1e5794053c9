"""`kata-py image build|show`: the guest kernel + initramfs."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    image = sub.add_parser("image", help="build or show the guest image")
    image_sub = image.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND", required=True)
    build = image_sub.add_parser("build", help="build the guest image (cached by content)")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    build.set_defaults(func=cmd_build)
    show = image_sub.add_parser("show", help="print the current image's manifest as JSON")
    show.set_defaults(func=cmd_show)


def cmd_build(args) -> int:
    from ..image import build_image

    image = build_image(force=args.force, progress=sys.stderr.isatty())
    print(image.directory)
    return 0


def cmd_show(args) -> int:
    from ..errors import ImageError
    from ..image import find_image

    image = find_image()
    if image is None:
        raise ImageError("no guest image yet: run `kata-py image build`")
    print(json.dumps(image.manifest, indent=2, sort_keys=True))
    return 0
