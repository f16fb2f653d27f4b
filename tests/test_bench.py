"""The benchmarks still run: each bench script on the CPU, at the smallest sizes, end to end. A
GPU machine is lent rarely and briefly, so its prepared run (bench/gpu_suite.sh) must not meet a
renamed function there; nothing here is timed."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
# A tiny synthetic dataset for the quickstart-based benches: 8 training + 2 held-out identities.
TINY = ["synth_identities=10", "val_identities=2", "synth_test_identities=4", "synth_images_per_identity=4",
        "batch_size=16"]


def load(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(BENCH))
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_dry_run_writes_every_result(tmp_path):
    """bench/gpu_suite.sh with DRY_RUN=1: the same scripts and arguments' paths as on the GPU (the
    training steps of both stages against the baseline, a whole run's image stage against the bare
    step), on the CPU with the tiny model."""
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH / "gpu_suite.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "== train_step: exit 0" in log and "== gpu_check: exit 0" in log and "== gpu_tests: exit 0" in log
    steps = json.loads((tmp_path / "train_step.json").read_text())
    assert steps["stage1"]["ratio"] > 0 and steps["stage2"]["ratio"] > 0
    checks = {c["check"]: c for c in json.loads((tmp_path / "gpu_check.json").read_text())}
    assert set(checks) == {"machine", "bare_step", "image_stage_amp_true", "data_and_validation_share"}
    stage = checks["image_stage_amp_true"]
    assert stage["timed_epochs"] == 1 and stage["images_per_epoch"] > 0 and stage["validation_images"] > 0
    assert checks["data_and_validation_share"]["ratio"] == pytest.approx(
        stage["images_per_second"] / checks["bare_step"]["images_per_second"])


def test_train_step_takes_the_baseline_of_an_earlier_run_of_the_same_shapes(tmp_path, monkeypatch, capsys):
    """The compiled run of the suite reuses the eager run's baseline rates instead of timing them again."""
    bench = load("train_step", monkeypatch)
    tiny = ["--batch", "8", "--classes", "4", "--prompt-batch", "8", "--steps", "1", "--warmup", "0"]
    eager, again = tmp_path / "eager.json", tmp_path / "again.json"
    assert bench.main([*tiny, "--out", str(eager)]) == 0
    assert bench.main([*tiny, "--baseline-from", str(eager), "--out", str(again)]) == 0
    first, second = json.loads(eager.read_text()), json.loads(again.read_text())
    for stage in ("stage1", "stage2"):
        assert second[stage]["baseline"] == first[stage]["baseline"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # other shapes: the earlier baseline does not apply
        bench.main(["--batch", "16", "--classes", "4", "--steps", "1", "--baseline-from", str(eager)])
    assert stop.value.code == 2 and "--baseline-from" in capsys.readouterr().err


def test_gpu_suite_says_what_it_needs_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH / "gpu_suite.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_suite: needs CUDA")


