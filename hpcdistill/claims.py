"""Who owns a directory on the shared filesystem: one job per RUN_DIR, one codistillation per exchange
dir, one job per group of a codistillation (its `group-<g>/` in the exchange dir).

`flock` is unreliable on NFS and Lustre (often off, or local to a node), so a claim is a file created
with O_CREAT|O_EXCL (atomic on NFSv3+ and Lustre) holding the holder's job id, host, pid and run id;
a background thread refreshes its modification time (the heartbeat) every HEARTBEAT seconds. A claim
is stale when its heartbeat is older than STALE_AFTER, when its holder was on this host and that pid
is gone, or when it is this very Slurm job (requeued: the earlier incarnation is dead); a stale claim
is taken over with a warning. Only world rank 0 of a job touches claims.

A group's claim is also how its peers, possibly in other jobs, know it is alive: a peer whose claim is
dead (no heartbeat for STALE_AFTER, or its process gone on this host) is not waited for.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from hpcdistill.config import ConfigError
from hpcdistill.log import get_logger

log = get_logger("claims")

RUN_CLAIM = ".hpcdistill-claim.json"        # in RUN_DIR: the job that uses it
EXCHANGE_CLAIM = ".exchange-claim.json"     # in the exchange directory: the codistillation that uses it
GROUP_CLAIM = ".group-claim.json"           # in the exchange directory's group-<g>/: the job training group g
HEARTBEAT = 20.0
STALE_AFTER = 120.0  # 6 missed heartbeats: the holder is gone (or its node is)


def holder_info(run_id: str, **extra) -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    return {"run_id": run_id, "job": job, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.time(), **extra}


class ClaimError(ConfigError):
    """The directory is held by a live job (exit 2)."""


class Claim:
    """An exclusive claim on `path` (a file), or a shared one: holders whose `share_key` value equals
    the claim's may join it (codistilling jobs with one HPCDISTILL_EXCHANGE_ID)."""

    def __init__(self, path: Path, info: dict, *, what: str, share_key: str | None = None,
                 remedy: str | None = None, members=None):
        self.path, self.info, self.what, self.share_key = Path(path), info, what, share_key
        self.remedy = remedy
        self.members = members  # shared claims: members(holder) -> a live job that joined it, or None
        self.held = False
        self.note = ""  # what happened on acquire (took over a stale claim, joined ...), for the log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, holder: dict, beat: float) -> str | None:
        why = _dead(holder, beat)
        if why:
            return why
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("job") == job and holder.get("pid") != os.getpid():
            return f"it is this job's ({job}) earlier start (requeued)"
        return None

    def acquire(self) -> None:
        """Take the claim, join a shared one, or raise ClaimError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race with another job taking over a stale claim: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = read_claim(self.path)
                if found is None:
                    continue
                holder, beat = found
                if self.share_key and holder.get(self.share_key) == self.info.get(self.share_key):
                    self.note = f"joined the {self.what} held by {_who(holder)}"
                    self._start_heartbeat()
                    return
                why = self._stale(holder, beat)
                member = self.members(holder) if why and self.members else None
                if member:  # the job that took the claim is gone, but others that joined it are not
                    holder, beat, why = member, time.time(), None
                if why is None:
                    raise ClaimError(f"{self.what} {self.path.parent} is in use by {_who(holder)} (claim "
                                     f"{self.path}, heartbeat {time.time() - beat:.0f} s ago); "
                                     f"{self._remedy(holder)}")
                self.note = f"took over the stale claim of {_who(holder)} ({why})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.info, fh)
            self.held = True
            self._start_heartbeat()
            return
        raise ClaimError(f"{self.what} {self.path.parent}: could not take the claim {self.path} (another job "
                         "keeps taking it); choose another directory")

    def _remedy(self, holder: dict) -> str:
        if self.remedy:
            return self.remedy
        if self.share_key:
            return (f"to codistill with it deliberately set HPCDISTILL_EXCHANGE_ID={holder.get(self.share_key)}, "
                    "otherwise choose another HPCDISTILL_EXCHANGE_DIR")
        return ("wait for it to end, or use another HPCDISTILL_RUN_DIR; if that job is dead, the claim is taken "
                f"over once its heartbeat is {STALE_AFTER:.0f} s old (or delete the file)")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # gone (taken over) or the filesystem hiccuped: the next beat tries again
        self._thread = threading.Thread(target=beat, name=f"claim {self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self.held:
            try:
                holder = json.loads(self.path.read_text())
                if holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False


def read_claim(path: Path) -> tuple[dict, float] | None:
    """(holder, heartbeat time) of the claim file at `path`, or None when there is none. A claim that
    does not parse (half-written, garbage) is one of an unknown holder: {}."""
    try:
        st = path.stat()
        data = json.loads(path.read_text()[:65536])
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        try:
            return {}, path.stat().st_mtime
        except FileNotFoundError:
            return None
    return (data if isinstance(data, dict) else {}), st.st_mtime


def _dead(holder: dict, beat: float) -> str | None:
    """Why the holder of a claim is gone (no heartbeat for STALE_AFTER, or its process is not on this
    host any more), or None."""
    age = time.time() - beat
    if age > STALE_AFTER:
        return f"its heartbeat is {age:.0f} s old"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not process_alive(holder["pid"]):
        return f"process {holder['pid']} on this host is gone"
    return None


def claim_dead(path: Path) -> str | None:
    """Why the job holding the claim at `path` is gone, or None (alive, or no claim at all)."""
    found = read_claim(path)
    return _dead(*found) if found else None


def live_member(exchange_dir: Path, holder: dict) -> dict | None:
    """A live job training a group of the codistillation `holder` (an exchange claim) names: a group
    claim of the same exchange id whose holder is alive. A codistillation spanning jobs lives as long
    as one of its jobs does, whichever job took the exchange claim first."""
    for claim in sorted(Path(exchange_dir).glob(f"group-*/{GROUP_CLAIM}")):
        found = read_claim(claim)
        if found and found[0].get("exchange_id") == holder.get("exchange_id") and not _dead(*found):
            return found[0]
    return None


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed, not yet reaped: in a container whose init does
    not reap, a killed holder stays a zombie for good)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _who(holder: dict) -> str:
    if not holder:
        return "an unknown holder (unreadable claim)"
    job = f"job {holder['job']}, " if holder.get("job") else ""
    return f"run {holder.get('run_id')!r} ({job}host {holder.get('host')}, pid {holder.get('pid')})"


def run_id(settings, run_dir: Path) -> str:
    """This run's identity: kept in config.json across resume and requeue; new when starting over."""
    config = run_dir / "config.json"
    if settings.resume == "auto" and config.exists():
        try:
            rid = json.loads(config.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            rid = None
        if isinstance(rid, str) and rid:
            return rid
    return uuid.uuid4().hex[:12]


def claim_dirs(settings, run_dir: Path, exchange_dir: Path | None, world) -> tuple[str, list[Claim]]:
    """World rank 0 claims RUN_DIR (one job per run directory) and the exchange directory, if the mode
    has one (one codistillation per exchange id, any number of jobs), and in it the groups this job
    trains (one job per group), and picks the run id; every rank gets the id or the refusal."""
    claims, error, rid = [], None, None
    if world.Get_rank() == 0:
        try:
            rid = run_id(settings, run_dir)
            claim = Claim(run_dir / RUN_CLAIM, holder_info(rid), what="run directory")
            claim.acquire()
            claims.append(claim)
            if exchange_dir is not None:
                exchange_id = settings.exchange_id or rid
                ex = Claim(Path(exchange_dir) / EXCHANGE_CLAIM,
                           holder_info(rid, exchange_id=exchange_id), what="exchange directory",
                           share_key="exchange_id", members=lambda holder: live_member(exchange_dir, holder))
                ex.acquire()
                claims.append(ex)
                for g in range(settings.first_group, settings.first_group + settings.local_group_count):
                    mine = Claim(Path(exchange_dir) / f"group-{g}" / GROUP_CLAIM,
                                 holder_info(rid, exchange_id=exchange_id, group=g), what="exchange group",
                                 remedy=f"another job trains group {g} of this codistillation: give each job its "
                                        "own groups (HPCDISTILL_GROUP_OFFSET, HPCDISTILL_LOCAL_GROUPS), or wait for "
                                        f"that job to end (a dead job's claim is taken over after {STALE_AFTER:.0f} s)")
                    mine.acquire()
                    claims.append(mine)
            for c in claims:
                if c.note:
                    log.warning("%s %s: %s", c.what, c.path.parent, c.note)
        except ClaimError as exc:
            error = str(exc)
            for c in claims:
                c.release()
    error, rid = world.bcast((error, rid), root=0)
    if error:
        raise ClaimError(error)
    return rid, claims
