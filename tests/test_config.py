"""Settings: every variable parses, every bad value fails with exit 2 naming variable and expectation."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from hpcdistill.config import PREFIX, ConfigError, Settings, describe, load_settings, settings_env
from hpcdistill.launch import HPCDISTILL, job_env

# One invalid value for every setting, and a phrase the message must contain.
BAD = {
    "MODE": ("train", "sync"),
    "DATASET": ("", None),  # empty means "unset": checked separately below
    "DATA_DIR": (None, None),
    "RUN_DIR": (None, None),
    "MODEL": (None, None),
    "STEPS": ("abc", "valid integer"),
    "BATCH_SIZE": ("0", "greater than 0"),
    "LR": ("-0.1", "greater than 0"),
    "OPTIMIZER": ("lamb", "sgd"),
    "MOMENTUM": ("1.5", "less than 1"),
    "WEIGHT_DECAY": ("-1", "greater than or equal to 0"),
    "WARMUP_STEPS": ("-3", "greater than or equal to 0"),
    "SEED": ("x", "valid integer"),
    "EVAL_EVERY": ("0", "greater than 0"),
    "LOG_EVERY": ("ten", "valid integer"),
    "CHECKPOINT_EVERY": ("-5", "greater than 0"),
    "KEEP_CHECKPOINTS": ("0", "greater than 0"),
    "RESUME": ("always", "auto"),
    "GROUPS": ("0", "greater than 0"),
    "GROUP_MODE": ("ring", "sync"),
    "EXCHANGE_DIR": (None, None),
    "EXCHANGE_EVERY": ("0", "greater than 0"),
    "MAX_STALENESS": ("soon", "valid integer"),
    "STALE_POLICY": ("ignore", "drop"),
    "BURN_IN": ("-1", "greater than or equal to 0"),
    "TEACHER_AGE": ("-50", "greater than or equal to 0"),
    "DISTILL_WEIGHT": ("-0.5", "greater than or equal to 0"),
    "TEMPERATURE": ("0", "greater than 0"),
    "CODISTILL_TARGET": ("teachers", "peers"),
    "LABEL_SMOOTHING": ("1", "less than 1"),
    "DATA_SPLIT": ("random", "disjoint"),
    "TASK_LABEL_SMOOTHING": ("1", "less than 1"),
    "ASYNC_RULE": ("dcasgd", "asgd"),
    "ASYNC_LR": ("adaptive", "constant"),
    "DC_LAMBDA": ("-1", "greater than or equal to 0"),
    "DC_MEANSQ_DECAY": ("1.0", "less than 1"),
    "PARAM_HOSTS": ("a,b", "list of non-negative ranks separated by ':' or ','"),
    "ASYNC_SCHEDULE": ("lockstep", "round-robin"),
    "DC_MEANSQ_BIAS_CORRECTION": ("maybe", "valid boolean"),
    "STALENESS_BOUND": ("-2", "greater than or equal to 0"),
    "STRAGGLER_RANK": ("x", "valid integer"),
    "STRAGGLER_DELAY": ("-1", "greater than or equal to 0"),
    "TEACHERS": (None, None),  # any path list is syntactically fine; checked with MODE=distill below
    "DISTILL_LOSS": ("mse", "soft"),
    "OMIT_CLASSES": ("three", "class indices"),
    "MODEL_ARGS": ("[16]", "JSON object"),
    "DATASET_ARGS": ("{width: 3}", "not valid JSON"),
    "TEACHER_MODEL": (None, None),  # an import path or a name: checked before MPI (tests/test_userpkg.py)
    "TEACHER_MODEL_ARGS": ("3", "JSON object"),
    "LOADER_WORKERS": ("-1", "greater than or equal to 0"),
    "STALE_WAIT": ("inf", "finite number"),
    "EXCHANGE_ID": ("../other", "should match pattern"),
    "TENSORBOARD": ("maybe", "valid boolean"),
    "CSV": ("2", "valid boolean"),
    "GROUP_OFFSET": ("-1", "greater than or equal to 0"),
    "LOCAL_GROUPS": ("0", "greater than 0"),
    "GROUP_MODELS": ("mlp:cnn", "codistill settings, but HPCDISTILL_MODE=sync"),
    "PEERS": ("0", "greater than 0"),
    "DEVICE": ("gpu", "auto"),
    "PRECISION": ("fp16", "fp32"),
}

# Settings whose every non-empty value is syntactically valid (paths, names) are covered elsewhere:
# they are checked against the filesystem before MPI starts (the last test of this file).
FREE_FORM = {"DATASET", "DATA_DIR", "RUN_DIR", "MODEL", "EXCHANGE_DIR", "TEACHERS", "TEACHER_MODEL"}


def test_every_setting_has_a_bad_value_case():
    assert set(BAD) == {name.upper() for name in Settings.model_fields}


@pytest.fixture
def env(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith(PREFIX):
            monkeypatch.delenv(k)
    for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", sorted(n for n in BAD if n not in FREE_FORM))
def test_bad_value_names_variable_value_and_expectation(env, name):
    value, phrase = BAD[name]
    env.setenv(PREFIX + name, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    msg = str(exc.value)
    assert f"{PREFIX}{name}" in msg and repr(value) in msg, msg
    assert phrase in msg, msg


def test_defaults_and_derived_values(env):
    s = load_settings()
    assert (s.mode, s.dataset, s.steps, s.resume, s.num_groups, s.lambda0) == ("sync", "digits", 300, "auto", 1, 2.0)
    env.setenv("HPCDISTILL_MODE", "codistill")
    assert load_settings().num_groups == 2
    env.setenv("HPCDISTILL_STALENESS_BOUND", "")  # empty = unbounded
    assert load_settings().staleness_bound is None


def test_groups_spanning_jobs(env):
    """GROUP_OFFSET/LOCAL_GROUPS against GROUPS; a job of a multi-job codistillation must name the
    shared exchange dir and id; the world splits among the job's own groups."""
    env.setenv("HPCDISTILL_MODE", "codistill")
    env.setenv("HPCDISTILL_GROUPS", "4")
    env.setenv("HPCDISTILL_GROUP_OFFSET", "2")
    with pytest.raises(ConfigError, match="groups 2..2 of 4 .* HPCDISTILL_EXCHANGE_DIR and HPCDISTILL_EXCHANGE_ID is "
                                          "unset"):
        load_settings()
    env.setenv("HPCDISTILL_EXCHANGE_DIR", "/shared/ex")
    env.setenv("HPCDISTILL_EXCHANGE_ID", "run-1")
    s = load_settings()
    assert (s.first_group, s.local_group_count, s.spans_jobs, s.num_peers) == (2, 1, True, 3)
    env.setenv("HPCDISTILL_LOCAL_GROUPS", "3")
    with pytest.raises(ConfigError, match=r"groups 2..4 do not exist in a codistillation of HPCDISTILL_GROUPS=4"):
        load_settings()
    env.setenv("HPCDISTILL_LOCAL_GROUPS", "2")
    env.setenv("OMPI_COMM_WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"HPCDISTILL_LOCAL_GROUPS=2 \(the groups this job trains\): the world "
                                          "size 3 is not divisible"):
        load_settings()
    env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert load_settings().local_group_count == 2
    env.setenv("HPCDISTILL_PEERS", "4")
    with pytest.raises(ConfigError, match="HPCDISTILL_PEERS=4: .* has 3 peer"):
        load_settings()
    env.setenv("HPCDISTILL_PEERS", "1")
    assert load_settings().num_peers == 1
    env.delenv("HPCDISTILL_GROUP_OFFSET")
    env.delenv("HPCDISTILL_LOCAL_GROUPS")
    s = load_settings()  # one job, every group: no exchange id needed
    assert (s.first_group, s.local_group_count, s.spans_jobs) == (0, 4, False)


