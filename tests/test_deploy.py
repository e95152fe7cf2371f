"""deploy/: containers, Prometheus, Grafana and Kubernetes, checked for real as far as this machine allows.

There is no Docker engine or cluster here, so: the real server, after real traffic, exports every metric that
the dashboard and the alert rules query; promtool checks the Prometheus config and rules; a real Prometheus
scrapes the real server and evaluates every dashboard query and alert rule; the Kubernetes manifests validate
against the Kubernetes JSON schemas (kubernetes-validate, offline) and refer to each other consistently; the
compose file and the Dockerfiles are checked for what they refer to.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from dataclasses import fields
from fnmatch import fnmatch
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "landermt.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
K8S_VERSION = "1.33"  # the oldest Kubernetes these manifests are meant for; kubernetes-validate ships its schemas
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}  # what Grafana substitutes before a query reaches Prometheus

SELECTOR = re.compile(r"\b(landermt_[a-zA-Z0-9_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUP_BY = re.compile(r"\bby\s*\(([^)]*)\)")



def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: install the Debian package `prometheus` (.ci/run does)"
    return path


# --- the expressions under test ---------------------------------------------------------------------------

def dashboard_queries() -> dict[str, str]:
    """'panel title/refId' -> PromQL as Prometheus receives it (Grafana variables substituted)."""
    queries = {}

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                queries[f"{panel['title']}/{target['refId']}"] = expr

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def all_queries() -> dict[str, str]:
    return {f"dashboard {k}": v for k, v in dashboard_queries().items()} | {
        f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}


# --- the real server, with traffic ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(server) -> dict[str, dict[str, set[str]]]:
    """After translations in several pairs, a client error and a finished job: sample name -> label -> values
    in /metrics (labelled series appear only once something has been counted under them)."""
    for source, target, text in [("en", "de", "The weather is nice."), ("fr", "zh", "Il fait beau."),
                                 ("de", "en", "Das Wetter ist schön.")]:
        response = httpx.post(f"{server}/translate", json={"q": text, "source": source, "target": target}, timeout=60)
        assert response.status_code == 200, response.text
    assert httpx.post(f"{server}/translate", json={"q": "x", "source": "en", "target": "xx"}).status_code == 400
    lines = "".join(json.dumps({"id": str(i), "text": text, "source": "en", "target": "it"}) + "\n"
                    for i, text in enumerate(["Good morning.", "Where is the station?"]))
    job = httpx.post(f"{server}/jobs", content=lines, headers={"content-type": "application/x-ndjson"}, timeout=60)
    assert job.status_code == 201, job.text
    deadline = time.monotonic() + 180
    while (status := httpx.get(f"{server}/jobs/{job.json()['id']}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, f"job did not finish: {status}"
        time.sleep(0.2)
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return samples


# --- Prometheus config and rules --------------------------------------------------------------------------

def test_promtool_checks_prometheus_config_and_alert_rules():
    # `check config` also checks the rule files the config names (alerts.yml).
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], ["check", "rules", str(ALERTS)]):
        result = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each dashboard query as a recording rule: promtool then parses it as PromQL."""
    queries = dashboard_queries()
    leftover = {name: expr for name, expr in queries.items() if "$" in expr}
    assert not leftover, f"Grafana variables this test does not substitute: {leftover}"
    rules = [{"record": f"landermt:dashboard:{i}", "expr": expr} for i, expr in enumerate(queries.values())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"a dashboard query is not valid PromQL:\n{result.stdout}{result.stderr}"


def test_alerts_cover_errors_latency_queue_and_jobs():
    used = {name for rule in alert_rules() for name, _ in SELECTOR.findall(rule["expr"])}
    wanted = {"error rate": "landermt_http_requests_total", "p95 latency": "landermt_request_seconds_bucket",
              "queue depth": "landermt_queued_texts", "job failures": "landermt_jobs"}
    missing = [topic for topic, name in wanted.items() if name not in used]
    assert not missing, f"no alert rule on {missing}"
    assert all(rule.get("annotations", {}).get("summary") for rule in alert_rules()), "every alert needs a summary"


# --- the metrics the dashboard and alerts use exist -------------------------------------------------------

def test_every_queried_metric_and_label_is_exported(exported):
    problems = []
    for where, expr in all_queries().items():
        selectors = SELECTOR.findall(expr)
        if not selectors and not re.search(r"\bup\{", expr):
            problems.append(f"{where}: queries no landermt_ metric: {expr}")
        labels_here = {"le"}
        for name, matchers in selectors:
            if name not in exported:
                problems.append(f"{where}: {name} is not in /metrics")
                continue
            labels_here |= set(exported[name])
            for label, op, value in MATCHER.findall(matchers):
                if label not in exported[name]:
                    problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(exported[name])})")
                elif op == "=" and value not in exported[name][label]:
                    problems.append(f"{where}: {name}{{{label}={value!r}}} never appears "
                                    f"(values: {sorted(exported[name][label])})")
        for group in GROUP_BY.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                if label not in labels_here:
                    problems.append(f"{where}: groups by {label!r}, which none of its metrics has")
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_exported_metric(exported):
    used = {name for expr in dashboard_queries().values() for name, _ in SELECTOR.findall(expr)}
    families = {name.removesuffix("_total") for name in exported if name.startswith("landermt_")
                and not name.endswith(("_bucket", "_sum", "_count", "_created"))}
    families |= {name.removesuffix("_bucket") for name in exported if name.endswith("_bucket")}
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    missing = sorted(f for f in families if not any(f + suffix in used for suffix in suffixes))
    assert not missing, f"metrics exported by the server but on no dashboard panel: {missing}"


