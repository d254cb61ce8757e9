"""Security rules checked on the source and at run time: checkpoints only
loaded with weights_only=True, no shell anywhere, SQL only with parameters, the API key compared
in constant time, needed on every route the app has (not only the ones listed in tests/app), and
never handed to a training process or written to a log.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
from pathlib import Path

import pytest
from reliability_helpers import HERE, REPO
from service_helpers import running, wait_job

SOURCES = sorted((REPO / "faceid").glob("*.py")) + sorted((REPO / "app").rglob("*.py"))
KEY = "k3y-for-the-security-tests-0123"


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return "?"


def test_sources_found():
    assert len(SOURCES) > 15 and any(p.name == "store.py" for p in SOURCES)


def test_every_torch_load_is_weights_only():
    loads = []
    for path in SOURCES:
        for call in _calls(path):
            if _name(call.func).endswith("torch.load"):
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                loads.append((path.name, call.lineno, ok))
    assert loads, "no torch.load found at all"
    assert all(ok for _, _, ok in loads), [x for x in loads if not x[2]]


def test_no_shell_anywhere():
    found = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                found.append((path.name, call.lineno, name))
            for k in call.keywords:
                if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    found.append((path.name, call.lineno, "shell="))
            if name.startswith("subprocess.") and call.args and isinstance(call.args[0], (ast.Constant, ast.JoinedStr)):
                found.append((path.name, call.lineno, "command as a string"))
    assert not found, found


# The modules that hold SQL, and the calls that take SQL text as their first argument:
# the engines' own (execute...) and faceid.database.Database's, with the gallery store's helpers.
SQL_MODULES = ("database.py", "store.py", "gallery_store.py", "facecache.py", "teacher.py")
SQL_CALLS = {"execute", "executemany", "executescript", "run", "insert", "one", "all", "dicts", "chunks"}
SQL_CALLS |= {"_one", "_agg", "_all"}
# Names an f-string of SQL may interpolate: column assignments and ? marks built from a fixed list
# (app/store.py's _UPDATABLE), or a literal WHERE clause picked by the code.
SQL_FRAGMENTS = {"assignments", "marks", "where", "stale"}


def _migrations_are_literals(path: Path) -> bool:
    """A module's MIGRATIONS: Migration(...) and AddColumn(...) of literal strings and numbers only."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MIGRATIONS" for t in node.targets):
            for inner in ast.walk(node.value):
                if isinstance(inner, (ast.JoinedStr, ast.BinOp, ast.Attribute, ast.Subscript)):
                    return False
                if isinstance(inner, ast.Name) and inner.id not in ("Migration", "AddColumn"):
                    return False
            return True
    return False


def _sql_ok(path: Path, call: ast.Call) -> bool:
    sql = call.args[0] if call.args else None
    has_params = len(call.args) > 1
    if isinstance(sql, ast.Constant) and isinstance(sql.value, str):
        return sql.value.count("?") == 0 or has_params
    if isinstance(sql, ast.JoinedStr):
        for v in sql.values:
            if not isinstance(v, ast.FormattedValue):
                continue
            value = v.value
            if isinstance(value, ast.Name) and value.id in SQL_FRAGMENTS:
                continue
            # Database.migrate's ALTER TABLE from a literal AddColumn, has_column's checked table name
            if path.name == "database.py" and (
                (isinstance(value, ast.Attribute) and getattr(value.value, "id", None) == "step")
                or (isinstance(value, ast.Name) and value.id == "table")
            ):
                continue
            return False
        return "?" not in "".join(str(v.value) for v in sql.values if isinstance(v, ast.Constant)) or has_params
    if isinstance(sql, ast.Name) and sql.id == "sql":  # a helper passing its caller's SQL on: checked there
        return has_params
    if isinstance(sql, ast.Name) and sql.id == "step":  # a migration's statement: checked as a literal
        return path.name == "database.py"
    if isinstance(sql, ast.Call) and _name(sql.func) == "self.sql":  # the engine's form of a checked SQL text
        return path.name == "database.py" and has_params
    return False