@pytest.mark.parametrize("value, models", [
    ("mlp:cnn-small", ["mlp", "cnn-small"]),
    ("mlp,cnn", ["mlp", "cnn"]),
    ("userpkg.models:make:mlp", ["userpkg.models:make", "mlp"]),
    ("mlp:a.b:f:a.b:g", ["mlp", "a.b:f", "a.b:g"]),
    ("userpkg.models:make,mlp", ["userpkg.models:make", "mlp"]),
])
def test_group_models_lists(value, models):
    from hpcdistill.config import model_list

    assert model_list(value) == models


def test_group_models_checks(env):
    env.setenv("HPCDISTILL_MODE", "codistill")
    env.setenv("HPCDISTILL_GROUP_MODELS", "mlp:cnn:mlp-small")
    with pytest.raises(ConfigError, match=r"3 model\(s\) .* for HPCDISTILL_GROUPS=2 groups"):
        load_settings()
    env.setenv("HPCDISTILL_GROUP_MODELS", "mlp:pkg.mod")
    with pytest.raises(ConfigError, match="HPCDISTILL_GROUP_MODELS='mlp:pkg.mod': 'pkg.mod' looks like a module path"):
        load_settings()
    env.setenv("HPCDISTILL_GROUP_MODELS", "mlp:cnn-small")
    env.setenv("HPCDISTILL_MODEL_ARGS", '{"dropout": 0.2}')
    with pytest.raises(ConfigError, match="HPCDISTILL_MODEL_ARGS is set but HPCDISTILL_MODEL=None is none of"):
        load_settings()
    env.setenv("HPCDISTILL_MODEL", "mlp")
    s = load_settings()
    assert s.model_for_group(0) == ("mlp", '{"dropout": 0.2}') and s.model_for_group(1) == ("cnn-small", None)