def test_dashboard_is_wired_to_the_provisioned_datasource():
    grafana = DEPLOY / "grafana"
    source = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    wrong = [p["title"] for p in panels if p.get("datasource", {}).get("uid") != source["uid"]
             or any(t["datasource"]["uid"] != source["uid"] for t in p["targets"])]
    assert not wrong, f"panels not on datasource uid {source['uid']!r}: {wrong}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "duplicate panel ids"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in compose["prometheus"]["ports"]
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "landermt.yml").read_text())["providers"][0]
    mounts = dict(v.split(":")[:2] for v in compose["grafana"]["volumes"])
    assert mounts.get("./grafana/dashboards") == provider["options"]["path"], \
        "the dashboard provider's path is not where compose.yaml mounts deploy/grafana/dashboards"


# --- a real Prometheus scraping the real server ----------------------------------------------------------

@pytest.fixture
def prometheus(server, tmp_path):
    """Debian's prometheus binary on a free loopback port, scraping the test server every second and
    evaluating deploy/prometheus/alerts.yml every second."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: install the Debian package `prometheus` (.ci/run does)"
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "landermt",
                                  "static_configs": [{"targets": [server.removeprefix("http://")]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"prometheus exited:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "prometheus did not become ready within 60 s"
        try:
            if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    yield base
    process.terminate()
    process.wait(timeout=30)
    log.close()


def query(base: str, expr: str) -> dict:
    body = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]


def test_real_prometheus_scrapes_the_server_and_evaluates_every_query(exported, prometheus):
    deadline = time.monotonic() + 60
    while not (result := query(prometheus, "landermt_http_requests_total")["result"]):
        assert time.monotonic() < deadline, "Prometheus scraped no landermt_http_requests_total within 60 s"
        time.sleep(0.5)
    assert any(r["metric"].get("endpoint") == "/translate" and r["metric"].get("status") == "200" for r in result)
    time.sleep(3)  # a few more scrapes, so rate() over 1m has two samples
    for where, expr in all_queries().items():
        data = query(prometheus, expr)
        assert data["resultType"] == "vector", f"{where}: {data['resultType']}"
    throughput = query(prometheus, dashboard_queries()["Texts by language pair/A"])["result"]
    assert {r["metric"]["pair"] for r in throughput} >= {"en-de", "fr-zh", "de-en"}, throughput

    rules: list[dict] = []
    deadline = time.monotonic() + 30
    while not rules or any(rule["health"] == "unknown" for rule in rules):
        assert time.monotonic() < deadline, f"alert rules not evaluated within 30 s: {rules}"
        time.sleep(0.5)
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
    assert sorted(rule["name"] for rule in rules) == sorted(rule["alert"] for rule in alert_rules())
    failing = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not failing, f"alert rules that fail to evaluate: {failing}"


# --- Kubernetes ------------------------------------------------------------------------------------------

def manifests() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


# Not a core kind, so kubernetes-validate has no schema for it. Written here from the Prometheus Operator's
# ServiceMonitor API reference (monitoring.coreos.com/v1), for the fields these manifests use; unknown fields
# are rejected, so a misspelt or misplaced key fails as it would against the CRD.
LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array"}}}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": LABEL_SELECTOR,
                     "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                         "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "properties": {
                             "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                             "scheme": {"enum": ["http", "https"]}, "interval": DURATION, "scrapeTimeout": DURATION,
                             "honorLabels": {"type": "boolean"}}}}}}}}


def test_kubernetes_manifests_validate_against_the_schemas():
    problems, kinds = [], set()
    for doc in manifests():
        kinds.add(doc["kind"])
        try:
            if doc["kind"] == "ServiceMonitor":
                jsonschema.validate(doc, SERVICE_MONITOR)
            else:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not problems, "\n".join(problems)
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "PersistentVolumeClaim",
                     "Job"}, kinds


def test_the_schema_checks_reject_a_misspelt_field():
    """The validation above must not pass everything: a misspelt key fails in each checker."""
    docs = {doc["kind"]: doc for doc in manifests()}
    deployment = copy.deepcopy(docs["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    monitor = copy.deepcopy(docs["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        jsonschema.validate(monitor, SERVICE_MONITOR)


def server_env_names() -> set[str]:
    """LANDERMT_* variables the code reads: every server setting, plus those read with os.environ.get."""
    names = {f"LANDERMT_{f.name.upper()}" for f in fields(Settings)}
    for path in [*ROOT.glob("landermt/*.py"), *ROOT.glob("server/*.py"), *ROOT.glob("training/*.py")]:
        names |= set(re.findall(r"""environ\.get\(["'](LANDERMT_\w+)""", path.read_text()))
    return names


