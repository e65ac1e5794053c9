"""Small pieces the OCI subcommands share."""

from __future__ import annotations

from ..oci.state import StateStore


def store(args) -> StateStore:
    return StateStore(args.root)


def add_id(parser) -> None:
    parser.add_argument("container_id", metavar="CONTAINER_ID")
