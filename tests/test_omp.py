"""OpenMP wait defaults: training spins briefly, the server sleeps, its training jobs do not
inherit its own default, and whatever a user sets is kept."""

from __future__ import annotations

import subprocess
import sys

from core_fixtures import subprocess_env

from faceid.omp import SERVER_MARK, TRAIN_SPINCOUNT, serving_defaults, training_child_env, training_defaults


def test_training_default_is_a_short_spin():
    env: dict[str, str] = {}
    training_defaults(env)
    assert env == {"GOMP_SPINCOUNT": TRAIN_SPINCOUNT}


def test_a_users_setting_wins_for_training():
    for given in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(given)
        training_defaults(env)
        assert env == given


def test_a_job_of_the_server_does_not_inherit_the_servers_default():
    server: dict[str, str] = {"PATH": "/bin"}
    serving_defaults(server)
    assert server["OMP_WAIT_POLICY"] == "PASSIVE"
    child = training_child_env(dict(server))
    assert child == {"PATH": "/bin", "GOMP_SPINCOUNT": TRAIN_SPINCOUNT}


def test_a_users_policy_reaches_the_server_and_its_jobs():
    for given in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        server = dict(given)
        serving_defaults(server)
        assert server == given  # no mark: the user chose it
        assert training_child_env(dict(server)) == given


def test_the_job_launcher_uses_it(monkeypatch):
    from app import processes

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv(SERVER_MARK, raising=False)
    serving_defaults()  # what create_app does
    env = processes.child_env()
    assert "OMP_WAIT_POLICY" not in env and SERVER_MARK not in env
    assert env["GOMP_SPINCOUNT"] == TRAIN_SPINCOUNT


def test_python_m_faceid_train_sets_it():
    code = (
        "import runpy, sys, os; sys.argv = ['faceid.train', '--help'];\n"
        "try: runpy.run_module('faceid.train', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print('SPIN', os.environ.get('GOMP_SPINCOUNT'))"
    )
    env = subprocess_env()
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert f"SPIN {TRAIN_SPINCOUNT}" in out.stdout, out.stderr[-2000:]