def pvc_path(pod: dict, container: dict, path: str) -> tuple[str, str]:
    """(claim name, path inside the claim) of `path` in `container`; fails if no claim is mounted there."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    for mount in sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and mount["name"] in claims:
            return claims[mount["name"]], path[len(root):].strip("/")
    raise AssertionError(f"{container['name']}: {path} is on no persistent volume")


def test_kubernetes_manifests_fit_together():
    docs = manifests()
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    claims = {c["metadata"]["name"]: c for c in by_kind["PersistentVolumeClaim"]}
    env_names = server_env_names()

    job = by_kind["Job"][0]
    job_pod = job["spec"]["template"]["spec"]
    train = job_pod["containers"][0]
    command = train["command"]
    assert command[:3] == ["python", "-m", "training.run"], command
    assert (ROOT / command[command.index("--config") + 1]).is_file(), "the Job's --config is not in the repository"
    output = command[command.index("--output") + 1]
    written = pvc_path(job_pod, train, output)

    images = {c["image"] for d in [job, *deployments.values()] for c in
              d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])}
    assert len(images) == 1, f"one image for everything, found {images}"

    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items(), f"{name}: selector misses its pods"
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: no PVC {volume}"
        container = next(c for c in pod["containers"] if c["name"] == "server")
        env = {e["name"]: e["value"] for e in container["env"]}
        assert set(env) <= env_names, f"{name}: variables the server does not read: {set(env) - env_names}"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(env["LANDERMT_PORT"]) == ports["http"] and env["LANDERMT_HOST"] == "0.0.0.0"
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}, name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), f"{name}: resource requests"
        # The served artifact is the one the Job writes: <output>/artifact on the same volume.
        assert env["LANDERMT_ARTIFACT"] == f"{output}/artifact", f"{name}: LANDERMT_ARTIFACT vs Job --output"
        assert pvc_path(pod, container, env["LANDERMT_ARTIFACT"]) == (written[0], f"{written[1]}/artifact")
        wait = " ".join(pod["initContainers"][0]["command"])
        assert f"{output}/eval.json" in wait, f"{name}: the init container does not wait for the Job's last output"

    for name, service in services.items():
        selected = [d for d in deployments.values()
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"service {name} selects {len(selected)} deployments"
        container_ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports, f"service {name}: targetPort"

    # SQLite on a ReadWriteOnce volume: only an unscaled, Recreate-strategy Deployment may hold it.
    scaled = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in by_kind["HorizontalPodAutoscaler"]}
    assert scaled <= set(deployments), f"the HPA targets a missing Deployment: {scaled}"
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        rwo = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
               and "ReadWriteOnce" in claims[v["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"]]
        if rwo:
            assert name not in scaled and deployment["spec"]["replicas"] == 1, f"{name} scales with RWO {rwo}"
            assert deployment["spec"]["strategy"]["type"] == "Recreate", f"{name}: two pods would share {rwo}"

    monitor = by_kind["ServiceMonitor"][0]
    monitored = [s for s in services.values()
                 if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in monitored} == set(services), "the ServiceMonitor misses a Service"
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in monitored)

    for ingress in by_kind.get("Ingress", []):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services, f"ingress {path['path']}: no service {backend['name']}"
                assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
                if path["path"] == "/jobs":  # jobs must reach the pod that holds the job database
                    target = next(d for d in deployments.values() if services[backend["name"]]["spec"]["selector"]
                                  .items() <= d["spec"]["template"]["metadata"]["labels"].items())
                    assert "landermt-jobs" in {v.get("persistentVolumeClaim", {}).get("claimName")
                                               for v in target["spec"]["template"]["spec"]["volumes"]}


def test_probe_paths_answer_on_the_real_server(server):
    for deployment in (d for d in manifests() if d["kind"] == "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                path = container[probe]["httpGet"]["path"]
                assert httpx.get(f"{server}{path}").status_code == 200, f"{probe} {path}"


# --- compose and Dockerfiles -----------------------------------------------------------------------------

def test_compose_file_refers_to_what_exists():
    # No Docker here (`docker compose config` is unavailable), so a structural check of what it refers to.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services, volumes = compose["services"], set(compose["volumes"])
    assert {"landermt", "prometheus", "grafana"} <= set(services)
    env_names = server_env_names()
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume).split(":")[0]  # ${VAR:-default} -> default
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                if path.is_relative_to(ROOT):  # paths outside the checkout (the training data) are the user's
                    assert path.exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared under volumes:"
        unknown = {k for k in service.get("environment", {}) if k.startswith("LANDERMT_")} - env_names
        assert not unknown, f"{name}: variables the server does not read: {unknown}"
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: no Dockerfile"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    targets = [t for job in scrape for config in job["static_configs"] for t in config["targets"]]
    assert targets == ["landermt:8000"] and "8000:8000" in services["landermt"]["ports"], targets
    assert any(v.startswith("./prometheus:/etc/prometheus") for v in services["prometheus"]["volumes"])


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in map(str.strip, text.splitlines())
            if line and not line.startswith("#")]


@pytest.mark.parametrize("name,command", [("Dockerfile", '["python", "-m", "server"]'),
                                          ("deploy/Dockerfile.gpu", '["python", "-m", "server", "--backend", "vllm"]')])
def test_dockerfile(name, command):
    # No Docker engine here to build the images; this checks what they refer to and the runtime stage's contract.
    instructions = dockerfile(ROOT / name)
    runtime = instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM"):]
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()[:1] not in ("", "#")]
    for word, args in instructions:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"
                assert not any(fnmatch(source.split("/")[0], p) for p in ignored), f"{name}: {source} is dockerignored"
    env = {}
    for word, args in runtime:
        if word == "ENV":
            env |= dict(re.findall(r"(\w+)=(\S+)", args))
    unknown = {k for k in env if k.startswith("LANDERMT_")} - server_env_names()
    assert not unknown, f"{name}: variables the code does not read: {unknown}"
    assert env["LANDERMT_HOST"] == "0.0.0.0" and env["LANDERMT_JOBS_DB"].startswith("/var/lib/landermt/")
    last = dict(runtime)  # the last of each instruction in the runtime stage
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", last["USER"]), f"{name}: the runtime user must be a non-root uid"
    assert last["EXPOSE"] == env["LANDERMT_PORT"] == "8000"
    assert "/health" in last["HEALTHCHECK"] and "${LANDERMT_PORT}" in last["HEALTHCHECK"]
    assert "/artifacts" in last["VOLUME"] and "/var/lib/landermt" in last["VOLUME"]
    assert last["CMD"] == command
    builds = " ".join(args for word, args in instructions if word == "RUN")
    assert "default_model_dir()" in builds, f"{name}: the default model is not converted at build time"
    if name == "Dockerfile":
        assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in builds
    else:
        assert "vllm==0.33.0" in builds
