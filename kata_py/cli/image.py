"""`kata-py image build|show`: the guest kernel + initramfs."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    image = sub.add_parser("image", help="build or show the guest image")
    image_sub = image.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND", required=True)
    build = image_sub.add_parser("build", help="build the guest image (cached by content)")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    show = image_sub.add_parser("show", help="print the current image's manifest as JSON")
    for command in (build, show):
        command.add_argument("--kernel", choices=("sandbox", "debian"), default=None,
                             help="the project's guest kernel (default, or $KATA_PY_GUEST_KERNEL) "
                                  "or Debian's generic kernel with modules")
    build.set_defaults(func=cmd_build)
    show.set_defaults(func=cmd_show)


def cmd_build(args) -> int:
    from ..image import build_image

    # Progress always: a rich display on a terminal, a line per step (and per
    # tenth of the kernel build) in a log.
    image = build_image(force=args.force, progress=True, variant=args.kernel)
    print(image.directory)
    return 0


def cmd_show(args) -> int:
    from ..errors import ImageError
    from ..image import find_image

    image = find_image(variant=args.kernel)
    if image is None:
        raise ImageError("no guest image yet: run `kata-py image build`")
    print(json.dumps(image.manifest, indent=2, sort_keys=True))
    return 0
