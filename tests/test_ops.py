"""Operations artefacts: the Prometheus config and alert rules (checked and unit-tested with
promtool), the Grafana dashboard (every query parsed by a real Prometheus server), the Grafana
provisioning and docker-compose.yml.

Needs Debian's ``prometheus`` package (/usr/bin/promtool, /usr/bin/prometheus; ``make tools``)
and PyYAML. A missing tool fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml
except ImportError:  # reported by _yaml(), so that the other tests still run
    yaml = None

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "dtwin.json"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# The controller's metrics (the fixed contract with dtwin's exporter).
GAUGES = {
    "dtwin_allocation_efficiency_ratio",
    "dtwin_allocation_efficiency_mean_ratio",
    "dtwin_allocation_wastage_ratio",
    "dtwin_allocation_wastage_mean_ratio",
    "dtwin_allocation_utilization_ratio",
    "dtwin_allocation_utilization_mean_ratio",
    "dtwin_allocation_overprovisioning_units",
    "dtwin_allocation_overprovisioning_mean_units",
    "dtwin_allocation_underprovisioning_ratio",
    "dtwin_site_efficiency_ratio",
    "dtwin_site_overprovisioning_units",
    "dtwin_forecast_absolute_error_units",
    "dtwin_forecast_absolute_error_mean_units",
    "dtwin_model_info",
    "dtwin_sla_target_ratio",
    "dtwin_last_batch_processed_timestamp_seconds",
}
COUNTERS = {
    "dtwin_allocation_intervals_scored_total",
    "dtwin_allocation_underprovisioned_total",
    "dtwin_site_underprovisioned_total",
    "dtwin_samples_received_total",
    "dtwin_commands_sent_total",
    "dtwin_samples_rejected_total",
    "dtwin_model_swaps_total",
    "dtwin_window_gaps_total",
}
HISTOGRAMS = {
    "dtwin_inference_batch_duration_seconds",
    "dtwin_end_to_end_latency_seconds",
    "dtwin_produce_to_command_latency_seconds",
    "dtwin_batch_samples",
}
KNOWN_SERIES = (
    GAUGES | COUNTERS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
)
METRIC_RE = re.compile(r"\bdtwin_[a-z0-9_]+\b")

ALERT_NAMES = {
    "DtwinSlaBreached",
    "DtwinNoSamples",
    "DtwinRejectsRising",
    "DtwinHighLatency",
    "DtwinControllerDown",
    "DtwinModelRejected",
}
DTWIN_SERVICES = {"topics", "model", "controller", "replay"}
SERVICES = DTWIN_SERVICES | {"kafka", "prometheus", "grafana"}

# Grafana variables replaced by literals before a query goes to Prometheus.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$site": "site-0",
    "$allocator": "ai_sla",
}


# --- helpers -------------------------------------------------------------------------------

def _tool(name: str) -> str:
    """Path of a Prometheus binary; fails (never skips) when it is missing."""
    path = shutil.which(name) or f"/usr/bin/{name}"
    if os.access(path, os.X_OK):
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} not found on PATH or at /usr/bin/{name}: CI must install Debian's "
                    "'prometheus' package (make tools) before the tests", pytrace=False)
    pytest.fail(f"{name} not found on PATH or at /usr/bin/{name}: run `make tools` "
                "(installs Debian's 'prometheus' package: promtool and prometheus)", pytrace=False)


def _yaml(path: Path) -> Any:
    if yaml is None:
        pytest.fail("PyYAML is not installed: pip install -e '.[dev]' (it is a dev extra)",
                    pytrace=False)
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, those nested in collapsed rows included, rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for p in dash.get("panels", []):
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def _dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query target."""
    return [(p.get("title", "?"), t["expr"]) for p in _panels(dash) for t in p.get("targets", [])
            if t.get("expr")]


def _substitute(expr: str) -> str:
    for var, literal in GRAFANA_VARS.items():
        expr = expr.replace(f"${{{var[1:]}}}", literal).replace(var, literal)
    return expr


def _family(series: str) -> str:
    """dtwin_x_seconds_bucket -> dtwin_x_seconds for the histograms; other names unchanged."""
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series.removesuffix(suffix) in HISTOGRAMS:
            return series.removesuffix(suffix)
    return series


