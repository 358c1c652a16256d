"""Chapter 9's storages: a study in SQLite outlives its process; several worker processes share one
PostgreSQL study (a real server started here from the pgserver wheel) without losing or repeating a
trial; a worker killed in the middle of a trial has that trial retried."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import optuna
import pytest

from solutions import hpo

optuna.logging.set_verbosity(optuna.logging.WARNING)
EPOCHS = 1


def _count_in_new_process(storage, name):
    code = (f"import optuna; s = optuna.load_study(study_name={name!r}, storage={storage!r}); "
            "print(sum(t.state.name == 'COMPLETE' for t in s.trials))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver  # noqa: F401
            import psycopg2  # noqa: F401
    except ImportError as e:
        pytest.skip(f"pgserver/psycopg2 が入っていません（{e}）: pip install pgserver psycopg2-binary "
                    "（wheel のないプラットフォームでだけ起きるはずです）")
    server, url = hpo.start_postgres(tmp_path_factory.mktemp("pg") / "data")
    try:
        yield url
    finally:
        server.cleanup()


def test_sqlite_study_survives_a_new_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    subprocess.run(hpo.worker_command(url, "resume", 3, seed=0, epochs=EPOCHS), check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    study = hpo.make_study(url, "resume", seed=1)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    study.optimize(hpo.make_objective(hpo.make_train_fn(hpo.digits_splits(120, 80), EPOCHS)), n_trials=2)
    assert _count_in_new_process(url, "resume") == 5
    assert [t.number for t in study.trials] == list(range(5))


def test_postgres_server_is_real(postgres):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres)
    with engine.connect() as conn:
        version = conn.execute(sqlalchemy.text("select version()")).scalar()
    engine.dispose()
    assert version.startswith("PostgreSQL")


def test_workers_share_one_postgres_study(postgres):
    workers = 3
    name = f"shared-{workers}"
    configs = [{"learning_rate": 10 ** (-4 + 0.5 * i), "batch_size": 64, "optimizer": "adam",
                "weight_decay": 1e-5, "dropout": 0.1, "hidden_dim": 64, "num_layers": 2} for i in range(4)]
    run = hpo.parallel_run(postgres, name, workers, 6, EPOCHS, configs=configs)
    assert (run.trials, run.complete, run.unique_numbers) == (6, 6, True)
    study = optuna.load_study(study_name=name, storage=postgres)
    trials = study.trials
    assert sorted(t.number for t in trials) == list(range(6))
    ran = [t.params["learning_rate"] for t in trials]
    for c in configs:                                          # every queued config ran exactly once
        assert sum(abs(lr - c["learning_rate"]) < 1e-12 for lr in ran) == 1
    assert len({t.user_attrs["worker_pid"] for t in trials}) == workers     # every worker ran a trial
    assert _count_in_new_process(postgres, name) == 6


def test_killed_worker_trial_is_retried(postgres):
    demo = hpo.kill_demo(postgres, "kill", epochs=20, trials_per_worker=3)
    assert demo.states[demo.killed_trial] == "FAIL"
    assert demo.retries, "the failed trial was not queued again"
    assert all(demo.states[n] == "COMPLETE" for n in demo.retries)
    assert demo.same_params and demo.retry_value is not None
    assert "RUNNING" not in demo.states.values()
