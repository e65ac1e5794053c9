"""`kata-py resume ID`: let a paused container's VM run again (QMP cont)."""

from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("resume", help="resume a paused container")
    add_id(parser)
    parser.set_defaults(func=cmd_resume)


def cmd_resume(args) -> int:
    from ..oci.container import resume

    resume(store(args), args.container_id)
    return 0
