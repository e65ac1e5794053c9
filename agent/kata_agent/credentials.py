"""The process-level part of an OCI process spec, applied in the forked child
between the container set-up and exec, in runc's order.

    oom_score_adj, rlimits (both also before the container set-up: see early())
    umask
    seccomp filter (when no_new_privileges is off: loading it then needs
        CAP_SYS_ADMIN, so before the capabilities are dropped)
    drop the bounding set; keep capabilities across the user switch
    setgroups, setgid, setuid
    capset (effective, permitted, inheritable); raise ambient
    no_new_privileges
    seccomp filter (when no_new_privileges is on: as late as possible, so the
        filter need not allow the set-up's own system calls) - see pre_exec

Everything is checked and prepared in the agent (`validate`, `finalize`), so
the child only makes system calls: after the container's chroot no Python
module can be imported, and a mistake should surface as a clear error before
fork, not as a half set-up child. Only ctypes and `os`: the guest's trimmed
stdlib has no `resource` module.

A security dict (all keys optional):
    user          {"uid", "gid", "additional_gids"}
    umask         int
    rlimits       [{"type": "RLIMIT_NOFILE", "soft", "hard"}]
    capabilities  {"bounding", "effective", "inheritable", "permitted", "ambient": [names]}
                  absent: the capabilities stay as they are (the guest's root: all);
                  a set absent from a present dict is empty, as in OCI
    no_new_privileges  bool
    oom_score_adj int, -1000..1000
"""

from __future__ import annotations

import ctypes
import os

from kata_py.protocol.oci_names import CAPABILITIES

from .spawn import StepFailed

CAP_NUMBERS = {name: number for number, name in enumerate(CAPABILITIES)}
CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")

# include/uapi/asm-generic/resource.h (x86_64 uses the generic numbers).
RLIMITS = (
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS", "RLIMIT_NPROC",
    "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS", "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
)
RLIMIT_NUMBERS = {name: number for number, name in enumerate(RLIMITS)}
RLIM_MAX = 2**64 - 1  # RLIM_INFINITY

UMASK_MAX = 0o7777
OOM_SCORE_ADJ_RANGE = (-1000, 1000)
ID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to set*id(2)

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522

KEYS = ("user", "umask", "rlimits", "capabilities", "no_new_privileges", "oom_score_adj")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class _Rlimit(ctypes.Structure):
    _fields_ = [("rlim_cur", ctypes.c_uint64), ("rlim_max", ctypes.c_uint64)]


_libc = None


def _libc_functions():
    """prctl, capset, setrlimit, getrlimit from libc, typed; resolved once, in the agent."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        capset = libc.capset
        capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
        capset.restype = ctypes.c_int
        setrlimit = libc.setrlimit
        setrlimit.argtypes = [ctypes.c_int, ctypes.POINTER(_Rlimit)]
        setrlimit.restype = ctypes.c_int
        getrlimit = libc.getrlimit
        getrlimit.argtypes = [ctypes.c_int, ctypes.POINTER(_Rlimit)]
        getrlimit.restype = ctypes.c_int
        _libc = (prctl, capset, setrlimit, getrlimit)
    return _libc


def last_cap() -> int:
    """The highest capability the running kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return min(int(f.read()), len(CAPABILITIES) - 1)
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


def _current_soft(number: int) -> int:
    """The agent's soft limit: a forked child starts with it."""
    limit = _Rlimit()
    if _libc_functions()[3](number, limit) != 0:
        return 0
    return limit.rlim_cur


