# shellcheck shell=bash
# slurm/common.sh: the launch, requeue and resume logic every template in slurm/ shares.
# Sourced by the templates (not submitted itself). A template sets HPCDISTILL_MODE and its own
# defaults, sources this file, then calls `hpcd_main`.
#
# Template knobs (HPCD_*: hpcdistill itself rejects HPCDISTILL_* names it does not know, exit 2):
#   HPCD_SHARED        directory on the shared filesystem holding the run directories
#                      [$SLURM_SUBMIT_DIR/runs]
#   HPCD_VENV          virtual environment to activate; "none": use PATH as it is
#                      [$VIRTUAL_ENV if set, else $SLURM_SUBMIT_DIR/.venv if it exists]
#   HPCD_MODULES       modules to `module load` first, e.g. "openmpi/4.1 hdf5"   [none]
#   HPCD_MPI           srun's --mpi plugin (Debian's Open MPI has no PMI-2)       [pmix]
#   HPCD_SRUN_ARGS     extra srun arguments, e.g. "--cpu-bind=cores"             [none]
#   HPCD_MAX_RESTARTS  requeues after a time-limit warning before giving up       [5]
#   HPCD_RESEND        seconds between re-forwarding the warning signal while the step runs [30]
#   HPCD_PREPARE       1: `hpcdistill data prepare` a built-in dataset that is missing [1]
#
# Run directory: HPCDISTILL_RUN_DIR if set, else $HPCD_SHARED/<job name>-<job id> (array task:
# <job name>-<array job id>_<task id>). The job id does not change when Slurm requeues the job, so a
# restarted job finds its own checkpoints and resumes (HPCDISTILL_RESUME=auto).
#
# Time limits: the templates ask for `--signal=B:USR2@<secs>`, i.e. USR2 to this batch shell only.
# The shell forwards it to srun, which passes it to every task; the tasks checkpoint at the next step
# boundary and exit 0 without summary.json. Then: summary.json written -> done; no summary.json and
# USR2 received (or srun exited 0 without summary.json: the tasks were signalled directly, e.g.
# --signal without B:) -> `scontrol requeue $SLURM_JOB_ID` (up to HPCD_MAX_RESTARTS times, counted
# by SLURM_RESTART_COUNT); SIGTERM (scancel, preemption) -> stop without requeueing.

hpcd_log() { echo "hpcd: $(date '+%F %T') $*"; }
hpcd_die() {  # message [exit code]
    echo "hpcd: $(date '+%F %T') ERROR: $1" >&2
    exit "${2:-1}"
}

# --- signals -----------------------------------------------------------------------------------------
HPCD_SIGNAL=""        # USR2 (time-limit warning) or TERM (cancel / preemption); TERM wins
HPCD_SRUN_PID=""
HPCD_LAST_FORWARD=0
HPCD_SIGNAL_MARK=""   # a file touched when the first signal arrived

hpcd__forward() {
    if [ -n "$HPCD_SRUN_PID" ] && kill -0 "$HPCD_SRUN_PID" 2>/dev/null; then
        kill -s "$1" "$HPCD_SRUN_PID" 2>/dev/null || true
    fi
    HPCD_LAST_FORWARD=$SECONDS
}

hpcd__on_signal() {
    local sig="$1"
    if [ "$sig" = TERM ] || [ -z "$HPCD_SIGNAL" ]; then HPCD_SIGNAL="$sig"; fi
    [ -n "$HPCD_SIGNAL_MARK" ] || HPCD_SIGNAL_MARK="$(mktemp "${TMPDIR:-/tmp}/hpcd-signal.XXXXXX")"
    hpcd_log "SIG$sig received: forwarding it to the job step (every rank checkpoints at the next step boundary)"
    hpcd__forward "$sig"
}

# Did the ranks react to the signal, i.e. write a checkpoint (or the summary) after it arrived?
hpcd__reacted() {
    [ -n "$(find "$HPCDISTILL_RUN_DIR/checkpoints" "$HPCDISTILL_RUN_DIR/summary.json" -type f \
              \( -name '*.h5' -o -name summary.json \) -newer "$HPCD_SIGNAL_MARK" -print -quit 2>/dev/null)" ]
}

