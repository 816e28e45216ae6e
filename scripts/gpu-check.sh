#!/usr/bin/env bash
# The GPU check: on a machine with (at least) one NVIDIA GPU, in under 10 minutes,
#   1. set-up (scripts/setup.sh: torch's CUDA wheel and Horovod with NCCL when a CUDA toolkit is loaded),
#   2. `hpcdistill doctor` on 1 rank (CUDA, GPUs, Horovod's NCCL, an NCCL allreduce),
#   3. a 1-rank sync run on the GPU in fp32 and in bf16 (HPCDISTILL_PRECISION),
#   4. codistillation, 2 groups of 1 rank sharing the GPU,
#   5. distillation of a smaller student from the two codistilled models,
#   6. hpcdistill's sync loop against a plain PyTorch loop, same model and batch on the GPU
#      (benchmarks/loop_overhead.py: ratio of steps per second),
# and writes every figure to $GPU_CHECK_OUT/gpu-check.json (default ./gpu-check) plus one line each
# on stdout, for docs/benchmarks.md. Exit status: 0 when every step passed, 1 otherwise.
#
#   bash scripts/gpu-check.sh                      # VENV_DIR=.venv; HPCD_CUDA=yes unless set
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu-check.sh # the same steps on the CPU: checks the script
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_DIR:-$ROOT/.venv}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT="$(mkdir -p "${GPU_CHECK_OUT:-$PWD/gpu-check}" && cd "${GPU_CHECK_OUT:-$PWD/gpu-check}" && pwd)"
STEPS="${GPU_CHECK_STEPS:-300}"
say() { printf '[gpu-check] %s\n' "$*"; }
T0=$SECONDS

if [ "$DEVICE" = cuda ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L | grep -q '^GPU ' \
    || { say "no NVIDIA GPU visible (nvidia-smi -L): run this on a GPU node"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/[gpu-check] GPU: /'
  export HPCD_CUDA="${HPCD_CUDA:-yes}"
fi
say "1. set-up ($VENV)"
VENV_DIR="$VENV" bash "$ROOT/scripts/setup.sh" > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; say "set-up failed ($OUT/setup.log)"; exit 1; }
say "   done in $((SECONDS - T0)) s"

cd "$ROOT" || exit 1
OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" "$VENV/bin/python" - "$OUT" "$DEVICE" "$STEPS" <<'PY'
import json, subprocess, sys, time
from pathlib import Path

from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command

out, device, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
results, failed = {"device": device, "steps": steps}, []
data = out / "datasets"


def run(name, np_, *args, **settings):
    t = time.perf_counter()
    env = job_env(data_dir=data, device=device, resume="never", **settings)
    proc = subprocess.run(mpirun_command(np_, *args), env=env, capture_output=True, text=True, timeout=900)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    seconds = round(time.perf_counter() - t, 1)
    if proc.returncode != 0:
        failed.append(name)
        print(f"[gpu-check] {name}: FAILED (exit {proc.returncode}, {out / (name + '.log')})", flush=True)
    return proc, seconds


def summary(run_dir):
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


subprocess.run([HPCDISTILL, "data", "prepare", "digits"], env=job_env(data_dir=data), check=True,
               capture_output=True)
proc, sec = run("doctor", 1, HPCDISTILL, "doctor", "--run-dir", out / "doctor")
results["doctor"] = [line.strip() for line in proc.stdout.splitlines() if "CUDA" in line or "Horovod" in line]
print("[gpu-check] 2. doctor:", *results["doctor"], sep="\n    ", flush=True)

for precision in ("fp32", "bf16"):
    run_dir = out / f"sync-{precision}"
    proc, sec = run(f"sync-{precision}", 1, HPCDISTILL, "train", mode="sync", model="cnn", steps=steps,
                    precision=precision, run_dir=run_dir)
    s = summary(run_dir)
    if s:
        g = s["groups"][0]
        results[f"sync_{precision}"] = {"test_accuracy": g["test_accuracy"], "seconds": sec,
                                        "samples_per_second": s["samples_per_second"]}
        print(f"[gpu-check] 3. sync {precision}: test accuracy {g['test_accuracy']:.4f}, "
              f"{s['samples_per_second']:.0f} samples/s, {sec} s", flush=True)
        if g["test_accuracy"] < 0.9:
            failed.append(f"sync-{precision} accuracy {g['test_accuracy']:.3f} < 0.9")

codistill_dir = out / "codistill"
proc, sec = run("codistill", 2, HPCDISTILL, "train", mode="codistill", groups=2, model="cnn", steps=steps,
                exchange_every=25, burn_in=50, run_dir=codistill_dir)
s = summary(codistill_dir)
if s:
    c = s["codistill"]
    results["codistill"] = {"test_accuracy": [g["test_accuracy"] for g in s["groups"]],
                            "ensemble_test_accuracy": c["ensemble_test_accuracy"],
                            "teachers_loaded": c["teachers_loaded"], "seconds": sec}
    print(f"[gpu-check] 4. codistill 2 x 1 rank on one GPU: group accuracies "
          f"{[round(a, 4) for a in results['codistill']['test_accuracy']]}, ensemble "
          f"{c['ensemble_test_accuracy']:.4f}, teachers loaded {c['teachers_loaded']}, {sec} s", flush=True)
    if c["teachers_loaded"] < 1:
        failed.append("codistill loaded no teacher")

distill_dir = out / "distill"
proc, sec = run("distill", 1, HPCDISTILL, "train", mode="distill", teachers=codistill_dir, model="mlp-small",
                steps=steps, run_dir=distill_dir)
s = summary(distill_dir)
if s:
    d = s["distill"]
    results["distill"] = {"student_test_accuracy": s["groups"][0]["test_accuracy"],
                          "teacher_test_accuracy": d["teacher_test_accuracy"], "seconds": sec}
    print(f"[gpu-check] 5. distill: student {s['groups'][0]['test_accuracy']:.4f}, teachers "
          f"{d['teacher_test_accuracy']}, {sec} s", flush=True)

bench = subprocess.run([sys.executable, "benchmarks/loop_overhead.py", "--device", device, "--reps", "3",
                        "--steps", str(steps), "--json"], capture_output=True, text=True, timeout=900)
(out / "loop_overhead.log").write_text(bench.stdout + bench.stderr)
if bench.returncode == 0:
    results["loop_overhead"] = json.loads(bench.stdout.splitlines()[-1])
    r = results["loop_overhead"]
    print(f"[gpu-check] 6. loop: hpcdistill {r['hpcdistill_steps_per_second']:.1f} steps/s, plain PyTorch "
          f"{r['plain_steps_per_second']:.1f} steps/s: ratio {r['hpcdistill_over_plain']:.2f}", flush=True)
else:
    failed.append("loop_overhead")
results["failed"] = failed
(out / "gpu-check.json").write_text(json.dumps(results, indent=2) + "\n")
print(f"[gpu-check] {'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
      f"figures in {out / 'gpu-check.json'}", flush=True)
sys.exit(1 if failed else 0)
PY
rc=$?
say "total $((SECONDS - T0)) s"
exit $rc