def _int(value, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in {low}..{high}, got {value!r}")
    return value


def _cap_mask(names, what: str) -> int:
    if not isinstance(names, list):
        raise ValueError(f"capabilities.{what}: expected a list of names, got {type(names).__name__}")
    mask = 0
    for name in names:
        number = CAP_NUMBERS.get(name) if isinstance(name, str) else None
        if number is None:
            raise ValueError(f"capabilities.{what}: unknown capability {name!r} "
                             f"(known: CAP_CHOWN .. {CAPABILITIES[-1]})")
        mask |= 1 << number
    return mask


class _Plan:
    """A checked security dict, in the shapes the child's system calls take."""

    def __init__(self, security: dict) -> None:
        if not isinstance(security, dict):
            raise ValueError(f"security: expected an object, got {type(security).__name__}")
        unknown = sorted(set(security) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown process fields {unknown}")
        self.user = self._user(security.get("user"))
        umask = security.get("umask")
        self.umask = None if umask is None else _int(umask, "umask", 0, UMASK_MAX)
        self.rlimits = self._rlimits(security.get("rlimits") or [])
        self.caps = self._caps(security.get("capabilities"))
        nnp = security.get("no_new_privileges", False)
        if not isinstance(nnp, bool):
            raise ValueError(f"no_new_privileges: expected a boolean, got {nnp!r}")
        self.no_new_privileges = nnp
        oom = security.get("oom_score_adj")
        self.oom_score_adj = None if oom is None else _int(oom, "oom_score_adj", *OOM_SCORE_ADJ_RANGE)

    @staticmethod
    def _user(user):
        if user is None:
            return None
        if not isinstance(user, dict):
            raise ValueError(f"user: expected an object, got {type(user).__name__}")
        gids = user.get("additional_gids", [])
        if not isinstance(gids, list):
            raise ValueError("user.additional_gids: expected a list")
        return (_int(user.get("uid"), "user.uid", 0, ID_MAX), _int(user.get("gid"), "user.gid", 0, ID_MAX),
                [_int(g, "user.additional_gids", 0, ID_MAX) for g in gids])

    @staticmethod
    def _rlimits(rlimits):
        if not isinstance(rlimits, list):
            raise ValueError("rlimits: expected a list")
        planned, seen = [], set()
        for index, item in enumerate(rlimits):
            where = f"rlimits[{index}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected an object")
            name = item.get("type")
            if name not in RLIMIT_NUMBERS:
                raise ValueError(f"{where}: unknown rlimit type {name!r}")
            if name in seen:
                # The runtime spec: an entry per type; two would silently pick one.
                raise ValueError(f"{where}: {name} is given twice")
            seen.add(name)
            soft = _int(item.get("soft"), f"{where}.soft", 0, RLIM_MAX)
            hard = _int(item.get("hard"), f"{where}.hard", 0, RLIM_MAX)
            if soft > hard:
                raise ValueError(f"{where}: {name} soft limit {soft} is above its hard limit {hard}")
            planned.append((name, RLIMIT_NUMBERS[name], _Rlimit(soft, hard)))
        return planned

    @staticmethod
    def _caps(caps):
        if caps is None:
            return None
        if not isinstance(caps, dict):
            raise ValueError(f"capabilities: expected an object, got {type(caps).__name__}")
        unknown = sorted(set(caps) - set(CAP_SETS))
        if unknown:
            raise ValueError(f"capabilities: unknown sets {unknown}")
        masks = {what: _cap_mask(caps.get(what, []), what) for what in CAP_SETS}
        if masks["effective"] & ~masks["permitted"]:
            raise ValueError("capabilities: effective has capabilities that permitted lacks: "
                             + ", ".join(_names(masks["effective"] & ~masks["permitted"])))
        # The kernel raises an ambient capability only if it is permitted and
        # inheritable; runc only warns about the others, so they are left out.
        masks["ambient"] &= masks["permitted"] & masks["inheritable"]
        return masks


def _names(mask: int) -> list[str]:
    return [name for number, name in enumerate(CAPABILITIES) if mask & (1 << number)]


def validate(security: dict) -> None:
    """Raise ValueError, with a message naming the field, for a security dict
    the child could not apply. Runs in the agent, before fork."""
    _Plan(security)


class Finalizer:
    """The child's half: `early()` before the container set-up, `finalizer()`
    right after it, `pre_exec` (None, or a callable) right before exec.

    early() is for what needs the guest's own view: /proc/self/oom_score_adj
    before any chroot, and CAP_SYS_RESOURCE of the initial user namespace
    (lost once the set-up enters a new one) to lower oom_score_adj or raise a
    hard rlimit. It sets each rlimit's hard limit but keeps the agent's soft
    one (if the new hard allows), so that a small RLIMIT_NOFILE cannot starve
    the set-up of descriptors; finalizer() then sets the soft limits, which
    needs no privilege. finalizer() runs early() itself if nobody did.
    """

    def __init__(self, security: dict, seccomp_filter=None) -> None:
        plan = _Plan(security)
        self._prctl, self._capset, self._setrlimit, _ = _libc_functions()
        self._get_errno = ctypes.get_errno
        self._plan = plan
        self._filter = seccomp_filter
        self._last_cap = last_cap()
        if plan.caps is not None:
            header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
            data = (_CapData * 2)()
            for word in range(2):
                shift = 32 * word
                data[word].effective = (plan.caps["effective"] >> shift) & 0xFFFFFFFF
                data[word].permitted = (plan.caps["permitted"] >> shift) & 0xFFFFFFFF
                data[word].inheritable = (plan.caps["inheritable"] >> shift) & 0xFFFFFFFF
            self._cap_args = (header, data)
            self._drop = [number for number in range(self._last_cap + 1)
                          if not plan.caps["bounding"] & (1 << number)]
            self._ambient = [number for number in range(self._last_cap + 1) if plan.caps["ambient"] & (1 << number)]
        self._oom_text = None if plan.oom_score_adj is None else str(plan.oom_score_adj).encode()
        self._early_limits = [(name, number, _Rlimit(min(_current_soft(number), limit.rlim_max), limit.rlim_max))
                              for name, number, limit in plan.rlimits]
        self._early_done = False
        self.pre_exec = seccomp_filter.load if seccomp_filter is not None and plan.no_new_privileges else None

    def _call(self, step: str, ret: int) -> None:
        if ret != 0:
            raise StepFailed(step, self._get_errno())

    def early(self) -> None:
        self._early_done = True
        if self._oom_text is not None:
            try:
                fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, self._oom_text)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise StepFailed("oom_score_adj", exc.errno or 0) from None
        for name, number, limit in self._early_limits:
            self._call(f"setrlimit {name}", self._setrlimit(number, limit))

    def __call__(self) -> None:
        plan, prctl = self._plan, self._prctl
        if not self._early_done:
            self.early()
        for name, number, limit in plan.rlimits:
            self._call(f"setrlimit {name}", self._setrlimit(number, limit))
        if plan.umask is not None:
            os.umask(plan.umask)
        if self._filter is not None and not plan.no_new_privileges:
            self._filter.load()
        if plan.caps is not None:
            for number in self._drop:
                self._call(f"drop {CAPABILITIES[number]} from the bounding set",
                           prctl(PR_CAPBSET_DROP, number, 0, 0, 0))
            # setuid away from 0 would clear the permitted set; capset sets it below.
            self._call("keep capabilities", prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0))
        if plan.user is not None:
            uid, gid, groups = plan.user
            try:
                os.setgroups(groups)
            except OSError as exc:
                raise StepFailed("setgroups", exc.errno or 0) from None
            try:
                os.setgid(gid)
            except OSError as exc:
                raise StepFailed("setgid", exc.errno or 0) from None
            try:
                os.setuid(uid)
            except OSError as exc:
                raise StepFailed("setuid", exc.errno or 0) from None
        if plan.caps is not None:
            self._call("clear keep capabilities", prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0))
            header, data = self._cap_args
            self._call("capset", self._capset(header, data))
            for number in self._ambient:
                self._call(f"raise ambient {CAPABILITIES[number]}",
                           prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, number, 0, 0))
        if plan.no_new_privileges:
            self._call("no_new_privileges", prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def finalize(security: dict | None, seccomp_filter=None) -> Finalizer:
    """Check and prepare a security dict (in the agent); the returned callable
    applies it in the child. Raises ValueError like `validate`."""
    return Finalizer(security or {}, seccomp_filter)