def _alert_rules() -> list[dict[str, Any]]:
    return [r for g in _yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:  # 400/422 carry Prometheus's JSON error
        body = exc.read().decode("utf-8", "replace")
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {exc.code}: {body[:300]}"}


# --- promtool ------------------------------------------------------------------------------

def test_promtool_check_config() -> None:
    # rule_files in prometheus.yml are relative to its folder, so alerts.yml is checked too.
    res = _run(_tool("promtool"), "check", "config", str(PROM_CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    res = _run(_tool("promtool"), "check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    res = _run(_tool("promtool"), "test", "rules", str(ALERTS_TEST))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


# --- the exporter's metric names ----------------------------------------------------------

def test_metric_lists_match_the_exporter() -> None:
    """GAUGES, COUNTERS and HISTOGRAMS are exactly what the real LoopMetrics registry exports."""
    from controller.metrics import LoopMetrics

    metrics = LoopMetrics(["ai_sla", "b1", "b2", "persistence_sla"], 0.01)
    exported: dict[str, set[str]] = {"gauge": set(), "counter": set(), "histogram": set()}
    for family in metrics.registry.collect():
        assert family.type in exported, f"{family.name}: unexpected metric type {family.type}"
        # prometheus-client drops the _total suffix from a counter family's name.
        name = family.name + "_total" if family.type == "counter" else family.name
        exported[family.type].add(name)
    assert exported["gauge"] == GAUGES
    assert exported["counter"] == COUNTERS
    assert exported["histogram"] == HISTOGRAMS
    assert set().union(*exported.values()) == GAUGES | COUNTERS | HISTOGRAMS


# --- Prometheus config and alerts ----------------------------------------------------------

def test_prometheus_scrapes_controller_every_5s() -> None:
    cfg = _yaml(PROM_CONFIG)
    assert cfg["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    ctl = jobs["dtwin-controller"]
    assert ctl["scrape_interval"] == "5s"
    targets = [t for sc in ctl["static_configs"] for t in sc["targets"]]
    assert targets == ["controller:9108"]


def test_alert_rules_cover_the_expected_alerts() -> None:
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    assert set(names) == ALERT_NAMES
    for r in rules:
        assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
        assert r["annotations"].get("summary"), r["alert"]
        # Counters are read through rate() or increase(), never raw (except the scored-intervals
        # guard).
        for counter in COUNTERS - {"dtwin_allocation_intervals_scored_total"}:
            for m in re.finditer(rf"\b{counter}\b", r["expr"]):
                before = r["expr"][: m.start()].rstrip()
                assert before.endswith(("rate(", "increase(")), (
                    f"{r['alert']}: {counter} not under rate() or increase()")


def test_each_alert_is_tested_firing_and_silent() -> None:
    spec = _yaml(ALERTS_TEST)
    assert spec["rule_files"] == ["alerts.yml"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in spec["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fired >= ALERT_NAMES, f"never shown firing: {sorted(ALERT_NAMES - fired)}"
    assert silent >= ALERT_NAMES, f"never shown silent: {sorted(ALERT_NAMES - silent)}"


def test_metric_names_are_the_exporters() -> None:
    used = {m for r in _alert_rules() for m in METRIC_RE.findall(r["expr"])}
    dash = _dashboard()
    used |= {m for _, expr in _dashboard_exprs(dash) for m in METRIC_RE.findall(expr)}
    for v in dash["templating"]["list"]:
        used |= set(METRIC_RE.findall(v.get("definition", "")))
    unknown = sorted(used - KNOWN_SERIES)
    assert not unknown, f"metric names the controller does not export: {unknown}"


# --- Grafana -------------------------------------------------------------------------------

def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["uid"] == "dtwin-loop"
    assert dash["title"] == "dtwin closed loop"
    ids = [p["id"] for p in dash["panels"]] + [
        q["id"] for p in dash["panels"] if p.get("type") == "row" for q in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    panels = _panels(dash)
    types = {p["type"] for p in panels}
    assert {"timeseries", "stat"} <= types
    for p in panels:
        title = p.get("title", "?")
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, title
        assert p.get("targets"), f"{title}: no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "prometheus", title
            assert t.get("refId") and t.get("expr"), title
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, title
    # No two top-level panels (rows included) share a grid cell. Panels inside a collapsed row
    # are left out: Grafana keeps their expanded positions, which later panels may reuse.
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g, title = p["gridPos"], p.get("title", "?")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{title} overlaps {cells[(x, y)]}"
                cells[(x, y)] = title
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "site" in variables
    assert variables["site"]["datasource"]["uid"] == "prometheus"
    assert any("$site" in expr for _, expr in _dashboard_exprs(dash))


def test_dashboard_covers_the_metrics() -> None:
    exprs = [expr for _, expr in _dashboard_exprs(_dashboard())]
    used = {_family(m) for e in exprs for m in METRIC_RE.findall(e)}
    missing = sorted((GAUGES | COUNTERS | HISTOGRAMS) - used)
    assert not missing, f"metrics on no panel: {missing}"
    for h in HISTOGRAMS:
        assert any("histogram_quantile(" in e and f"{h}_bucket" in e for e in exprs), h
    rate_exprs = [e for e in exprs if re.search(r"_total\b", e) and "rate(" in e]
    assert rate_exprs, "counters should be shown as rates"


def test_grafana_provisioning() -> None:
    ds = _yaml(DATASOURCES)["datasources"]
    assert [(d["uid"], d["type"]) for d in ds] == [("prometheus", "prometheus")]
    assert ds[0]["url"] == "http://prometheus:9090"
    providers = _yaml(DASHBOARD_PROVIDERS)["providers"]
    assert providers[0]["type"] == "file"
    compose = _yaml(COMPOSE)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert mounts[providers[0]["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


@pytest.fixture(scope="module")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus with alerts.yml loaded and nothing to scrape; yields its base URL."""
    binary = _tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    shutil.copy(ALERTS, tmp / "alerts.yml")
    (tmp / "prometheus.yml").write_text(
        "global:\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\nscrape_configs: []\n",
        encoding="utf-8")
    port = _free_port()
    log = (tmp / "prometheus.log").open("w", encoding="utf-8")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail("prometheus exited with code "
                            f"{proc.returncode}:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("prometheus not ready after 30 s:\n"
                            f"{(tmp / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_dashboard_queries_parse(prometheus_server: str) -> None:
    failures = []
    exprs = _dashboard_exprs(_dashboard())
    assert exprs
    for title, expr in exprs:
        query = _substitute(expr)
        assert "$" not in query, f"{title}: unreplaced Grafana variable in {query!r}"
        url = f"{prometheus_server}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        body = _get_json(url)
        if body.get("status") != "success":
            failures.append(f"{title}: {query}\n    -> {body.get('error')}")
    assert not failures, "queries Prometheus rejects:\n" + "\n".join(failures)


def test_server_loads_alert_rules(prometheus_server: str) -> None:
    body = _get_json(f"{prometheus_server}/api/v1/rules?type=alert")
    assert body["status"] == "success", body
    loaded = {r["name"] for g in body["data"]["groups"] for r in g["rules"]}
    assert loaded == ALERT_NAMES


# --- docker compose ------------------------------------------------------------------------

def test_compose_services() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == SERVICES

    assert services["kafka"]["image"] == "apache/kafka:3.9.0"
    kafka_env = services["kafka"]["environment"]
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]

    images = {services[s]["image"] for s in DTWIN_SERVICES}
    assert len(images) == 1, f"dtwin services should share one image: {images}"
    builders = [s for s in services if "build" in services[s]]
    assert builders == ["model"], f"the dtwin image should be built once, by model: {builders}"
    assert services["model"]["build"]["context"] == "."
    for s in DTWIN_SERVICES:
        assert services[s]["environment"]["DTWIN_BOOTSTRAP"] == "kafka:9092"
    assert DOCKERFILE.read_text(encoding="utf-8").splitlines().count("FROM python:3.11-slim") == 1

    def command(name: str) -> str:
        cmd = services[name]["command"]
        return " ".join(cmd) if isinstance(cmd, list) else cmd

    assert command("topics").startswith("dtwin topics create --bootstrap kafka:9092")
    model = command("model")
    for part in ("/models/current/manifest.json", "dtwin train --model delta_mlp",
                 "dtwin export /models/delta_mlp.pt"):
        assert part in model
    assert command("controller").startswith("dtwin controller --bootstrap kafka:9092")
    assert "--metrics-port 9108" in command("controller")
    assert command("replay").startswith("dtwin replay --bootstrap kafka:9092")

    ctl_deps = services["controller"]["depends_on"]
    assert ctl_deps["topics"]["condition"] == "service_completed_successfully"
    assert ctl_deps["model"]["condition"] == "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"

    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus")
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert any(str(p).split(":")[-1] == "3000" for p in grafana["ports"])
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_mounts_exist() -> None:
    compose = _yaml(COMPOSE)
    named = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in named, f"{name}: volume {source} not declared"