def test_cross_checks(env):
    env.setenv("HPCDISTILL_MODE", "codistill")
    env.setenv("HPCDISTILL_GROUPS", "3")
    env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="HPCDISTILL_GROUPS=3: the world size 4 is not divisible"):
        load_settings()
    env.setenv("HPCDISTILL_MODE", "sync")
    with pytest.raises(ConfigError, match="only in codistill"):
        load_settings()
    env.delenv("HPCDISTILL_GROUPS")
    env.setenv("HPCDISTILL_MODE", "distill")
    with pytest.raises(ConfigError, match="HPCDISTILL_TEACHERS"):
        load_settings()
    env.setenv("HPCDISTILL_TEACHERS", "a.h5")
    env.setenv("HPCDISTILL_DISTILL_WEIGHT", "1.5")
    with pytest.raises(ConfigError, match="must be <= 1"):
        load_settings()
    env.delenv("HPCDISTILL_DISTILL_WEIGHT")
    env.setenv("HPCDISTILL_MODE", "async")
    env.setenv("HPCDISTILL_PARAM_HOSTS", "0,1,2,3")
    with pytest.raises(ConfigError, match="at least one worker"):
        load_settings()
    env.setenv("HPCDISTILL_PARAM_HOSTS", "7")
    with pytest.raises(ConfigError, match=r"rank\(s\) \[7\] do not exist"):
        load_settings()
    env.delenv("HPCDISTILL_PARAM_HOSTS")
    env.setenv("HPCDISTILL_MODE", "codistill")
    env.setenv("HPCDISTILL_EXCHANGE_EVERY", "50")
    env.setenv("HPCDISTILL_MAX_STALENESS", "20")
    load_settings()  # drop (the default) never waits: any bound is fine
    env.setenv("HPCDISTILL_STALE_POLICY", "wait")  # waiting for a file the peer publishes only later
    with pytest.raises(ConfigError, match="MAX_STALENESS=20 is below HPCDISTILL_EXCHANGE_EVERY=50"):
        load_settings()
    env.setenv("HPCDISTILL_MAX_STALENESS", "50")
    load_settings()