def test_pipeline_bench_runs(tmp_path, monkeypatch, capsys):
    bench = load("pipeline", monkeypatch)
    sets = [a for o in [f"data_root={tmp_path / 'hands'}", *TINY] for a in ("--set", o)]
    assert bench.main([*sets, "--epochs", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cache_images")]
    assert [line.split(":")[0].split()[1] for line in lines] == ["false", "true"]
    assert all("data / step" in line for line in lines)


def test_eval_speed_bench_checks_both_evaluators_agree(monkeypatch, capsys):
    bench = load("eval_speed", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["eval_speed.py", "--queries", "40", "--gallery", "300", "--distractors", "60",
                                      "--ids", "20", "--cams", "3", "--repeats", "1", "--no-peak"])
    assert bench.main() == 0  # 1 when the numbers differ
    out = capsys.readouterr().out
    assert "-> same to 1e-6" in out and "speed ratio workbench / classic" in out


def test_tracking_and_tune_cost_benches_run(tmp_path, monkeypatch, capsys):
    tiny = [f"data_root={tmp_path / 'hands'}", *TINY, "epochs_prompt=1", "epochs_image=2"]
    quickstart = str(BENCH.parent / "experiments" / "quickstart.yaml")
    tracking = load("tracking_overhead", monkeypatch)
    tune = load("tune_cost", monkeypatch)
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    assert tracking.main([a for o in tiny for a in ("--set", o)] + ["--repeats", "1", "--config", quickstart]) == 0
    assert "overhead:" in capsys.readouterr().out
    assert tune.main([a for o in tiny for a in ("--both", o)] + ["--trials", "2", "--config", quickstart]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "2 trials of" in out


def test_study_time_splits_a_finished_study(tmp_path, monkeypatch, capsys):
    """Two trials written as a study would write them (journal times, log lines), with round
    numbers: the split is arithmetic on them."""
    import datetime

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(study_name="s", direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(tmp_path / "s.journal"))))
    t0 = datetime.datetime(2026, 11, 30, 10, 0, 0)
    # trial: (state, its end in s, the seconds of its epoch lines 1, 2, ...)
    plan = {0: (optuna.trial.TrialState.COMPLETE, 50, [12, 22, 32, 42]),
            1: (optuna.trial.TrialState.PRUNED, 30, [15, 25])}
    for number, (state, end, lines) in plan.items():
        study.add_trial(optuna.trial.FrozenTrial(
            number=number, trial_id=number, state=state, value=1.0 if state.name == "COMPLETE" else None,
            datetime_start=t0, datetime_complete=t0 + datetime.timedelta(seconds=end), params={}, distributions={},
            user_attrs={}, system_attrs={}, intermediate_values={len(lines): 1.0}))
        log = tmp_path / "runs" / f"s_trial{number}" / "run" / "run.log"
        log.parent.mkdir(parents=True)
        log.write_text("".join(f"{t0 + datetime.timedelta(seconds=sec):%Y-%m-%d %H:%M:%S} image epoch {e}/4: loss 1\n"
                               for e, sec in enumerate(lines, 1)))
    load("study_time", monkeypatch).main(["--journal", str(tmp_path / "s.journal"), "--study", "s",
                                          "--runs", str(tmp_path / "runs"), "--n-jobs", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["0", "COMPLETE", "4", "50.0", "2.0", "40.0", "10.00", "8.0"]  # setup 12 - one epoch
    assert out[2].split() == ["1", "PRUNED", "2", "30.0", "5.0", "20.0", "10.00", "5.0"]
    assert out[4] == "study: 2 trials in 50 s on 2 slots; 6 image epochs (10.00 s each in a slot)"
    shares = {line.split()[0]: line.split()[1:4:2] for line in out[5:9]}  # 100 slot-seconds in all
    assert shares == {"epochs": ["60", "60.0%"], "setup": ["7", "7.0%"], "end": ["13", "13.0%"],
                      "idle": ["20", "20.0%"]}


def test_step_floor_accounts_for_the_profiled_step(tmp_path, monkeypatch, capsys):
    """bench/step_floor.py: every profiled op lands in one kind, the kinds add up to the profiled
    step, and each of the step's matrix-product shapes and its attention are timed alone."""
    bench = load("step_floor", monkeypatch)
    out = tmp_path / "floor.json"
    assert bench.main(["--steps", "1", "--warmup", "1", "--profile-steps", "1", "--reps", "1", "--out", str(out)]) == 0
    numbers = json.loads(out.read_text())
    kinds = numbers["ms_per_step_by_kind"]
    assert set(kinds) == {"matrix products", "attention", "GELU", "layer norm", "copies and fills", "rest"}
    assert sum(kinds.values()) == pytest.approx(numbers["profiled_ms_per_step"])
    assert numbers["step"]["gflop"] > 1 and numbers["matmuls_alone"]["ms_per_step"] > 0
    assert numbers["attention_calls_per_step"] == 3  # wb-tiny's three layers, once each per step
    assert set(numbers["attention_alone_ms_per_step"]) == {"flash", "math"}
    assert "matrix products alone" in capsys.readouterr().out
    assert bench.kind_of("aten::addmm") == "matrix products" and bench.kind_of("aten::lerp_") == "rest"
