"""hpcdistill's training loop against a plain PyTorch loop: same model, dataset, batch and device, one rank.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loop_overhead.py [--device cuda] [--reps 3] [--json]

Alternates (H P H P ...) `hpcdistill train` (sync, 1 rank, under this installation's MPI launcher) and
examples/plain_torch.py (SGD with momentum, a shuffled DataLoader, no hpcdistill) on examples/tinyresnet,
`--steps` steps of batch `--batch-size` each. Both rates are steady state, after step 20: plain_torch.py
times its own steps 20..end; hpcdistill's come from metrics.jsonl, the `time` of the logged steps (every
10, each waits for the device) between step 20 and the last. Validation and checkpoints are moved past
the end (HPCDISTILL_EVAL_EVERY, CHECKPOINT_EVERY), as plain_torch.py does none. The ratio is hpcdistill's
steps per second over plain PyTorch's (1.0: the toolkit costs nothing; > 1: faster). With --json the last
line is {"hpcdistill_over_plain": r, "hpcdistill_steps_per_second": ..., "plain_steps_per_second": ...}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command  # noqa: E402

from _common import machine, median, table  # noqa: E402

WARMUP = 20  # steps left out of both rates (allocator, autotuning, the first batches)


def hpcdistill_rate(a, run_dir: Path) -> float:
    env = job_env(PYTHONPATH=ROOT / "examples", mode="sync", model="tinyresnet.models:resnet",
                  model_args=a.model_args, dataset="tinyresnet.data:digits", dataset_args=a.dataset_args,
                  steps=a.steps, batch_size=a.batch_size, device=a.device, precision=a.precision,
                  log_every=10, eval_every=a.steps + 1, checkpoint_every=a.steps + 1, run_dir=run_dir,
                  resume="never", seed=0)
    subprocess.run(mpirun_command(1, HPCDISTILL, "train"), env=env, check=True, capture_output=True, timeout=1800)
    times = {r["step"]: r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    last = max(times)
    return (last - WARMUP) / (times[last] - times[WARMUP])


def plain_rate(a) -> float:
    proc = subprocess.run([sys.executable, ROOT / "examples" / "plain_torch.py", "--steps", str(a.steps),
                           "--batch-size", str(a.batch_size), "--model-args", a.model_args, "--dataset-args",
                           a.dataset_args, "--device", a.device, "--json"], env=job_env(), check=True,
                          capture_output=True, text=True, timeout=1800)
    return json.loads(proc.stdout.splitlines()[-1])["steps_per_second"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", help="hpcdistill's HPCDISTILL_PRECISION (plain: fp32)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model-args", default='{"width": 16, "blocks": [1, 1]}')
    p.add_argument("--dataset-args", default="{}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.steps <= WARMUP + 10:
        p.error(f"--steps must exceed {WARMUP + 10}")
    rates = {"hpcdistill": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="hpcd-loop-") as tmp:
        for rep in range(a.reps):
            rates["hpcdistill"].append(hpcdistill_rate(a, Path(tmp) / f"run{rep}"))
            rates["plain"].append(plain_rate(a))
            print(f"rep {rep}: hpcdistill {rates['hpcdistill'][-1]:.1f} steps/s, "
                  f"plain {rates['plain'][-1]:.1f} steps/s", flush=True)
    h, q = median(rates["hpcdistill"]), median(rates["plain"])
    print(f"\n{machine(1)}; device {a.device}, model args {a.model_args}, batch {a.batch_size}, {a.steps} steps\n")
    print(table(["loop", "steps/s (median)", "runs"],
                [["hpcdistill sync, 1 rank", f"{h:.1f}", len(rates["hpcdistill"])],
                 ["plain PyTorch", f"{q:.1f}", len(rates["plain"])],
                 ["ratio hpcdistill / plain", f"{h / q:.2f}", ""]]))
    if a.json:
        print(json.dumps({"hpcdistill_over_plain": h / q, "hpcdistill_steps_per_second": h,
                          "plain_steps_per_second": q, "device": a.device}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
