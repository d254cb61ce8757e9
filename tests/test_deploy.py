"""deploy/: the compose file, nginx.conf and the Kubernetes manifests agree with FaceID's settings
and with each other. Parsed only: no Docker, no cluster, no network."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from app.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ROLES = ("api", "worker", "inference")
# Variables of compose's own ${...} substitution, never in a FaceID process's environment.
COMPOSE_ONLY = {"FACEID_PUBLISH", "FACEID_DB_PASSWORD"}
INFERENCE_URIS = ("/embed", "/embed/batch", "/verify", "/galleries/g1/identify")
API_URIS = ("/", "/jobs", "/jobs/abc/logs", "/model", "/docs", "/health", "/ready", "/galleries/g1", "/embedding")


def known_variables() -> set[str]:
    """FACEID_<NAME> of each Settings field, and the variables the code reads from os.environ."""
    fields = {ENV_PREFIX + n.upper() for n in Settings.model_fields if n != "poll_interval_s"}  # not a variable
    source = "\n".join(p.read_text() for d in ("faceid", "app") for p in (ROOT / d).rglob("*.py"))
    return fields | set(re.findall(r'(?:environ\.get\(|environ\[|getenv\()\s*"(FACEID_[A-Z0-9_]+)"', source))


@functools.cache
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yml").read_text())


@functools.cache
def manifests() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def of_kind(kind: str) -> list[dict]:
    return [d for d in manifests() if d["kind"] == kind]


def deployments() -> dict[str, tuple[dict, dict]]:
    """role (the pods' component label) -> (pod spec, the faceid container)"""
    pods = [d["spec"]["template"] for d in of_kind("Deployment")]
    faceid = [next(c for c in t["spec"]["containers"] if c["name"] == "faceid") for t in pods]
    return {t["metadata"]["labels"]["app.kubernetes.io/component"]: (t["spec"], c) for t, c in zip(pods, faceid)}


def k8s_env(container: dict) -> dict[str, object]:
    """name -> literal value, or ("secret", key) for a value from a Secret"""
    return {
        e["name"]: e["value"] if "value" in e else ("secret", e["valueFrom"]["secretKeyRef"]["key"])
        for e in container["env"]
    }


def literal(env: dict) -> dict[str, str]:
    return {k: v for k, v in env.items() if isinstance(v, str) and "${" not in v}


def resolved(env: dict) -> dict[str, str]:
    """compose's ${VAR:-default} as its default; a Secret's key as its value in secret.example.yaml"""
    secret = of_kind("Secret")[0]["stringData"]
    return {
        k: secret[v[1]] if isinstance(v, tuple) else re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in env.items()
    }


def compose_mounts(service: dict) -> dict[str, str]:
    """target path -> source, from short volume syntax (SOURCE:TARGET[:MODE])"""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def k8s_mounts(spec: dict, container: dict) -> dict[str, str]:
    """mount path -> claim name (or the volume's name when it is not a claim)"""
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName", v["name"]) for v in spec["volumes"]}
    return {m["mountPath"]: claims[m["name"]] for m in container["volumeMounts"]}


def test_every_faceid_variable_is_a_setting():
    known = known_variables()
    texts = [p.read_text() for p in sorted(DEPLOY.rglob("*")) if p.is_file()] + [(ROOT / "docs/DEPLOY.md").read_text()]
    named = set(re.findall(r"FACEID_[A-Z0-9_]*[A-Z0-9]", "\n".join(texts)))
    assert {"FACEID_RUN_JOBS", "FACEID_ROLE", "FACEID_MODELS_DIR"} <= named
    assert named - known - COMPOSE_ONLY == set()
    assert not COMPOSE_ONLY & {k for s in compose()["services"].values() for k in s.get("environment", {})}


def test_each_role_runs_its_command_and_settings_alike_in_compose_and_k8s():
    services = compose()["services"]
    ours = {r: (services[r]["command"], services[r]["environment"]) for r in ROLES}
    theirs = {r: (c["command"], k8s_env(c)) for r, (_, c) in deployments().items()}
    assert set(theirs) == set(ROLES)
    for r in ROLES:  # the same command and literal settings; the secret ones by name
        assert ours[r][0] == theirs[r][0] and literal(ours[r][1]) == literal(theirs[r][1]), r
        assert set(ours[r][1]) == set(theirs[r][1]), r
    assert ours["worker"][0] == ["faceid", "worker"]
    assert ours["api"][0] == ours["inference"][0] == ["faceid", "serve", "--host", "0.0.0.0", "--port", "8000"]
    for found in (ours, theirs):  # valid settings, the database URL and API key included
        settings = {r: load_settings(resolved(env)) for r, (_, env) in found.items()}
        assert settings["api"].run_jobs is False and settings["api"].role == "all"
        assert settings["inference"].role == "inference" and settings["worker"].role == "all"


def test_every_process_mounts_the_shared_models_folder_at_its_models_dir():
    services = compose()["services"]
    assert "models" in compose()["volumes"]
    k8s = deployments()
    for r in ROLES:
        env, (spec, container) = services[r]["environment"], k8s[r]
        mounts, kmounts = compose_mounts(services[r]), k8s_mounts(spec, container)
        assert env["FACEID_MODELS_DIR"] == "/models" and mounts["/models"] == "models", r
        assert kmounts[k8s_env(container)["FACEID_MODELS_DIR"]] == "faceid-models", r
        if "FACEID_DATA_DIR" in env:  # the datasets: the same mount for the API server and the workers
            assert mounts[env["FACEID_DATA_DIR"]] == "../data" and kmounts["/data"] == "faceid-data", r
    for env in (services["worker"]["environment"], k8s_env(k8s["worker"][1])):  # SQLite: not on a shared folder
        assert not env["FACEID_CACHE_DIR"].startswith(env["FACEID_MODELS_DIR"])
    pvcs = {p["metadata"]["name"]: p for p in of_kind("PersistentVolumeClaim")}
    assert pvcs["faceid-models"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_compose_services_share_one_image_and_wait_for_postgres():
    services = compose()["services"]
    faceid = {n: s for n, s in services.items() if s.get("command", [""])[0] == "faceid"}
    assert set(faceid) == set(ROLES)
    assert len({yaml.safe_dump(s["build"]) for s in faceid.values()}) == 1
    assert {s["image"] for s in faceid.values()} == {"faceid:latest"}
    build = faceid["api"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert {n: s["depends_on"]["postgres"]["condition"] for n, s in faceid.items()} == dict.fromkeys(
        ROLES, "service_healthy"
    )
    for name in set(services) - set(faceid):  # official images, at a tag other than latest
        image = services[name]["image"]
        assert "build" not in services[name] and ":" in image and not image.endswith(":latest"), name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert (DEPLOY / compose_mounts(services["nginx"])["/etc/nginx/nginx.conf"]).is_file()
    url = urlsplit(faceid["api"]["environment"]["FACEID_DATABASE_URL"])
    assert url.scheme == "postgresql" and url.hostname in services and url.port == 5432
    assert url.password == services["postgres"]["environment"]["POSTGRES_PASSWORD"]


def test_workers_stop_gracefully_and_get_a_gpu():
    grace = Settings.model_fields["cancel_grace_s"].default  # then the training process is killed
    worker, (spec, container) = compose()["services"]["worker"], deployments()["worker"]
    assert int(worker["stop_grace_period"].rstrip("s")) > grace and spec["terminationGracePeriodSeconds"] > grace
    assert worker["healthcheck"] == {"disable": True}  # the image's checks GET :8000/health; a worker has no port
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in of_kind("Deployment")}
    assert replicas == {"faceid-api": 1, "faceid-worker": 2, "faceid-inference": 2}
    assert [compose()["services"][r]["deploy"]["replicas"] for r in ("worker", "inference")] == [2, 2]


def nginx() -> str:
    return re.sub(r"#.*", "", (DEPLOY / "nginx.conf").read_text())


def nginx_upstream(uri: str) -> str:
    """The `host:port` nginx.conf proxies `uri` to, choosing a location as nginx does."""
    conf = nginx()
    hosts = dict(re.findall(r"set \$(\w+) http://([\w.-]+:\d+);", conf))
    locations = re.findall(r"location\s+(=|~\*?|\^~)?\s*(\S+)\s*\{\s*proxy_pass\s+\$(\w+);\s*\}", conf)
    assert len(locations) == conf.count("location ")
    for mod, pattern, var in locations:
        if mod == "=" and pattern == uri:
            return hosts[var]
    prefixes = [(p, m, v) for m, p, v in locations if m in ("", "^~") and uri.startswith(p)]
    prefix = max(prefixes, key=lambda t: len(t[0]), default=None)
    if prefix is None or prefix[1] != "^~":
        for mod, pattern, var in locations:
            if mod.startswith("~") and re.search(pattern, uri, re.I if mod == "~*" else 0):
                return hosts[var]
    assert prefix is not None, uri
    return hosts[prefix[2]]


def test_nginx_routes_inference_to_the_inference_servers_and_the_rest_to_the_api():
    services = compose()["services"]
    for uri in INFERENCE_URIS:
        assert nginx_upstream(uri) == "inference:8000", uri
    for uri in API_URIS:
        assert nginx_upstream(uri) == "api:8000", uri
    assert "resolver 127.0.0.11" in nginx()  # Docker's DNS: scaled replicas are found
    assert services["inference"]["command"][-1] == services["api"]["command"][-1] == "8000"
    limit = int(re.search(r"client_max_body_size\s+(\d+)m;", nginx())[1])
    default = Settings.model_fields
    assert limit >= default["batch_max_size"].default * default["max_upload_mb"].default + 1
    ingress = of_kind("Ingress")[0]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{limit}m"


def test_k8s_references_resolve():
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in of_kind("Deployment") + of_kind("StatefulSet")}
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    for name, s in services.items():
        match = [t for t in pods.values() if s["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert len(match) == 1, name
        ports = {p["name"] for c in match[0]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in s["spec"]["ports"]} <= ports, name
    secret = of_kind("Secret")[0]
    envs = [e for t in pods.values() for c in t["spec"]["containers"] for e in c.get("env", [])]
    refs = {(r["name"], r["key"]) for e in envs if (r := e.get("valueFrom", {}).get("secretKeyRef"))}
    assert refs and refs <= {(secret["metadata"]["name"], k) for k in secret["stringData"]}
    volumes = [v for t in pods.values() for v in t["spec"].get("volumes", [])]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    assert claims == {p["metadata"]["name"] for p in of_kind("PersistentVolumeClaim")}
    url = urlsplit(secret["stringData"]["database-url"])
    assert url.hostname in services and url.port == 5432 and url.password == secret["stringData"]["db-password"]
    for spec, _ in deployments().values():  # Services named faceid-* would add FACEID_*_PORT=tcp://... variables
        assert spec["enableServiceLinks"] is False


def test_ingress_routes_like_nginx_and_probes_fit_each_role():
    paths = of_kind("Ingress")[0]["spec"]["rules"][0]["http"]["paths"]
    services = {s["metadata"]["name"] for s in of_kind("Service")}
    assert {p["backend"]["service"]["name"] for p in paths} <= services
    to_inference = [p["path"] for p in paths if p["backend"]["service"]["name"] == "faceid-inference"]
    for uri in INFERENCE_URIS:
        assert any(re.match(p, uri) for p in to_inference), uri
    for uri in API_URIS:
        assert not any(re.match(p, uri) for p in to_inference), uri
    assert [p["backend"]["service"]["name"] for p in paths if p["path"] == "/"] == ["faceid-api"]
    k8s = deployments()
    ready = k8s["inference"][1]["readinessProbe"]
    assert "/ready" in (ready.get("httpGet", {}).get("path") or " ".join(ready["exec"]["command"]))
    # the API server must take the first job before any model exists: /ready would keep it out
    assert k8s["api"][1]["readinessProbe"]["httpGet"]["path"] == "/health"


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert all((K8S / f).is_file() for f in listed)
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
