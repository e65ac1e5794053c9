"""`kata-py spec`: write a starting config.json, as `runc spec` does."""

import json
import os

from ..errors import ConfigError
from ..oci.spec import default_spec


def add_parser(sub) -> None:
    parser = sub.add_parser("spec", help="create a new config.json in the bundle")
    parser.add_argument("--bundle", "-b", default=".")
    # Its own dest: the global --rootless (a value, "false" by default) shares the name.
    parser.add_argument("--rootless", action="store_true", dest="spec_rootless")
    parser.set_defaults(func=cmd_spec)


def cmd_spec(args) -> int:
    if args.spec_rootless:
        raise ConfigError("--rootless: rootless containers are not supported by kata-py")
    path = os.path.join(args.bundle, "config.json")
    if os.path.exists(path):
        raise ConfigError(f"File {path} exists. Remove it first")
    with open(path, "w") as f:
        json.dump(default_spec(), f, indent="\t")
        f.write("\n")
    return 0
