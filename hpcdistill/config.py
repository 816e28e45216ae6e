"""Every HPCDISTILL_* setting, validated before any MPI work starts.

Batch jobs are configured through the environment (``sbatch --export=ALL,HPCDISTILL_...``), so a
typo or a bad value must fail in the first second with a message naming the variable, the value and
what is expected, rather than after the job waited in the queue and started 64 ranks.
pydantic-settings does the parsing; this module adds the cross-checks and the error wording.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "HPCDISTILL_"
# Classes (or a vocabulary) beyond this are not a dataset anyone trains here but a mistake or a crafted
# file: labels are indices into logits, so 10^9 classes would be a 4 GB output layer.
MAX_CLASSES = 1_000_000


# The async update rules (strategies/dcasgd.py implements them in dc_delta): name -> (default lambda0,
# what it is). The one table that the setting's validation, `hpcdistill config`, the updater and the
# tests read. Zheng et al. 2017's lambda0: 0.04 (dcasgd-c), 2 (dcasgd-a).
ASYNC_RULES: dict[str, tuple[float, str]] = {
    "asgd": (0.0, "plain asynchronous SGD"),
    "dcasgd-c": (0.04, "delay compensation with a constant lambda"),
    "dcasgd-a": (2.0, "delay compensation with lambda adapted by a mean square of the gradient"),
}


class ConfigError(Exception):
    """A setting is invalid; the message names the variable, its value and what is expected."""

    exit_code = 2


def _ascii_digits(text: str) -> bool:
    """"12" yes; "²" or "١٢" (non-ASCII digits, which str.isdigit accepts) no."""
    return text.isascii() and text.isdigit()


def split_list(text: str | None) -> list[str]:
    """The items of a list setting: separated by `:` or `,` (both everywhere: `sbatch --export=A=0,1`
    cuts the value at the comma, `:` survives it, as in PATH), blanks stripped, empty items dropped."""
    return [t.strip() for t in re.split(r"[,:]", text or "") if t.strip()]


def model_list(text: str) -> list[str]:
    """The entries of HPCDISTILL_GROUP_MODELS. Separated by ',' when the value has one; otherwise by ':',
    where an import path's own ':' joins a module path to the callable after it: "mlp:pkg.mod:make:cnn"
    is [mlp, pkg.mod:make, cnn] (an entry with a '.' is a module path, which needs its callable)."""
    if "," in text:
        return [t.strip() for t in text.split(",") if t.strip()]
    tokens, out = [t.strip() for t in text.split(":") if t.strip()], []
    while tokens:
        head = tokens.pop(0)
        if "." in head:
            if not tokens:
                raise ValueError(f"{head!r} looks like a module path but no ':callable' follows it; write "
                                 "package.module:callable")
            head = f"{head}:{tokens.pop(0)}"
        out.append(head)
    return out


def _ranks(text: str) -> tuple[int, ...]:
    items = split_list(text)
    if not items or not all(_ascii_digits(t) for t in items):
        raise ValueError("expected a list of non-negative ranks separated by ':' or ',', e.g. 0 or 0:1")
    ranks = tuple(int(t) for t in items)
    if len(set(ranks)) != len(ranks):
        raise ValueError("a rank is listed twice")
    return ranks


class Settings(BaseSettings):
    """The resolved settings of one run (frozen: every rank sees the same values)."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, case_sensitive=False, frozen=True, extra="ignore", env_ignore_empty=True,
        allow_inf_nan=False,  # LR=inf passed validation and ended in a NaN summary
    )

    mode: Literal["sync", "codistill", "async", "distill"] = Field(
        "sync", description="training mode: sync · codistill · async · distill")
    dataset: str = Field(
        "digits", min_length=1,
        description="prepared dataset under DATA_DIR (digits, text, or one made by `data import`), or your "
                    "factory package.module:callable, called factory(split, **DATASET_ARGS)")
    dataset_args: Optional[str] = Field(
        None, description="JSON object of keyword arguments for a dataset factory")
    data_dir: Path = Field(Path("datasets"), description="where prepared datasets live")
    run_dir: Optional[Path] = Field(
        None, description="where this run writes everything (default ./runs/<SLURM_JOB_ID or timestamp>)")
    model: Optional[str] = Field(
        None, description="built-in model (the student in distill), or your factory package.module:callable, "
                          "called factory(*, input_shape, num_classes, **MODEL_ARGS); default: mlp for "
                          "classification, charlm for token sequences")
    model_args: Optional[str] = Field(
        None, description="JSON object of keyword arguments for the model factory (updates a built-in's)")
    loader_workers: int = Field(
        0, ge=0, le=64, description="DataLoader worker processes per rank (0: batches are read by the training "
                                    "process; more when __getitem__ is costly)")
    steps: int = Field(300, gt=0, description="optimizer steps per group (per worker in async)")
    batch_size: int = Field(32, gt=0, description="per-rank batch size")
    lr: Optional[float] = Field(
        None, gt=0,
        description="peak learning rate (default 0.05 for sgd, 0.2 for async sgd without momentum, 0.003 for adamw)")
    optimizer: Literal["auto", "sgd", "adamw"] = Field(
        "auto", description="auto = sgd with momentum for images, adamw for text")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (Sodhani et al. 2020: lower it when codistilling)")
    warmup_steps: int = Field(20, ge=0, description="linear learning-rate warm-up steps, then cosine decay")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="base seed; everything is reproducible from it")
    eval_every: int = Field(50, gt=0, description="steps between validation passes")
    log_every: int = Field(10, gt=0, description="steps between progress lines and metrics records")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, gt=0, description="checkpoints kept in RUN_DIR/checkpoints")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: resume from RUN_DIR's newest valid checkpoint · never")
    groups: Optional[int] = Field(
        None, gt=0, description="codistilling groups (world size must divide); default 2 in codistill, else 1")
    group_mode: Literal["sync", "async"] = Field(
        "sync", description="how each group trains inside: sync (Horovod allreduce) · async (DC-ASGD)")
    exchange_dir: Optional[Path] = Field(
        None, description="shared-filesystem directory for teacher checkpoints (default RUN_DIR/exchange)")
    exchange_every: int = Field(50, gt=0, description="steps between a group publishing its checkpoint")
    max_staleness: int = Field(
        500, gt=0, description="oldest peer checkpoint (steps behind) still used as a teacher")
    stale_policy: Literal["drop", "wait"] = Field(
        "drop", description="a peer beyond MAX_STALENESS: drop its term (default) or wait for it")
    stale_wait: float = Field(
        60.0, gt=0, le=3600, description="seconds a group waits for a peer's fresh teacher under STALE_POLICY=wait "
                                         "(well below the templates' 300 s USR2 lead; a stop signal cuts it short)")
    group_offset: Optional[int] = Field(
        None, ge=0, description="the first group this job trains, when the groups of one codistillation run as "
                                "separate jobs (GROUPS = the codistillation's total; needs a shared EXCHANGE_DIR "
                                "and EXCHANGE_ID)")
    local_groups: Optional[int] = Field(
        None, gt=0, description="how many groups this job trains (GROUP_OFFSET .. GROUP_OFFSET+LOCAL_GROUPS-1; the "
                                "job's ranks split evenly among them); default 1 when GROUP_OFFSET is set, else GROUPS")
    group_models: Optional[str] = Field(
        None, description="one model per group, separated by ':' or ',' (built-in names or package.module:callable), "
                          "e.g. mlp:cnn-small; MODEL_ARGS applies to the groups whose entry is MODEL")
    peers: Optional[int] = Field(
        None, gt=0, description="k: how many peers each group distills from, chosen per exchange (seeded, rotating "
                                "so that every peer takes its turn); default all GROUPS-1")
    exchange_id: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="the id shared by the jobs of one codistillation; exchange files and claims of another id are "
                    "refused (default: this run's id, so no other run's files are used)")
    burn_in: int = Field(50, ge=0, description="steps before the distillation term starts")
    teacher_age: Optional[int] = Field(
        None, ge=0, description="an experiment's control of staleness, D: from step t each group distills from "
                                "every peer's file of step floor((t-D)/EXCHANGE_EVERY)*EXCHANGE_EVERY exactly, "
                                "waiting (up to STALE_WAIT) until it is written: teacher age D..D+EXCHANGE_EVERY-1 "
                                "whatever the groups' speeds (default unset: the freshest file)")
    distill_weight: float = Field(
        0.5, ge=0, description="alpha, the weight of the distillation term (<= 1 in distill mode)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the distillation term")
    codistill_target: Literal["peers", "label-smoothing"] = Field(
        "peers", description="peers' predictions, or the label-smoothing control of equal weight")
    label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="epsilon of the label-smoothing control target")
    task_label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="sync and async: epsilon of label smoothing in the task loss, cross-entropy "
                                     "against (1 - eps) one-hot + eps / classes (0: plain; distillation's "
                                     "label-smoothing student control)")
    data_split: Literal["disjoint", "shared"] = Field(
        "disjoint", description="each group its own part of the data, or all groups all of it")
    async_rule: Literal[tuple(ASYNC_RULES)] = Field(  # type: ignore[valid-type]
        "dcasgd-a", description="async update rule: " + " · ".join(f"{k} ({v[1]})" for k, v in ASYNC_RULES.items()))
    async_lr: Literal["constant", "staleness-aware"] = Field(
        "constant", description="staleness-aware divides the step by the update's staleness (Zhang et al. 2016)")
    dc_lambda: Optional[float] = Field(
        None, ge=0, description="lambda0 of DC-ASGD (default: " + ", ".join(
            f"{v[0]} for {k}" for k, v in ASYNC_RULES.items() if v[0]) + ")")
    dc_meansq_decay: float = Field(0.95, ge=0, lt=1, description="m, the decay of DC-ASGD-a's mean square")
    param_hosts: str = Field(
        "0", description="ranks (within the group) hosting the parameter windows in async, separated by ':' or ',' "
                         "(e.g. 0:8; ':' survives sbatch --export)")
    async_schedule: Literal["free", "round-robin"] = Field(
        "free", description="async: free (workers push as they finish) or round-robin (workers take turns "
                            "through an RMA counter: every gradient is exactly workers-1 updates stale, on any "
                            "number of cores)")
    dc_meansq_bias_correction: bool = Field(
        False, description="DC-ASGD-a: divide the mean square by 1 - m^t (Adam's correction; the paper has none: "
                           "without it a worker's first updates get lambda_t ~ lambda0 / (|g| sqrt(1-m)))")
    staleness_bound: Optional[int] = Field(
        None, ge=0, description="SSP bound s: a worker s updates ahead of the slowest waits; empty = unbounded")
    straggler_rank: Optional[int] = Field(
        None, ge=0, description="world rank that is slowed down, for straggler experiments")
    straggler_delay: float = Field(
        1.0, ge=0, description="the straggler sleeps this fraction of its step time (1.0 = 2x slower)")
    teachers: Optional[str] = Field(
        None, description="teacher checkpoints (HDF5, .safetensors, .pt) or codistill run dirs for distill, separated "
                          "by ':' or ',' (e.g. a.h5:b.h5; ':' survives sbatch --export)")
    teacher_model: Optional[str] = Field(
        None, description="factory of distillation teachers of another architecture (default: the student's); "
                          "needed for .safetensors/.pt teachers of another architecture")
    teacher_model_args: Optional[str] = Field(
        None, description="JSON object of the teacher factory's arguments, for .safetensors/.pt teachers "
                          "(hpcdistill checkpoints record their own)")
    distill_loss: Literal["soft", "logits"] = Field(
        "soft", description="soft targets at temperature T, or squared error between logits")
    omit_classes: str = Field(
        "", description="classes left out of the distill transfer set, separated by ':' or ',' (e.g. 3:5)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: one GPU per local rank where CUDA is visible, else the CPU · cpu · cuda "
                            "(exit 2 at start-up when no GPU is visible)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward passes (the model's and the teachers') under bfloat16 autocast; "
                            "losses and the distillation softmax in fp32")
    tensorboard: bool = Field(
        True, description="write TensorBoard event files to RUN_DIR/tensorboard/group-<g>/ (true · false)")
    csv: bool = Field(
        True, description="write metrics.csv (metrics-g<g>.csv) beside metrics.jsonl (true · false)")

    @field_validator("model_args", "dataset_args", "teacher_model_args")
    @classmethod
    def _check_json_object(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            import json

            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not valid JSON ({exc}); give a JSON object such as '{{\"width\": 16}}'") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"a JSON {type(parsed).__name__}, expected a JSON object of keyword arguments")
        return value

    @field_validator("param_hosts")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        _ranks(value)
        return value

    @field_validator("omit_classes")
    @classmethod
    def _check_classes(cls, value: str) -> str:
        if value and not (split_list(value) and all(_ascii_digits(c) for c in split_list(value))):
            raise ValueError("expected class indices separated by ':' or ',', e.g. 3 or 3:5")
        return value

    @model_validator(mode="after")
    def _cross_check(self) -> "Settings":
        if self.mode == "distill":
            if not self.teachers:
                raise ValueError("HPCDISTILL_TEACHERS: distill mode needs teacher checkpoints "
                                 "(.h5 files or codistill run dirs, separated by ':' or ',')")
            if self.distill_weight > 1:
                raise ValueError("HPCDISTILL_DISTILL_WEIGHT: in distill mode alpha weighs soft against hard targets "
                                 "and must be <= 1")
        if (self.mode == "codistill" and self.codistill_target == "peers" and self.stale_policy == "wait"
                and self.max_staleness < self.exchange_every):
            raise ValueError(
                f"HPCDISTILL_MAX_STALENESS={self.max_staleness} is below HPCDISTILL_EXCHANGE_EVERY="
                f"{self.exchange_every} with HPCDISTILL_STALE_POLICY=wait: groups would wait for checkpoints "
                "their peers publish only later, while the peers wait for theirs; set MAX_STALENESS to at "
                "least EXCHANGE_EVERY or use STALE_POLICY=drop")
        if self.teacher_age is not None:
            self._check_teacher_age()
        if self.groups is not None and self.groups > 1 and self.mode != "codistill":
            raise ValueError(f"HPCDISTILL_GROUPS={self.groups}: several groups exist only in codistill mode")
        self._check_groups()
        return self

    def _check_teacher_age(self) -> None:
        d, e = self.teacher_age, self.exchange_every
        if self.mode != "codistill" or self.codistill_target != "peers":
            raise ValueError(f"HPCDISTILL_TEACHER_AGE={d}: a codistillation setting (peers' teachers), but "
                             f"HPCDISTILL_MODE={self.mode} / CODISTILL_TARGET={self.codistill_target}; unset it")
        if self.burn_in < d + e:
            raise ValueError(f"HPCDISTILL_BURN_IN={self.burn_in} with HPCDISTILL_TEACHER_AGE={d} and "
                             f"EXCHANGE_EVERY={e}: when the distillation term starts no peer file {d} steps old "
                             f"exists yet (the first is of step {e}); set BURN_IN to at least TEACHER_AGE + "
                             f"EXCHANGE_EVERY = {d + e}")
        if self.max_staleness < d + e - 1:
            raise ValueError(f"HPCDISTILL_MAX_STALENESS={self.max_staleness} is below HPCDISTILL_TEACHER_AGE + "
                             f"EXCHANGE_EVERY - 1 = {d + e - 1}, the oldest a teacher of that age gets: it would be "
                             f"dropped; raise MAX_STALENESS to at least {d + e - 1}")

    def _check_groups(self) -> None:
        """GROUP_OFFSET, LOCAL_GROUPS, GROUP_MODELS and PEERS against GROUPS (codistill only)."""
        named = [n for n in ("group_offset", "local_groups", "group_models", "peers") if getattr(self, n) is not None]
        if named and self.mode != "codistill":
            raise ValueError(", ".join(f"HPCDISTILL_{n.upper()}={getattr(self, n)!r}" for n in named) +
                             f": codistill settings, but HPCDISTILL_MODE={self.mode}; set HPCDISTILL_MODE=codistill "
                             "or unset them")
        total, first, local = self.num_groups, self.first_group, self.local_group_count
        if first + local > total:
            raise ValueError(
                f"HPCDISTILL_GROUP_OFFSET={first} with HPCDISTILL_LOCAL_GROUPS={local}: groups {first}.."
                f"{first + local - 1} do not exist in a codistillation of HPCDISTILL_GROUPS={total} (groups 0.."
                f"{total - 1}); lower the offset or raise GROUPS to the codistillation's total")
        if self.spans_jobs and (self.exchange_dir is None or self.exchange_id is None):
            missing = " and ".join(v for v, x in (("HPCDISTILL_EXCHANGE_DIR", self.exchange_dir),
                                                   ("HPCDISTILL_EXCHANGE_ID", self.exchange_id)) if x is None)
            raise ValueError(
                f"this job trains groups {first}..{first + local - 1} of {total} (a codistillation spanning jobs) "
                f"but {missing} is unset: every job of it must name the same shared HPCDISTILL_EXCHANGE_DIR and "
                "HPCDISTILL_EXCHANGE_ID (e.g. HPCDISTILL_EXCHANGE_ID=myrun-1), or files would never be shared")
        if self.group_models is not None:
            try:
                models = model_list(self.group_models)
            except ValueError as exc:
                raise ValueError(f"HPCDISTILL_GROUP_MODELS={self.group_models!r}: {exc}") from None
            if len(models) != total:
                raise ValueError(f"HPCDISTILL_GROUP_MODELS={self.group_models!r}: {len(models)} model(s) {models} for "
                                 f"HPCDISTILL_GROUPS={total} groups; give one per group, separated by ':' or ','")
            if self.model_args is not None and self.model not in models:
                raise ValueError(f"HPCDISTILL_MODEL_ARGS is set but HPCDISTILL_MODEL={self.model!r} is none of "
                                 f"HPCDISTILL_GROUP_MODELS {models}: the args apply to the groups whose entry is "
                                 "HPCDISTILL_MODEL; set MODEL to that entry")
        if self.peers is not None and self.peers > total - 1:
            raise ValueError(f"HPCDISTILL_PEERS={self.peers}: a group of a codistillation of HPCDISTILL_GROUPS={total} "
                             f"has {total - 1} peer(s); use at most {total - 1} (unset: all)")

    # Derived values: defaults that depend on other settings.
    @property
    def num_groups(self) -> int:
        return self.groups if self.groups is not None else (2 if self.mode == "codistill" else 1)

    @property
    def first_group(self) -> int:
        """The first group this job trains (GROUP_OFFSET; 0 when the job trains them all)."""
        return self.group_offset or 0

    @property
    def local_group_count(self) -> int:
        """How many groups this job trains: LOCAL_GROUPS, else 1 with an offset, else all."""
        if self.local_groups is not None:
            return self.local_groups
        return 1 if self.group_offset is not None else self.num_groups

    @property
    def spans_jobs(self) -> bool:
        """This job trains some of the codistillation's groups; other jobs train the rest."""
        return self.local_group_count < self.num_groups

    @property
    def num_peers(self) -> int:
        """k, the peers each group distills from (PEERS, default every other group)."""
        return self.peers if self.peers is not None else max(0, self.num_groups - 1)

    def model_for_group(self, group: int) -> tuple[str | None, str | None]:
        """(model name, its args JSON) that `group` trains: its GROUP_MODELS entry (MODEL_ARGS only where
        that entry is MODEL), else MODEL and MODEL_ARGS."""
        if self.group_models is None:
            return self.model, self.model_args
        name = model_list(self.group_models)[group]
        return name, self.model_args if name == self.model else None

    @property
    def uses_async(self) -> bool:
        return self.mode == "async" or (self.mode == "codistill" and self.group_mode == "async")

    @property
    def host_ranks(self) -> tuple[int, ...]:
        return _ranks(self.param_hosts)

    @property
    def lambda0(self) -> float:
        if self.dc_lambda is not None:
            return self.dc_lambda
        return ASYNC_RULES[self.async_rule][0]

    @property
    def omitted_classes(self) -> tuple[int, ...]:
        return tuple(int(c) for c in split_list(self.omit_classes))

    @property
    def teacher_paths(self) -> tuple[Path, ...]:
        return tuple(Path(t) for t in split_list(self.teachers))

    def check_world(self, world_size: int) -> None:
        """Cross-checks that need the world size (known from the launcher before MPI starts)."""
        groups = self.local_group_count
        if world_size % groups:
            what = (f"HPCDISTILL_LOCAL_GROUPS={groups} (the groups this job trains)" if self.spans_jobs
                    else f"HPCDISTILL_GROUPS={groups}")
            raise ConfigError(
                f"{what}: the world size {world_size} is not divisible by it; "
                f"use a number of ranks that is a multiple of {groups} or change the setting")
        if self.uses_async:
            per_group = world_size // groups
            bad = [r for r in self.host_ranks if r >= per_group]
            if bad:
                raise ConfigError(
                    f"HPCDISTILL_PARAM_HOSTS={self.param_hosts}: rank(s) {bad} do not exist in a group of {per_group}")
            if per_group - len(self.host_ranks) < 1:
                raise ConfigError(
                    f"HPCDISTILL_PARAM_HOSTS={self.param_hosts}: async needs at least one worker besides the "
                    f"{len(self.host_ranks)} host rank(s) in each group of {per_group}; launch more ranks")
        if self.straggler_rank is not None and self.straggler_rank >= world_size:
            raise ConfigError(
                f"HPCDISTILL_STRAGGLER_RANK={self.straggler_rank}: no such rank in a world of {world_size}")


EMPTY_MEANS_UNSET = {PREFIX + "STALENESS_BOUND"}  # documented: empty = unbounded


def launcher_world_size() -> int | None:
    """The world size as the launcher announces it, so cross-checks run before MPI_Init."""
    env = os.environ
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return None


def load_settings() -> Settings:
    """Parse and validate the environment; raise ConfigError with a message for users."""
    known = {PREFIX + name.upper() for name in Settings.model_fields}
    empty = sorted(k for k, v in os.environ.items() if k.upper() in known - EMPTY_MEANS_UNSET and not v.strip())
    if empty:  # `HPCDISTILL_MODE=` silently ran sync: an empty value is a mistake, not a choice
        raise ConfigError(", ".join(f"{k}={os.environ[k]!r}" for k in empty) + ": set but empty; give a value, or "
                          "unset the variable (`unset NAME`, or leave it out of --export) for the default")
    unknown = sorted(k for k in os.environ if k.upper().startswith(PREFIX) and k.upper() not in known)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k.upper(), known, n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        raise ConfigError("unknown setting(s): " + ", ".join(hints) + "; `hpcdistill config` lists them all")
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    except ValueError as exc:  # pydantic-settings' own parse errors
        raise ConfigError(f"invalid setting: {exc}") from None
    world = launcher_world_size()
    if world is not None:
        settings.check_world(world)
    return settings


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if field:
            var = PREFIX + field.upper()
            value = next((v for k, v in os.environ.items() if k.upper() == var), err.get("input"))
            desc = Settings.model_fields[field].description or ""
            lines.append(f"{var}={value!r}: {msg} ({desc})")
        else:
            lines.append(msg)
    return "invalid setting: " + "; ".join(lines)


# The dataset kinds of the built-in datasets, for computed defaults before `data prepare` has run.
BUILTIN_KINDS = {"digits": "image", "digits-aug": "image", "text": "sequence"}


def optimizer_name(settings: Settings, kind: str | None) -> str | None:
    """HPCDISTILL_OPTIMIZER with auto resolved: adamw for token sequences, else sgd (None when auto
    needs the dataset kind and it is not known)."""
    if settings.optimizer != "auto":
        return settings.optimizer
    return None if kind is None else ("adamw" if kind == "sequence" else "sgd")


def default_lr(settings: Settings, kind: str | None) -> float | None:
    """The peak learning rate when HPCDISTILL_LR is unset (None when it needs the unknown dataset kind):
    the optimizer's (optimizer_name), async sgd without momentum 4x higher."""
    optimizer = optimizer_name(settings, kind)
    if optimizer is None:
        return None
    if optimizer == "adamw":
        return 3e-3
    return 0.2 if settings.uses_async else 0.05


def computed_defaults(settings: Settings, kind: str | None = None) -> dict[str, object]:
    """The values of unset settings whose default depends on other settings (and on the dataset
    kind, "image" or "sequence": given, or known for a built-in dataset), by field name. Settings left
    unset on purpose (RUN_DIR, EXCHANGE_DIR, EXCHANGE_ID: per run; TEACHER_MODEL: the teachers' own
    records) are not among them."""
    if kind is None:
        kind = BUILTIN_KINDS.get(settings.dataset)
    out: dict[str, object] = {}
    if settings.groups is None:
        out["groups"] = settings.num_groups
    if settings.local_groups is None and settings.mode == "codistill":
        out["local_groups"] = settings.local_group_count
    if settings.peers is None and settings.mode == "codistill":
        out["peers"] = settings.num_peers
    if settings.dc_lambda is None:
        out["dc_lambda"] = settings.lambda0
    if settings.model is None and kind is not None:
        from hpcdistill.models import default_model

        out["model"] = default_model(kind)
    if settings.lr is None:
        lr = default_lr(settings, kind)
        if lr is not None:
            out["lr"] = lr
    return out


def _text(value) -> str:
    """A setting's value as the environment variable that parses back to it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe(settings: Settings, kind: str | None = None) -> list[dict]:
    """One row per setting: variable, value, default, source, meaning (for `hpcdistill config`).
    Source is "environment", "computed" (an unset setting whose default follows from the others, see
    computed_defaults; `kind` is the dataset kind when known) or "default"."""
    env = {k.upper(): v for k, v in os.environ.items()}
    computed = computed_defaults(settings, kind)
    rows = []
    for name, field in Settings.model_fields.items():
        var = PREFIX + name.upper()
        from_env = env.get(var, "") != ""
        value = getattr(settings, name)
        source = "environment" if from_env else "default"
        if not from_env and value is None and name in computed:
            value, source = computed[name], "computed"
        rows.append({
            "variable": var,
            "value": _text(value),
            "default": "" if field.default is None else _text(field.default),
            "source": source,
            "meaning": field.description or "",
        })
    return rows


def settings_env(settings: Settings, kind: str | None = None, *, pin_computed: bool = True) -> str:
    """Every effective setting as `HPCDISTILL_NAME=value` lines, values shell-quoted, so that
    `set -a; . settings.env` (then `hpcdistill train`) runs with the same settings. Computed defaults
    are written with their value and `# (computed)`, which pins them (a later version's other default,
    or an edited MODE, does not change them); with pin_computed=False they are comments too, so that
    the sourced settings (and config.json's record of them) are exactly the original ones. Unset
    settings (and empty ones, which `load_settings` refuses) are comments, so sourcing leaves them
    unset. `kind` is the dataset kind ("image", "sequence") for the computed MODEL and LR."""
    lines = ["# hpcdistill settings: `set -a; . <this file>; set +a` sets them in a shell (hpcdistill config --env)"]
    for row in describe(settings, kind):
        var, value = row["variable"], row["value"]
        if value == "":
            lines.append(f"# {var}=  # (unset)")
        elif row["source"] == "computed":
            lines.append(f"{'' if pin_computed else '# '}{var}={shlex.quote(value)}  # (computed)")
        else:
            lines.append(f"{var}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"