def test_sql_text_never_holds_values():
    """Every call that takes SQL text gets a literal, or an f-string of column names and `?` marks
    built from a fixed list (app/store.py's _UPDATABLE) or a literal clause; values go in as
    parameters. Helpers that pass their `sql` on are held to the rule at their own callers, and the
    migrations run statements from literal tables."""
    calls = []
    for path in SOURCES:
        if path.name not in SQL_MODULES:
            continue
        for call in _calls(path):
            attr = call.func.attr if isinstance(call.func, ast.Attribute) else None
            if attr in SQL_CALLS and call.args:
                calls.append((path.name, call.lineno, _sql_ok(path, call)))
    assert len(calls) >= 40 and {c[0] for c in calls} == set(SQL_MODULES)
    assert all(ok for *_, ok in calls), [c for c in calls if not c[2]]
    for name in ("app/store.py", "faceid/gallery_store.py"):
        assert _migrations_are_literals(REPO / name), name
    # nothing else in the project talks to a database engine directly
    for path in SOURCES:
        text = path.read_text()
        if path.name not in SQL_MODULES:
            assert "sqlite3.connect" not in text and "psycopg.connect" not in text, path
    store = (REPO / "app" / "store.py").read_text()
    assert "assert set(names) <= _UPDATABLE" in store and "unknown = set(values) - _UPDATABLE" in store


def test_api_key_compared_in_constant_time():
    source = (REPO / "app" / "middleware.py").read_text()
    assert "hmac.compare_digest(given, expected)" in source
    tree = ast.parse(source)
    for node in ast.walk(tree):  # no ==/!= on anything called *key*
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = {
                n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "") for n in [node.left, *node.comparators]
            }
            assert not any("key" in n.lower() for n in names if n), ast.dump(node)


@pytest.mark.anyio
async def test_every_route_of_the_app_needs_the_key(make_app):
    """Every operation of the OpenAPI document (so a route added later is covered too), the docs,
    and unknown paths."""
    app = make_app(api_key=KEY)
    async with running(app) as client:
        schema = (await client.get("/openapi.json", headers={"X-API-Key": KEY})).json()
        requests = [(method.upper(), path) for path, ops in schema["paths"].items() for method in ops]
        requests += [("GET", p) for p in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")]
        requests += [("GET", "/nope"), ("DELETE", "/jobs"), ("PUT", "/model"), ("GET", "/health/../jobs")]
        for method, path in requests:
            r = await client.request(method, path.replace("{job_id}", "0" * 32))
            if path == "/health":
                assert r.status_code == 200
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                assert KEY not in r.text
        assert len(requests) >= 20


@pytest.mark.anyio
async def test_key_never_reaches_a_training_process_or_the_log(make_app, job_body, tmp_path, caplog, monkeypatch):
    """The server runs with FACEID_API_KEY in its environment, as in production: the training
    process's environment lacks it, and nothing logged while jobs run and requests fail holds it."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FACEID_API_KEY", KEY)
    app = make_app(api_key=KEY, trainer_cmd=(sys.executable, str(HERE / "trainers.py"), "dump_env"))
    headers = {"X-API-Key": KEY}
    async with running(app) as client:
        job = (await client.post("/jobs", json=job_body, headers=headers)).json()
        done = await wait_job(client, job["id"], headers=headers)
        assert done["status"] == "succeeded"
        await client.get("/jobs", headers={"X-API-Key": KEY[:-1]})
        await client.post("/jobs", json={**job_body, "epochs": -1}, headers=headers)
        logs = (await client.get(f"/jobs/{job['id']}/logs", headers=headers)).text
        stored = (await client.get(f"/jobs/{job['id']}", headers=headers)).text
    env = json.loads((tmp_path / "models" / "jobs" / job["id"] / "env.json").read_text())
    assert "FACEID_API_KEY" not in env and KEY not in json.dumps(env)
    assert KEY not in caplog.text and KEY not in logs and KEY not in stored
    for f in (tmp_path / "models").rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