def test_unknown_variable_is_refused_with_a_suggestion(env):
    env.setenv("HPCDISTILL_TEMPERATUR", "2")
    with pytest.raises(ConfigError, match="did you mean HPCDISTILL_TEMPERATURE"):
        load_settings()


def test_describe_reports_source(env):
    env.setenv("HPCDISTILL_STEPS", "12")
    rows = {r["variable"]: r for r in describe(load_settings())}
    assert rows["HPCDISTILL_STEPS"]["value"] == "12" and rows["HPCDISTILL_STEPS"]["source"] == "environment"
    assert rows["HPCDISTILL_SEED"]["source"] == "default" and rows["HPCDISTILL_SEED"]["meaning"]


def test_cli_config_exit_codes():
    bad = subprocess.run([HPCDISTILL, "config"], env=job_env(HPCDISTILL_STEPS="abc"), capture_output=True, text=True)
    assert bad.returncode == 2 and "HPCDISTILL_STEPS" in bad.stderr and "'abc'" in bad.stderr
    good = subprocess.run([HPCDISTILL, "config"], env=job_env(HPCDISTILL_STEPS="7"), capture_output=True, text=True)
    assert good.returncode == 0 and any(line.split()[:3] == ["HPCDISTILL_STEPS", "7", "environment"]
                                        for line in good.stdout.splitlines())


def test_train_with_bad_setting_fails_before_mpi():
    """Exit 2 in a second, without starting MPI (no mpirun, no singleton init)."""
    proc = subprocess.run([HPCDISTILL, "train"], env=job_env(HPCDISTILL_BATCH_SIZE="-1"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "HPCDISTILL_BATCH_SIZE='-1'" in proc.stderr


@pytest.mark.parametrize("case", ["model", "dataset", "run_dir_file", "exchange_dir", "teachers"])
def test_free_form_settings_are_checked_against_the_filesystem_before_mpi(tmp_path, data_dir, case):
    """The path and name settings are valid as strings; `train` checks them against the files before
    MPI starts: exit 2 with the variable and a remedy (run without mpirun: no MPI is started at all)."""
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    env = {"HPCDISTILL_DATA_DIR": data_dir, "HPCDISTILL_RUN_DIR": tmp_path / "run"}
    env.update({
        "model": {"HPCDISTILL_MODEL": "charlm"},  # a sequence model for an image dataset
        "dataset": {"HPCDISTILL_DATASET": "mnist"},
        "run_dir_file": {"HPCDISTILL_RUN_DIR": blocked / "run"},
        "exchange_dir": {"HPCDISTILL_MODE": "codistill", "HPCDISTILL_EXCHANGE_DIR": blocked},
        "teachers": {"HPCDISTILL_MODE": "distill", "HPCDISTILL_TEACHERS": tmp_path / "nowhere.h5"},
    }[case])
    proc = subprocess.run([HPCDISTILL, "train"], env=job_env(**env), capture_output=True, text=True, timeout=60)
    want = {"model": "charlm", "dataset": "hpcdistill data import mnist", "run_dir_file": "HPCDISTILL_RUN_DIR",
            "exchange_dir": "HPCDISTILL_EXCHANGE_DIR",
            "teachers": "HPCDISTILL_TEACHERS"}[case]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert want in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,value,phrase", [
    ("LR", "inf", "finite number"), ("WEIGHT_DECAY", "inf", "finite number"), ("TEMPERATURE", "nan", "finite number"),
    ("DC_LAMBDA", "inf", "finite number"), ("STRAGGLER_DELAY", "inf", "finite number"),
    ("SEED", "1e20", "valid integer"), ("SEED", str(2**31), "less than or equal to 2147483647"),
    ("OMIT_CLASSES", "\u00b2", "class indices"), ("PARAM_HOSTS", "\u0661", "non-negative ranks"),
    ("MODE", "", "set but empty"), ("MODEL", " ", "set but empty"), ("TEACHERS", "", "set but empty"),
])
def test_values_that_once_slipped_through_are_refused(env, name, value, phrase):
    """inf passed the float checks (runs ended in exit 3 or a NaN summary), a huge seed overflowed, a
    superscript two passed isdigit(), and an empty HPCDISTILL_MODE silently ran sync."""
    env.setenv(PREFIX + name, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert f"{PREFIX}{name}={value!r}" in str(exc.value) and phrase in str(exc.value), str(exc.value)


def test_list_settings_take_colons_as_well_as_commas(env):
    """`sbatch --export=ALL,HPCDISTILL_PARAM_HOSTS=0,1` cuts the value at the comma; `0:1` survives it."""
    env.setenv("HPCDISTILL_PARAM_HOSTS", "0:1")
    env.setenv("HPCDISTILL_TEACHERS", "a.h5:b.h5")
    env.setenv("HPCDISTILL_OMIT_CLASSES", "3:5")
    s = load_settings()
    assert s.host_ranks == (0, 1) and s.teacher_paths == (Path("a.h5"), Path("b.h5")) and s.omitted_classes == (3, 5)
    env.setenv("HPCDISTILL_PARAM_HOSTS", "0, 2:4")  # mixed separators and blanks
    env.setenv("HPCDISTILL_TEACHERS", "runs/a,runs/b:c.h5")
    s = load_settings()
    assert s.host_ranks == (0, 2, 4) and s.teacher_paths == (Path("runs/a"), Path("runs/b"), Path("c.h5"))
    env.setenv("HPCDISTILL_MODE", "async")
    env.setenv("HPCDISTILL_PARAM_HOSTS", "0:1:2:3")
    env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="at least one worker"):
        load_settings()
    for bad in ("0::0", "0:x"):
        env.setenv("HPCDISTILL_PARAM_HOSTS", bad)
        with pytest.raises(ConfigError, match="HPCDISTILL_PARAM_HOSTS"):
            load_settings()
    env.setenv("HPCDISTILL_PARAM_HOSTS", "0")
    env.setenv("HPCDISTILL_OMIT_CLASSES", ":")
    with pytest.raises(ConfigError, match="class indices"):
        load_settings()


