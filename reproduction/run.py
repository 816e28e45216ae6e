"""Reproduce the three papers' headline results at small scale, then write docs/reproduction.md.

    .venv/bin/python reproduction/run.py [--quick] [--only codistill|dcasgd|distill ...] [--seeds N]

Every run is a real `mpirun ... hpcdistill train` job in reproduction/runs/<experiment>/<run>-s<seed>/.
Finished runs with the same settings are reused (an interrupted suite resumes); --fresh reruns all.
Results go to reproduction/results/<experiment>.json (committed, so that the page can be rebuilt
without the runs), plots to docs/img/reproduction/, and the document to docs/reproduction.md (built
from every results file present). --quick (about 8 min on 2 cores: short runs, 2 seeds) checks that the
suite works end to end and writes all of that under reproduction/quick/ instead (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import codistill  # noqa: E402
import dcasgd  # noqa: E402
import distill  # noqa: E402
import doc  # noqa: E402

from common import DATA_DIR, FULL, HPCDISTILL, QUICK, REPO, Runner, log  # noqa: E402
from stats import MIN_SEEDS  # noqa: E402

EXPERIMENTS = {"codistill": codistill, "dcasgd": dcasgd, "distill": distill}
DATASETS = {"codistill": "digits-aug", "dcasgd": "digits-aug", "distill": "digits-aug"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="about 8 min on 2 cores: short runs, fewer sweep points, 2 seeds; written under "
                        "reproduction/quick/, not over the committed results and page")
    p.add_argument("--only", action="append", choices=list(EXPERIMENTS), help="run only these (repeatable)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds 0..N-1 (default 2 with --quick, else the experiment's SEEDS, at least {MIN_SEEDS}: "
                        "the verdict rule's minimum)")
    p.add_argument("--fresh", action="store_true", help="rerun runs that already finished")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run up to N experiment families at the same time (each family's runs stay sequential)")
    p.add_argument("--dry-run", action="store_true", help="print the runs that would start")
    p.add_argument("--doc-only", action="store_true",
                   help="only rewrite docs/reproduction.md from saved results (with --quick: the quick run's page)")
    args = p.parse_args(argv)

    def seeds_of(name: str) -> list[int]:
        return list(range(args.seeds or (2 if args.quick else getattr(EXPERIMENTS[name], "SEEDS", MIN_SEEDS))))

    only = args.only or list(EXPERIMENTS)
    command = "python reproduction/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    layout = QUICK if args.quick else FULL
    layout.runs.mkdir(parents=True, exist_ok=True)
    if not args.doc_only:
        for name in sorted({DATASETS[e] for e in only}):
            subprocess.run([str(HPCDISTILL), "data", "prepare", name, "--data-dir", str(DATA_DIR)], cwd=REPO,
                           check=True)
        started = time.time()

        def family(name):
            records = layout.results / f"{name}-runs.json" if getattr(EXPERIMENTS[name], "SUMMARY_ONLY", False) \
                else None
            runner = Runner(layout.runs, fresh=args.fresh, dry=args.dry_run, records=records)
            seeds = seeds_of(name)
            t = time.time()
            log(f"=== {name}: seeds {seeds}{' (quick)' if args.quick else ''}")
            if args.dry_run:
                try:
                    EXPERIMENTS[name].run(runner, seeds, args.quick)
                except Exception:  # the analysis of runs that did not happen
                    pass
                return
            res = EXPERIMENTS[name].run(runner, seeds, args.quick)
            res["meta"] = {"command": command, "quick": args.quick, "seconds": time.time() - t,
                           "run_seconds": sum(r.seconds for r in runner.runs), "runs": len(runner.runs),
                           "reused": sum(r.reused for r in runner.runs), "finished": time.strftime("%Y-%m-%d %H:%M")}
            layout.results.mkdir(parents=True, exist_ok=True)
            (layout.results / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
            log(f"=== {name} done in {(time.time() - t) / 60:.1f} min ({len(runner.runs)} runs)")

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            for f in [pool.submit(family, name) for name in only]:
                f.result()
        if args.dry_run:
            return 0
        log(f"suite done in {(time.time() - started) / 60:.1f} min")
    path = doc.write(layout)
    log(f"wrote {doc.shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