hpcd__traps() {
    trap 'hpcd__on_signal USR2' USR2
    trap 'hpcd__on_signal TERM' TERM
    trap 'hpcd__on_signal INT' INT
    trap '[ -z "$HPCD_SIGNAL_MARK" ] || rm -f "$HPCD_SIGNAL_MARK"' EXIT
}

# --- environment -------------------------------------------------------------------------------------
hpcd_setup() {
    : "${SLURM_JOB_ID:?this script is a Slurm batch job: submit it with sbatch}"
    : "${SLURM_SUBMIT_DIR:=$PWD}"
    : "${HPCD_SHARED:=$SLURM_SUBMIT_DIR/runs}"
    : "${HPCD_MPI:=pmix}"
    : "${HPCD_SRUN_ARGS:=}"
    : "${HPCD_MAX_RESTARTS:=5}"
    : "${HPCD_RESEND:=30}"
    : "${HPCD_PREPARE:=1}"
    [[ "$HPCD_MAX_RESTARTS" =~ ^[0-9]+$ ]] || hpcd_die "HPCD_MAX_RESTARTS=$HPCD_MAX_RESTARTS: expected a non-negative integer" 2
    [[ "$HPCD_RESEND" =~ ^[0-9]+$ ]] && [ "$HPCD_RESEND" -gt 0 ] || hpcd_die "HPCD_RESEND=$HPCD_RESEND: expected a positive integer (seconds)" 2

    if [ -n "${HPCD_MODULES:-}" ]; then
        if ! command -v module >/dev/null 2>&1; then
            for f in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
                # shellcheck disable=SC1090
                [ -f "$f" ] && source "$f" && break
            done
        fi
        command -v module >/dev/null 2>&1 || hpcd_die "HPCD_MODULES=$HPCD_MODULES but there is no \`module\` command" 2
        local modules
        read -ra modules <<< "$HPCD_MODULES"   # split on blanks, never glob-expanded
        module load "${modules[@]}" || hpcd_die "module load $HPCD_MODULES failed" 2
    fi

    if [ -z "${HPCD_VENV:-}" ]; then
        if [ -n "${VIRTUAL_ENV:-}" ]; then HPCD_VENV="$VIRTUAL_ENV"
        elif [ -f "$SLURM_SUBMIT_DIR/.venv/bin/activate" ]; then HPCD_VENV="$SLURM_SUBMIT_DIR/.venv"
        else HPCD_VENV=none
        fi
    fi
    if [ "$HPCD_VENV" != none ]; then
        [ -f "$HPCD_VENV/bin/activate" ] || hpcd_die "HPCD_VENV=$HPCD_VENV: no bin/activate there" 2
        # shellcheck disable=SC1091
        source "$HPCD_VENV/bin/activate"
    fi
    command -v hpcdistill >/dev/null 2>&1 \
        || hpcd_die "hpcdistill is not on PATH: set HPCD_VENV to the virtual environment it is installed in" 2

    # Shared filesystems (Lustre, GPFS, NFS) often lack the locks HDF5 wants: checkpoints are written
    # atomically (temporary name + rename), so HDF5's own locking is not needed.
    hpcd_gpus
    export HDF5_USE_FILE_LOCKING="${HDF5_USE_FILE_LOCKING:-FALSE}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    if [ "$(id -u)" = 0 ]; then  # Open MPI refuses root unless told
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi

    if [ -z "${HPCDISTILL_RUN_DIR:-}" ]; then
        local tag name
        if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then tag="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; else tag="$SLURM_JOB_ID"; fi
        name="${SLURM_JOB_NAME:-hpcd}"
        name="${name//[^A-Za-z0-9._-]/_}"
        HPCDISTILL_RUN_DIR="$HPCD_SHARED/$name-$tag"
    fi
    case "$HPCDISTILL_RUN_DIR" in /*) ;; *) HPCDISTILL_RUN_DIR="$PWD/$HPCDISTILL_RUN_DIR" ;; esac
    export HPCDISTILL_RUN_DIR
}

# --- GPUs: a job given GPUs trains on them, one rank per GPU ----------------------------------------
# With --gpus-per-node (or --gpus, --gpus-per-task) Slurm sets SLURM_GPUS_ON_NODE; HPCDISTILL_DEVICE
# then defaults to cuda, so a node whose GPUs do not work fails in seconds (exit 2) instead of training
# on its CPUs. A rank takes GPU (local rank mod GPUs it sees): ask for as many tasks per node as GPUs.
hpcd_gpus() {
    local gpus="${SLURM_GPUS_ON_NODE:-0}" tasks="${SLURM_TASKS_PER_NODE:-}"
    [[ "$gpus" =~ ^[0-9]+$ ]] && [ "$gpus" -gt 0 ] || return 0
    export HPCDISTILL_DEVICE="${HPCDISTILL_DEVICE:-cuda}"
    tasks="${tasks%%(*}"; tasks="${tasks%%,*}"   # "4(x2)" or "4,3": the first node's count
    hpcd_log "GPUs: $gpus on this node, ${tasks:-?} task(s) per node; HPCDISTILL_DEVICE=$HPCDISTILL_DEVICE"
    if [[ "$tasks" =~ ^[0-9]+$ ]] && [ "$tasks" -ne "$gpus" ]; then
        hpcd_log "warning: $tasks tasks per node on $gpus GPU(s): submit with --ntasks-per-node=$gpus (one rank per GPU)"
    fi
}

# --- validation: a bad setting ends the job here, in a second, with the reason in the output file ------
hpcd_validate() {
    local out rc
    out="$(hpcdistill config 2>&1)"; rc=$?
    if [ $rc -ne 0 ]; then
        echo "$out" >&2
        hpcd_die "invalid settings (\`hpcdistill config\` exit $rc): fix them and submit again; nothing was started" 2
    fi
    echo "$out"
    mkdir -p "$HPCDISTILL_RUN_DIR" || hpcd_die "cannot create the run directory $HPCDISTILL_RUN_DIR" 2
    if [ "$HPCD_PREPARE" = 1 ]; then
        local data_dir="${HPCDISTILL_DATA_DIR:-datasets}" dataset="${HPCDISTILL_DATASET:-digits}"
        case "$dataset" in
            digits|digits-aug|text)
                if [ ! -f "$data_dir/$dataset/train.h5" ]; then
                    hpcd_log "preparing the $dataset dataset in $data_dir"
                    hpcdistill data prepare "$dataset" || hpcd_die "hpcdistill data prepare $dataset failed" 2
                fi ;;
        esac
    fi
}

# --- launch, then done / requeue / stop --------------------------------------------------------------
hpcd_launch() {
    local run_dir="$HPCDISTILL_RUN_DIR" summary="$HPCDISTILL_RUN_DIR/summary.json"
    local restarts="${SLURM_RESTART_COUNT:-0}" before="" rc=0
    before="$(stat -c %.9Y "$summary" 2>/dev/null || true)"

    if [ -z "$HPCD_SIGNAL" ]; then
        hpcd_log "srun --mpi=$HPCD_MPI $HPCD_SRUN_ARGS hpcdistill train (${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NUM_NODES:-?} node(s))"
        local srun_args
        read -ra srun_args <<< "$HPCD_SRUN_ARGS"   # split on blanks, never glob-expanded
        # Every rank exits 75 together on a stop, but not at the same instant: with --kill-on-bad-exit=1
        # srun took the first 75 for a failure and killed a rank still finalizing (exit 143, no
        # requeue; test_slurm, 1 run in 5). --wait=60 instead: once the first task has ended, the
        # others get 60 s to end too (a crashed rank's peers blocked in a collective are then killed).
        srun --mpi="$HPCD_MPI" --kill-on-bad-exit=0 --wait=60 "${srun_args[@]}" hpcdistill train &
        HPCD_SRUN_PID=$!
        # Poll instead of a bare `wait`, so a trapped signal is handled (and forwarded) at once, and
        # re-forwarded every HPCD_RESEND s while no checkpoint has appeared since, in case it reached
        # srun before the tasks were started. Not after the checkpoint: a rank that is already
        # shutting down has given its handler back, and USR2 would kill it.
        while kill -0 "$HPCD_SRUN_PID" 2>/dev/null; do
            if [ -n "$HPCD_SIGNAL" ] && [ $((SECONDS - HPCD_LAST_FORWARD)) -ge "$HPCD_RESEND" ]; then
                if hpcd__reacted; then
                    HPCD_LAST_FORWARD=$SECONDS
                else
                    hpcd_log "no checkpoint since SIG$HPCD_SIGNAL yet: forwarding it again"
                    hpcd__forward "$HPCD_SIGNAL"
                fi
            fi
            sleep 1 &
            wait $! 2>/dev/null || true
        done
        wait "$HPCD_SRUN_PID"; rc=$?
        HPCD_SRUN_PID=""
        hpcd_log "srun exited with status $rc"
    else
        hpcd_log "SIG$HPCD_SIGNAL arrived before the launch: not starting the job step"
        rc=1
    fi

    local after
    after="$(stat -c %.9Y "$summary" 2>/dev/null || true)"
    if [ -n "$after" ] && [ "$after" != "$before" ]; then
        [ $rc -eq 0 ] || hpcd_log "warning: srun exited with $rc after the run had finished"
        hpcd_log "done: $summary"
        exit 0
    fi
    local why=""
    case "$HPCD_SIGNAL" in
        USR2) why="time-limit warning (SIGUSR2)" ;;
        TERM|INT)
            hpcd_die "stopped by SIG$HPCD_SIGNAL (cancelled or preempted) before the end; the newest checkpoint is in $run_dir (submit again with HPCDISTILL_RUN_DIR=$run_dir to continue)" 1 ;;
        *)  # hpcdistill exits 75 (EX_TEMPFAIL: checkpoint written, resume me) when its ranks were
            # signalled: a signal sent to the tasks, not to this shell (--signal without B:, or scancel
            # --signal without --batch)
            [ $rc -eq 75 ] && why="the ranks stopped on a signal sent to them directly" ;;
    esac
    if [ -n "$why" ]; then
        if [ "$restarts" -lt "$HPCD_MAX_RESTARTS" ]; then
            # An array task by <array job>_<task>: its SLURM_JOB_ID may equal the array's id, which
            # `scontrol requeue` takes as every task of the array (a finished sibling ran again).
            local me="$SLURM_JOB_ID"
            [ -z "${SLURM_ARRAY_JOB_ID:-}" ] || me="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
            hpcd_log "$why and no summary.json: requeueing job $me (restart $((restarts + 1)) of at most $HPCD_MAX_RESTARTS); it resumes from the newest checkpoint in $run_dir"
            if scontrol requeue "$me"; then
                exit 0
            fi
            hpcd_die "scontrol requeue $me failed (does the cluster allow requeue: JobRequeue, --requeue?); continue by submitting again with HPCDISTILL_RUN_DIR=$run_dir" 1
        fi
        hpcd_die "$why, but not requeueing: $restarts restart(s) already, HPCD_MAX_RESTARTS=$HPCD_MAX_RESTARTS; the newest checkpoint is in $run_dir (submit again with HPCDISTILL_RUN_DIR=$run_dir to continue)" 1
    fi
    hpcd_die "the job step failed (srun status $rc) and wrote no summary.json; see the messages above" "$rc"
}

hpcd_main() {
    hpcd__traps
    hpcd_setup
    hpcd_log "job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}, restart ${SLURM_RESTART_COUNT:-0}, mode ${HPCDISTILL_MODE:-sync}, ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NODELIST:-?}"
    hpcd_log "run directory $HPCDISTILL_RUN_DIR"
    hpcd_validate
    hpcd_launch
}