def test_describe_shows_computed_defaults(env):
    """The defaults that follow from other settings (blank in `hpcdistill config` before) have their value."""
    rows = {r["variable"]: r for r in describe(load_settings())}
    for var, value in (("LR", "0.05"), ("MODEL", "mlp"), ("GROUPS", "1"), ("DC_LAMBDA", "2.0")):
        assert (rows[PREFIX + var]["value"], rows[PREFIX + var]["source"]) == (value, "computed"), rows[PREFIX + var]
    assert rows[PREFIX + "RUN_DIR"]["value"] == "" and rows[PREFIX + "RUN_DIR"]["source"] == "default"
    env.setenv("HPCDISTILL_MODE", "codistill")
    env.setenv("HPCDISTILL_GROUP_MODE", "async")
    env.setenv("HPCDISTILL_DATASET", "text")
    env.setenv("HPCDISTILL_ASYNC_RULE", "dcasgd-c")
    rows = {r["variable"]: r["value"] for r in describe(load_settings())}
    assert [rows[PREFIX + v] for v in ("LR", "MODEL", "GROUPS", "DC_LAMBDA")] == ["0.003", "charlm", "2", "0.04"]
    env.setenv("HPCDISTILL_OPTIMIZER", "sgd")
    env.setenv("HPCDISTILL_LR", "0.5")
    rows = {r["variable"]: r for r in describe(load_settings(), kind="image")}
    assert rows[PREFIX + "LR"]["source"] == "environment" and rows[PREFIX + "LR"]["value"] == "0.5"
    assert rows[PREFIX + "MODEL"]["value"] == "mlp"  # the kind given wins over the built-in's


