"""Run by the *guest's* Python (the extracted Debian python3.11) on the host.

It is executed as a script, never imported by kata-py, and uses only the
stdlib, because it runs inside the extracted interpreter with PYTHONHOME
pointing at the extraction.

  record  : import the agent and extra modules, print the stdlib files loaded
  compile : byte-compile files with the interpreter that will run them
"""

import importlib
import importlib.util
import json
import os
import py_compile
import sys
import traceback


def record(req):
    stdlib = os.path.realpath(req["stdlib_dir"])
    sys.path[:0] = req["sys_path"]
    failed = {}
    for name in req["required"]:
        # A failure here means the guest agent could not start: report it.
        importlib.import_module(name)
    for name in req["optional"]:
        try:
            importlib.import_module(name)
        except Exception:
            failed[name] = traceback.format_exc(limit=1).strip().splitlines()[-1]
    files = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f:
            continue
        real = os.path.realpath(f)
        if real.startswith(stdlib + os.sep) and os.path.isfile(real):
            files.add(os.path.relpath(real, stdlib))
    builtins = sorted(sys.builtin_module_names)
    json.dump({"files": sorted(files), "failed": failed, "builtins": builtins,
               "version": sys.version}, sys.stdout)


def compile_all(req):
    mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
    for src, guest_path in req["files"]:
        for opt in req["optimize"]:
            level = "" if opt == 0 else opt
            cfile = importlib.util.cache_from_source(src, optimization=level)
            py_compile.compile(src, cfile=cfile, dfile=guest_path, doraise=True,
                               optimize=opt, invalidation_mode=mode)


def main():
    req = json.load(sys.stdin)
    {"record": record, "compile": compile_all}[sys.argv[1]](req)


if __name__ == "__main__":
    main()
