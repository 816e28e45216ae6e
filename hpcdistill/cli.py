"""Command line: doctor · config · data prepare|import · train · export · report.

Settings are validated before anything touches MPI, so a bad variable costs a second, not a queue wait.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from hpcdistill.config import ConfigError, describe, load_settings, settings_env


def _settings_or_exit():
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"hpcdistill: {exc}", file=sys.stderr)
        raise SystemExit(2)


def cmd_config(args) -> int:
    settings = _settings_or_exit()
    from hpcdistill import preflight
    from hpcdistill.data import DataError
    from hpcdistill.models import ModelError

    try:
        kind = preflight.check_code(settings, need_data=False)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"hpcdistill: {exc}", file=sys.stderr)
        return 2
    if args.env:
        print(settings_env(settings, kind), end="")
        return 0
    from hpcdistill.comm.horovod_env import effective, latency_patched

    rows = describe(settings, kind)
    horovod = effective()
    if args.json:
        import json
        print(json.dumps(rows + [{**r, "default": ""} for r in horovod], indent=2))
        return 0
    width = max(len(r["variable"]) for r in rows)
    vwidth = min(28, max(len(r["value"]) for r in rows))
    print(f"{'variable':<{width}}  {'value':<{vwidth}}  {'source':<11}  default / meaning")
    for r in rows:
        default = f"[default {r['default']}] " if r["default"] not in ("", r["value"]) else ""
        print(f"{r['variable']:<{width}}  {r['value']:<{vwidth}}  {r['source']:<11}  {default}{r['meaning']}")
    patch = {True: "with", False: "without", None: "not installed:"}[latency_patched()]
    print(f"\nHorovod ({patch} scripts/horovod-latency.patch), as training sets it (a HOROVOD_* variable you "
          "set wins):")
    for r in horovod:
        print(f"{r['variable']:<{width}}  {r['value']:<{vwidth}}  {r['source']:<15}  {r['meaning']}")
    return 0


def cmd_data(args) -> int:
    from hpcdistill.data import DataError, import_arrays, prepare

    settings = _settings_or_exit()
    data_dir = Path(args.data_dir) if args.data_dir else settings.data_dir
    verb = "wrote"
    try:
        if args.action == "prepare":
            path, wrote = prepare(args.name, data_dir, seed=settings.seed, force=args.force)
            verb = "wrote" if wrote else "kept (valid; --force rebuilds)"
        else:
            path = import_arrays(args.name, args.x, args.y, data_dir, val_fraction=args.val_fraction,
                                 test_fraction=args.test_fraction, seed=settings.seed, x_val=args.x_val,
                                 y_val=args.y_val, x_test=args.x_test, y_test=args.y_test, kind=args.kind,
                                 num_classes=args.num_classes, x_scale=args.x_scale)
    except DataError as exc:
        print(f"hpcdistill: {exc}", file=sys.stderr)
        return 2
    print(f"{verb} {path}")
    return 0


def cmd_train(args) -> int:
    settings = _settings_or_exit()
    from hpcdistill import preflight
    from hpcdistill.data import DataError
    from hpcdistill.models import ModelError
    from hpcdistill.teachers import TeacherError

    try:
        preflight.check(settings)
    except (ConfigError, DataError, ModelError) as exc:  # before MPI: nothing to abort
        print(f"hpcdistill: {exc}", file=sys.stderr)
        return 2
    from hpcdistill.training.loop import train

    try:
        return train(settings)
    except (ConfigError, DataError, ModelError, TeacherError) as exc:
        print(f"hpcdistill: {exc}", file=sys.stderr)
        return _abort_world(2)
    except Exception:
        traceback.print_exc()
        return _abort_world(1)


def _abort_world(code: int) -> int:
    """A rank that fails alone must take the job down: the others may be waiting for it in a
    collective, and a hung job burns its whole allocation instead of failing in seconds."""
    from mpi4py import MPI
    if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(code)
    return code


def cmd_export(args) -> int:
    from hpcdistill.export import ExportError, export

    try:
        for path in export(Path(args.checkpoint), fmt=args.format, out=Path(args.out) if args.out else None):
            print(f"wrote {path}")
    except ExportError as exc:
        print(f"hpcdistill: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_status(args) -> int:
    from hpcdistill.status import status

    return status(Path(args.exchange_dir))


def cmd_doctor(args) -> int:
    from hpcdistill.doctor import run_doctor

    return run_doctor(run_dir=args.run_dir)


def cmd_report(args) -> int:
    from hpcdistill.report import report

    return report([Path(p) for p in args.run_dirs], out=Path(args.out) if args.out else None,
                  log_scale=args.log_scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcdistill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("doctor", help="check MPI, Horovod, RMA windows and HDF5 locking; say how to fix")
    d.add_argument("--run-dir", default=None, help="directory whose filesystem to check (default RUN_DIR or .)")
    d.set_defaults(func=cmd_doctor)

    c = sub.add_parser("config", help="print every setting, its value, default, source and meaning")
    fmt = c.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the rows as a JSON list")
    fmt.add_argument("--env", action="store_true",
                     help="HPCDISTILL_NAME=value lines (shell-quoted) that `set -a; . FILE` sets again; computed "
                          "defaults marked '# (computed)', unset settings as comments")
    c.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="prepare a built-in dataset or import your own arrays")
    dsub = data.add_subparsers(dest="action", required=True)
    pr = dsub.add_parser("prepare", help="write DATA_DIR/NAME/{train,val,test}.h5 (digits, text)")
    pr.add_argument("name")
    pr.add_argument("--data-dir", default=None)
    pr.add_argument("--force", action="store_true", help="rebuild even if valid files exist")
    im = dsub.add_parser("import", help="turn X.npy / Y.npy into the same HDF5 layout (datasets/README.md)")
    im.add_argument("name")
    im.add_argument("--x", required=True, help="inputs .npy: (N, ...) numbers (image) or (N, L) token ids (text)")
    im.add_argument("--y", required=True, help="labels .npy: (N,) class labels (image) or (N, L) next tokens (text)")
    for split in ("val", "test"):
        im.add_argument(f"--x-{split}", default=None, help=f"your own {split} inputs (with all of --x-val, "
                        f"--y-val, --x-test, --y-test: no random split)")
        im.add_argument(f"--y-{split}", default=None, help=f"your own {split} labels")
    im.add_argument("--kind", choices=("image", "text"), default="image",
                    help="image: classification of fixed-shape inputs (default); text: integer token ids")
    im.add_argument("--num-classes", type=int, default=None,
                    help="classes (image) or vocabulary size (text); default: largest label + 1")
    im.add_argument("--x-scale", type=float, default=None,
                    help="image only: the loader multiplies x by it (default 1/255 for uint8 x, else 1)")
    im.add_argument("--data-dir", default=None)
    im.add_argument("--val-fraction", type=float, default=None, help="random split only (default 0.1)")
    im.add_argument("--test-fraction", type=float, default=None, help="random split only (default 0.1)")
    data.set_defaults(func=cmd_data)

    e = sub.add_parser("export", help="write a checkpoint's model weights as .safetensors or a torch state_dict")
    e.add_argument("checkpoint", help="a checkpoint .h5 file, or a run directory (each group's newest checkpoint)")
    e.add_argument("--format", choices=("safetensors", "torch"), default="safetensors")
    e.add_argument("--out", default=None, help="output file (one checkpoint) or directory (default: beside it)")
    e.set_defaults(func=cmd_export)

    st = sub.add_parser("status", help="each codistilling group's newest step, staleness and state, from an exchange "
                                       "directory (exit 0 when every group has finished)")
    st.add_argument("exchange_dir")
    st.set_defaults(func=cmd_status)

    t = sub.add_parser("train", help="the batch job (under mpirun or srun); HPCDISTILL_MODE picks the mode")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("report", help="a table and PNG plots comparing run directories")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", default=None, help="output directory (default: the first run dir's report/)")
    r.add_argument("--log-scale", action="store_true", help="losses on a logarithmic y axis")
    r.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