def _config_json(env: dict, prelude: str = "") -> dict:
    """`hpcdistill config --json` (after `prelude` in the same bash) as {variable: (value, source)}."""
    proc = subprocess.run(["bash", "-c", f"{prelude}\nexec {HPCDISTILL} config --json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {r["variable"]: (r["value"], r["source"]) for r in json.loads(proc.stdout)}


def test_settings_env_round_trip(env, tmp_path, data_dir):
    """`hpcdistill config --env` written to a file and sourced with `set -a` in a clean environment gives
    the same value for every setting: quoting (spaces, quotes, JSON), computed defaults pinned, unset
    ones left unset (an empty value would be refused)."""
    settings = {  # `env` (the fixture) keeps stray settings of this process out of Settings() below
        "HPCDISTILL_MODE": "codistill", "HPCDISTILL_GROUP_MODE": "async", "HPCDISTILL_DATA_DIR": data_dir,
        "HPCDISTILL_RUN_DIR": tmp_path / "my run's dir $HOME", "HPCDISTILL_MODEL_ARGS": '{"hidden": [32, 16]}',
        "HPCDISTILL_OMIT_CLASSES": "3:5", "HPCDISTILL_TEMPERATURE": "2.5", "HPCDISTILL_TENSORBOARD": "false",
        "HPCDISTILL_STALENESS_BOUND": "", "HPCDISTILL_WEIGHT_DECAY": "1e-05", "HPCDISTILL_PARAM_HOSTS": "0,1",
    }
    proc = subprocess.run([HPCDISTILL, "config", "--env"], env=job_env(**settings), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    path = tmp_path / "settings.env"
    path.write_text(text)
    assert "HPCDISTILL_LR=0.2  # (computed)" in text and "HPCDISTILL_GROUPS=2  # (computed)" in text
    assert "# HPCDISTILL_EXCHANGE_ID=" in text and "# HPCDISTILL_STALENESS_BOUND=" in text
    assert "HPCDISTILL_MODEL_ARGS='{\"hidden\": [32, 16]}'" in text

    before = _config_json(job_env(**settings))
    after = _config_json(job_env(), f"set -a; . {path}; set +a")
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert before[PREFIX + "LR"] == ("0.2", "computed") and after[PREFIX + "LR"] == ("0.2", "environment")
    assert after[PREFIX + "RUN_DIR"][0] == str(tmp_path / "my run's dir $HOME")
    unset = {k for k, (value, _) in before.items() if value == ""}
    assert unset and all(after[k] == ("", "default") for k in unset)
    # the file is also what settings_env() gives for the same settings in this process
    same = Settings(**{k[len(PREFIX):].lower(): v for k, v in settings.items() if v != ""})
    assert settings_env(same, kind="image") == text
    # unpinned: computed defaults as comments too, so the sourced settings are exactly the original ones
    path.write_text(settings_env(same, kind="image", pin_computed=False))
    assert "# HPCDISTILL_LR=0.2  # (computed)" in path.read_text()
    unpinned = _config_json(job_env(), f"set -a; . {path}; set +a")
    assert {k: v[0] for k, v in unpinned.items()} == {k: v[0] for k, v in before.items()}
    assert ({k for k, v in unpinned.items() if v[1] == "computed"}
            == {k for k, v in before.items() if v[1] == "computed"})


@pytest.mark.parametrize("settings, says", [
    ({"HPCDISTILL_TEACHER_AGE": "100", "HPCDISTILL_BURN_IN": "120"}, "at least TEACHER_AGE + EXCHANGE_EVERY = 150"),
    ({"HPCDISTILL_TEACHER_AGE": "100", "HPCDISTILL_BURN_IN": "150", "HPCDISTILL_MAX_STALENESS": "100"},
     "raise MAX_STALENESS to at least 149"),
    ({"HPCDISTILL_TEACHER_AGE": "0", "HPCDISTILL_CODISTILL_TARGET": "label-smoothing"}, "unset it"),
])
def test_teacher_age_is_checked_against_burn_in_and_staleness(env, settings, says):
    for k, v in {"HPCDISTILL_MODE": "codistill", **settings}.items():
        env.setenv(k, v)
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_settings()
