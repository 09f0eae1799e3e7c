"""Operations artefacts: the Prometheus config and alert rules (checked and unit-tested with
promtool), the Grafana dashboard (every query parsed by a real Prometheus server), the Grafana
provisioning and docker-compose.yml; and, marked ``kafka``, the dashboard and the alerts against
a real Prometheus scraping a real controller that has processed a short replay of the real data.

Needs Debian's ``prometheus`` package (/usr/bin/promtool, /usr/bin/prometheus; ``make tools``)
and PyYAML. A missing tool fails these tests, it never skips them.
"""

from __future__ import annotations

import contextlib
import json
import math
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
JOB = "dtwin-controller"

# The controller's metrics: the contract with controller/metrics.py (checked against a live
# worker's /metrics by test_live_dashboard_and_alerts).
GAUGES = {
    "dtwin_site_demand_units",
    "dtwin_site_forecast_units",
    "dtwin_site_allocated_units",
    "dtwin_site_headroom_ratio",
    "dtwin_last_batch_processed_timestamp_seconds",
    "dtwin_consumer_lag_records",
    "dtwin_assigned_partitions",
    "dtwin_sla_target_ratio",
    "dtwin_model_info",
    "dtwin_model_serving_last_good",
}
COUNTERS = {
    "dtwin_allocation_intervals_scored_total",
    "dtwin_allocation_underprovisioned_intervals_total",
    "dtwin_site_intervals_scored_total",
    "dtwin_site_underprovisioned_intervals_total",
    "dtwin_samples_received_total",
    "dtwin_commands_sent_total",
    "dtwin_samples_rejected_total",
    "dtwin_window_gaps_total",
    "dtwin_state_resets_total",
    "dtwin_commands_reemitted_total",
    "dtwin_samples_redelivered_total",
    "dtwin_batch_retries_total",
    "dtwin_fetch_skips_total",
    "dtwin_rebalances_total",
    "dtwin_table_recoveries_total",
    "dtwin_model_swaps_total",
    "dtwin_model_swap_refusals_total",
}
# Summaries without quantiles: only their _sum and _count series exist.
SUMMARIES = {
    "dtwin_allocation_efficiency_ratio",
    "dtwin_allocation_wastage_ratio",
    "dtwin_allocation_utilization_ratio",
    "dtwin_allocation_overprovisioning_units",
    "dtwin_allocation_underprovisioning_units",
    "dtwin_site_overprovisioning_units",
    "dtwin_forecast_absolute_error_units",
    "dtwin_forecast_squared_error_units",
}
HISTOGRAMS = {
    "dtwin_inference_batch_duration_seconds",
    "dtwin_end_to_end_latency_seconds",
    "dtwin_produce_to_command_latency_seconds",
    "dtwin_batch_samples",
}
# Standard collectors the dashboard reads.
PROCESS_SERIES = {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_gc_collections_total"}
KNOWN_SERIES = (
    GAUGES | COUNTERS | {s + x for s in SUMMARIES for x in ("_sum", "_count")}
    | {h + x for h in HISTOGRAMS for x in ("_bucket", "_sum", "_count")}
)
METRIC_RE = re.compile(r"\bdtwin_[a-z0-9_]+\b")
# Counter-like series: read only through rate(), increase() or changes().
MONOTONIC = COUNTERS | {s + x for s in SUMMARIES | HISTOGRAMS for x in ("_sum", "_count")} | {
    h + "_bucket" for h in HISTOGRAMS}

ALERT_NAMES = {
    "DtwinSlaBudgetFastBurn",
    "DtwinSlaBudgetSlowBurn",
    "DtwinWorkerDown",
    "DtwinNoCommands",
    "DtwinConsumerLagGrowing",
    "DtwinDeadLetterRateHigh",
    "DtwinHighLatency",
    "DtwinSamplesSkipped",
    "DtwinModelSwapRefused",
    "DtwinModelServingLastGood",
}
DTWIN_SERVICES = {"topics", "model", "controller", "replay"}
SERVICES = DTWIN_SERVICES | {"kafka", "prometheus", "grafana"}

# Grafana variables replaced by literals before a query goes to Prometheus ($site: a real site
# in the live test).
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$window": "1h",
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


def _dashboard_targets(dash: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query target."""
    return [(p.get("title", "?"), t) for p in _panels(dash) for t in p.get("targets", []) if t.get("expr")]


def _dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    return [(title, t["expr"]) for title, t in _dashboard_targets(dash)]


def _annotations(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in dash["annotations"]["list"] if a.get("expr")]


def _substitute(expr: str, values: dict[str, str] | None = None) -> str:
    # Longest names first: $__rate_interval before $__range.
    for var, literal in sorted({**GRAFANA_VARS, **(values or {})}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{var[1:]}}}", literal).replace(var, literal)
    return expr


def _family(series: str) -> str:
    """dtwin_x_seconds_bucket -> dtwin_x_seconds for histograms and summaries; other names unchanged."""
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series.removesuffix(suffix) in HISTOGRAMS | SUMMARIES:
            return series.removesuffix(suffix)
    return series


def _alert_rules() -> list[dict[str, Any]]:
    return [r for g in _yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def _template_labels(text: str) -> set[str]:
    """Label names a Grafana legend ({{site}}) or a Prometheus annotation ($labels.site) uses."""
    return set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", text)) | set(
        re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text))


def _top_level(expr: str) -> list[bool]:
    """For each character: True when it is outside any (), [], {} and string."""
    out, depth, quote = [], 0, None
    for i, c in enumerate(expr):
        if quote:
            if c == quote and expr[i - 1] != "\\":
                quote = None
            out.append(False)
            continue
        if c in "\"'`":
            quote = c
            out.append(False)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        out.append(depth == 0 and c not in ")]}")
    return out


SET_OP = re.compile(r"\b(and|or|unless)\b(\s*(?:on|ignoring)\s*\([^)]*\))?")
COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def _operands(expr: str) -> tuple[list[str], list[str]]:
    """Split at the top-level set operators: ([operand, ...], [operator with its matching, ...])."""
    top = _top_level(expr)
    operands, ops, start = [], [], 0
    for m in SET_OP.finditer(expr):
        if top[m.start()]:
            operands.append(expr[start:m.start()].strip())
            ops.append(m.group(0))
            start = m.end()
    operands.append(expr[start:].strip())
    return operands, ops


def _strip_comparison(expr: str) -> str:
    """The left-hand side of a top-level comparison (``x > 0.05`` -> ``x``); else the expression."""
    top = _top_level(expr)
    for m in COMPARISON.finditer(expr):
        if top[m.start()]:
            return expr[:m.start()].strip()
    return expr.strip()


def test_expression_helpers() -> None:
    ops, between = _operands('a{x="1 and 2"} > 0 unless on (job) sum(b or c) > 0 and d')
    assert ops == ['a{x="1 and 2"} > 0', "sum(b or c) > 0", "d"]
    assert between == ["unless on (job)", "and"]
    assert _strip_comparison('sum(rate(x{a!="b"}[5m])) / sum(rate(y[5m])) > 0.05') == \
        'sum(rate(x{a!="b"}[5m])) / sum(rate(y[5m]))'
    assert _strip_comparison("histogram_quantile(0.99, x)") == "histogram_quantile(0.99, x)"
    assert _template_labels("{{topic}}/{{ partition }} on {{ $labels.instance }}") == {
        "topic", "partition", "instance"}
    assert _substitute("rate(x[$__rate_interval]) [$__range] ${window}") == "rate(x[1m]) [1h] 1h"


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


def _query(base: str, query: str, at: float | None = None) -> dict[str, Any]:
    params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
    return _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode(params))


@contextlib.contextmanager
def _prometheus(tmp: Path, config: str) -> Iterator[str]:
    """A real Prometheus on a free port with ``config`` and alerts.yml beside it; yields its base URL."""
    binary = _tool("prometheus")
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(ALERTS, tmp / "alerts.yml")
    (tmp / "prometheus.yml").write_text(config, encoding="utf-8")
    port = _free_port()
    log_path = tmp / "prometheus.log"
    log = log_path.open("w", encoding="utf-8")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after 30 s:\n{log_path.read_text()[-3000:]}")
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


# --- Prometheus config and alerts ----------------------------------------------------------

def test_prometheus_scrapes_controller_every_5s() -> None:
    cfg = _yaml(PROM_CONFIG)
    assert cfg["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    ctl = jobs[JOB]
    assert ctl["scrape_interval"] == "5s"
    targets = [t for sc in ctl["static_configs"] for t in sc["targets"]]
    assert targets == ["controller:9108"]


def _assert_counters_read_as_rates(where: str, expr: str) -> None:
    for m in re.finditer(r"\b(?:dtwin|process|python)_[a-z0-9_]+\b", expr):
        if m.group(0) not in MONOTONIC | {"process_cpu_seconds_total", "python_gc_collections_total"}:
            continue
        before, after = expr[: m.start()].rstrip(), expr[m.end():].lstrip()
        if before.endswith("unless") or after.startswith("unless"):
            continue  # a presence test (series new since an offset), not a value
        assert before.endswith(("rate(", "increase(", "changes(")), (
            f"{where}: {m.group(0)} read raw, not through rate(), increase() or changes()")


def _assert_means_pair_sum_and_count(where: str, expr: str) -> None:
    for name in SUMMARIES | HISTOGRAMS:
        if f"{name}_sum" in expr:
            assert f"{name}_count" in expr, f"{where}: {name}_sum without {name}_count"


def test_alert_rules_cover_the_expected_alerts() -> None:
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    assert set(names) == ALERT_NAMES
    for r in rules:
        assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
        assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]
        _assert_counters_read_as_rates(r["alert"], r["expr"])
        _assert_means_pair_sum_and_count(r["alert"], r["expr"])


def test_burn_rate_alerts_follow_the_workbook() -> None:
    """Two windows each, at 14.4 (1h, 5m) and 6 (6h, 30m), on the live policy only."""
    rules = {r["alert"]: r for r in _alert_rules()}
    for name, burn, windows in [("DtwinSlaBudgetFastBurn", "14.4", ("1h", "5m")),
                                ("DtwinSlaBudgetSlowBurn", "6", ("6h", "30m"))]:
        expr = rules[name]["expr"]
        operands, ops = _operands(expr)
        assert ops == ["and"], name
        for operand, window in zip(operands, windows, strict=True):
            assert re.search(rf"\)\s*>\s*{re.escape(burn)}$", operand), (name, operand)
            for counter in ("dtwin_allocation_underprovisioned_intervals_total",
                            "dtwin_allocation_intervals_scored_total"):
                assert f'sum(rate({counter}{{allocator="ai_sla"}}[{window}]))' in operand, (name, counter)
            assert "max(dtwin_sla_target_ratio)" in operand, name


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
    used |= {m for a in _annotations(dash) for m in METRIC_RE.findall(a["expr"])}
    for v in dash["templating"]["list"]:
        used |= set(METRIC_RE.findall(v.get("definition", "")))
    unknown = sorted(used - KNOWN_SERIES)
    assert not unknown, f"metric names the controller does not export: {unknown}"
    dropped = sorted(m for m in used if re.search(r"_mean_|underprovisioning_ratio$", m))
    assert not dropped, f"running-mean gauges are gone: {dropped}"


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
    assert {"timeseries", "stat", "table", "bargauge"} <= types
    for p in panels:
        title = p.get("title", "?")
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, title
        assert p.get("targets"), f"{title}: no query"
        assert p.get("description"), f"{title}: no description"
        refs = [t.get("refId") for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{title}: duplicate refId"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "prometheus", title
            assert t.get("refId") and t.get("expr"), title
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, title
    # No two top-level panels (rows included) share a grid cell.
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g, title = p["gridPos"], p.get("title", "?")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{title} overlaps {cells[(x, y)]}"
                cells[(x, y)] = title
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["site"]["definition"] == "label_values(dtwin_site_demand_units, site)"
    assert variables["site"]["datasource"]["uid"] == "prometheus"
    assert not variables["site"]["multi"], "the site panels show one chosen site"
    assert variables["window"]["type"] == "custom"
    assert any("$site" in expr for _, expr in _dashboard_exprs(dash))
    for a in _annotations(dash):
        assert a["datasource"]["uid"] == "prometheus", a["name"]
    swaps = [a for a in _annotations(dash) if "dtwin_model_swaps_total" in a["expr"]]
    assert swaps and "changes(" in swaps[0]["expr"], "model swaps should be annotations"


def test_dashboard_shows_what_the_issue_asks() -> None:
    exprs = [expr for _, expr in _dashboard_exprs(_dashboard())]
    joined = "\n".join(exprs)
    # Fleet SLA and efficiency by allocator, from counters.
    assert re.search(r"sum by \(allocator\) \(rate\(dtwin_allocation_underprovisioned_intervals_total", joined)
    assert re.search(r"sum by \(allocator\) \(rate\(dtwin_allocation_efficiency_ratio_sum", joined)
    # Worst sites.
    assert re.search(r"topk\(\d+, .*dtwin_site_underprovisioned_intervals_total", joined)
    # Forecast vs actual vs allocated for the chosen site.
    for gauge in ("dtwin_site_demand_units", "dtwin_site_forecast_units", "dtwin_site_allocated_units"):
        assert any(gauge in e and 'site="$site"' in e for e in exprs), gauge
    # Lag, throughput, latency, dead letters by reason.
    assert any("dtwin_consumer_lag_records" in e for e in exprs)
    assert any("sum by (reason) (rate(dtwin_samples_rejected_total" in e for e in exprs)
    assert any("histogram_quantile(0.99" in e and "dtwin_produce_to_command_latency_seconds_bucket" in e
               for e in exprs)


def test_dashboard_covers_the_metrics() -> None:
    dash = _dashboard()
    exprs = [expr for _, expr in _dashboard_exprs(dash)]
    used = {_family(m) for e in exprs for m in METRIC_RE.findall(e)}
    missing = sorted((GAUGES | COUNTERS | SUMMARIES | HISTOGRAMS) - used)
    assert not missing, f"metrics on no panel: {missing}"
    for h in HISTOGRAMS:
        assert any("histogram_quantile(" in e and f"{h}_bucket" in e for e in exprs), h
    for p in PROCESS_SERIES:
        assert any(p in e for e in exprs), p
    for title, expr in _dashboard_exprs(dash):
        _assert_counters_read_as_rates(title, expr)
        _assert_means_pair_sum_and_count(title, expr)
    for a in _annotations(dash):
        _assert_counters_read_as_rates(a["name"], a["expr"])


def test_grafana_provisioning() -> None:
    ds = _yaml(DATASOURCES)["datasources"]
    assert [(d["uid"], d["type"]) for d in ds] == [("prometheus", "prometheus")]
    assert ds[0]["url"] == "http://prometheus:9090"
    providers = _yaml(DASHBOARD_PROVIDERS)["providers"]
    assert providers[0]["type"] == "file"
    compose = _yaml(COMPOSE)
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[providers[0]["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home == f"{providers[0]['options']['path']}/{DASHBOARD.name}"


@pytest.fixture(scope="module")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus with alerts.yml loaded and nothing to scrape; yields its base URL."""
    config = "global:\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\nscrape_configs: []\n"
    with _prometheus(tmp_path_factory.mktemp("prometheus"), config) as base:
        yield base


def test_dashboard_queries_parse(prometheus_server: str) -> None:
    failures = []
    dash = _dashboard()
    queries = [(title, expr) for title, expr in _dashboard_exprs(dash)]
    queries += [(f"annotation {a['name']}", a["expr"]) for a in _annotations(dash)]
    assert queries
    for title, expr in queries:
        query = _substitute(expr)
        assert "$" not in query, f"{title}: unreplaced Grafana variable in {query!r}"
        body = _query(prometheus_server, query)
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

    assert services["kafka"]["image"] == "apache/kafka:4.4.0"  # the release tests run (deploy/kafka/pom.xml)
    kafka_env = services["kafka"]["environment"]
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]

    images = {s: services[s]["image"] for s in DTWIN_SERVICES}
    assert {images[s] for s in DTWIN_SERVICES if s != "model"} == {"dtwin:local"}, images
    assert images["model"] == "dtwin-train:local"
    builders = {s: services[s]["build"]["target"] for s in services if "build" in services[s]}
    assert builders == {"controller": "controller", "model": "train"}, builders
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert "FROM python:3.11-slim AS controller" in dockerfile and "FROM controller AS train" in dockerfile
    controller_stage = dockerfile.split("FROM controller AS train")[0]
    installs = [ln for ln in controller_stage.splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in installs if "torch" in ln.replace("find_spec('torch')", "")], \
        "the controller image installs no torch"
    assert "find_spec('torch') is not None" in controller_stage, "the controller image checks it holds no torch"
    for s in DTWIN_SERVICES:
        assert services[s]["environment"]["DTWIN_BOOTSTRAP"] == "kafka:9092"

    def command(name: str) -> str:
        cmd = services[name]["command"]
        return " ".join(cmd) if isinstance(cmd, list) else cmd

    assert command("topics").startswith("dtwin topics create --bootstrap kafka:9092")
    model = command("model")
    for part in ("/models/current/manifest.json", "dtwin train --model bilstm",
                 "dtwin export /models/bilstm.pt"):
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


# --- live: a real controller, a real Prometheus -------------------------------------------

LIVE_SITES = 3
LIVE_MAX_SITES = 2  # the third site is counted under site="_other"
CHUNK = 120  # intervals per site per replay chunk
LIVE_WARMUP = 40  # DTWIN_BASELINE_WARMUP_INTERVALS: scoring starts after this many intervals per site
LIVE_VARS = {"$__rate_interval": "5m", "$__interval": "5m", "$__range": "15m", "$window": "5m"}


def _exported_families(port: int) -> dict[str, str]:
    """{sample-name-style family name: type} from a worker's /metrics (counters with _total)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {f.name + ("_total" if f.type == "counter" else ""): f.type for f in text_string_to_metric_families(text)}


def _check_result(where: str, expr: str, body: dict[str, Any], labels: set[str],
                  site: str | None) -> list[str]:
    if body.get("status") != "success":
        return [f"{where}: {expr}\n    -> {body.get('error')}"]
    data = body["data"]
    if data["resultType"] == "scalar":
        return []
    series = data["result"]
    if not series:
        return [f"{where}: no data for {expr}"]
    problems = []
    lacking = [(s["metric"], sorted(lab for lab in labels if not s["metric"].get(lab))) for s in series]
    lacking = [(metric, missing) for metric, missing in lacking if missing]
    if lacking:
        problems.append(f"{where}: {expr}\n    -> {len(lacking)} of {len(series)} series lack labels, e.g. "
                        f"{lacking[0][0]} lacks {lacking[0][1]}")
    other_sites = [s["metric"] for s in series if site is not None and s["metric"].get("site") != site]
    if other_sites:
        problems.append(f"{where}: {expr}\n    -> series not of site {site!r}, e.g. {other_sites[0]}")
    if not any(math.isfinite(float(s["value"][1])) for s in series):
        problems.append(f"{where}: {expr}\n    -> only NaN/Inf: {[s['value'][1] for s in series]}")
    return problems


@pytest.mark.kafka
@pytest.mark.timeout(600)
def test_live_dashboard_and_alerts(request: pytest.FixtureRequest, tmp_path: Path, artifact_dir: Path,
                                   real_site) -> None:
    """Every panel query, annotation and alert expression returns data with the labels it uses
    from a real Prometheus that scraped a real controller through a short real-data replay."""
    from kafka import KafkaProducer

    from contracts.topics import Topics
    from dtwin.runner import start_controller, value, wait_until
    from dtwin.topics import create_topics
    from replay.producer import make_producer, replay
    from replay.sites import replay_sites

    try:  # Apache Kafka where its fixture exists, else the embedded broker
        broker = request.getfixturevalue("kafka")
        on_apache_kafka = True
    except pytest.FixtureLookupError:
        broker = request.getfixturevalue("broker")
        on_apache_kafka = False
    bootstrap = broker.bootstrap

    model_dir = tmp_path / "model"
    shutil.copytree(artifact_dir, model_dir)
    topics = Topics("ops-live.")
    app_id = "ops-live"
    create_topics(bootstrap, topics, partitions=2, app_id=app_id)
    ctl = start_controller(bootstrap, model_dir, tmp_path / "run", topics.prefix, app_id, 2, extra_env={
        "DTWIN_METRICS_MAX_SITES": str(LIVE_MAX_SITES),
        "DTWIN_BASELINE_WARMUP_INTERVALS": str(LIVE_WARMUP),
        "DTWIN_MODEL_POLL_SECONDS": "0.5",
        "DTWIN_CHANGELOG_MARKERS": "0" if on_apache_kafka else "1",
    })
    config = (f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n"
              f"scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n"
              f"      - targets: ['127.0.0.1:{ctl.metrics_port}']\n        labels:\n          service: controller\n")
    try:
        with _prometheus(tmp_path / "prometheus", config) as prom:
            def log_tail() -> str:
                return ctl.log_path.read_text(errors="replace")[-3000:]

            def assigned() -> bool:
                return value(ctl.metrics() or {}, "dtwin_assigned_partitions") >= 2

            try:
                wait_until(assigned, 240, 0.5, "the controller's partitions", ctl.alive)
            except (TimeoutError, RuntimeError) as exc:
                pytest.fail(f"{exc}\n{log_tail()}")
            time.sleep(2.5)  # Prometheus scrapes the counters at 0 before the first sample

            # Three chunks a few scrapes apart, so that every rate() window sees increases; the
            # last skips 10 intervals of the first site (a window gap), and one record is garbage.
            sites = replay_sites(LIVE_SITES, bases=[real_site])
            producer = make_producer(bootstrap)
            sent = 0
            for chunk in range(3):
                start = chunk * CHUNK
                if chunk == 2:
                    sent += replay(producer, topics.samples, sites[:1], start=start + 10, limit=CHUNK - 10,
                                   progress=False).acked
                    sent += replay(producer, topics.samples, sites[1:], start=start, limit=CHUNK,
                                   progress=False).acked
                else:
                    sent += replay(producer, topics.samples, sites, start=start, limit=CHUNK, progress=False).acked
                time.sleep(3)
            producer.close()
            raw = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
            raw.send(topics.samples, key=sites[0].name.encode(), value=b'{"site": "garbage", "ts": ')
            raw.flush()
            raw.close()
            sent += 1
            try:
                wait_until(lambda: value(ctl.metrics() or {}, "dtwin_samples_received_total") >= sent, 120, 0.5,
                           f"{sent} samples at the controller", ctl.alive)
            except (TimeoutError, RuntimeError) as exc:
                pytest.fail(f"{exc}\n{log_tail()}")

            # A refused model swap: the manifest no longer matches the model file.
            manifest = json.loads((model_dir / "manifest.json").read_text())
            manifest["sha256"] = "0" * 64
            (model_dir / "manifest.json").write_text(json.dumps(manifest))

            def refused() -> bool:
                m = ctl.metrics() or {}
                return sum(m.get("dtwin_model_swap_refusals_total", {}).values()) >= 1

            try:
                wait_until(refused, 60, 0.5, "a refused model swap", ctl.alive)
            except (TimeoutError, RuntimeError) as exc:
                pytest.fail(f"{exc}\n{log_tail()}")
            time.sleep(3)  # a few more scrapes and rule evaluations

            families = _exported_families(ctl.metrics_port)
            problems = _check_live(prom, _dashboard())
    finally:
        ctl.stop()
    expected = {**dict.fromkeys(GAUGES, "gauge"), **dict.fromkeys(COUNTERS, "counter"),
                **dict.fromkeys(SUMMARIES, "summary"), **dict.fromkeys(HISTOGRAMS, "histogram")}
    # prometheus-client's <counter>_created series parse as families of their own.
    created = {n.removesuffix("_total") + "_created" for n in COUNTERS} | {
        n + "_created" for n in SUMMARIES | HISTOGRAMS}
    exported = {n: t for n, t in families.items() if n.startswith("dtwin_") and n not in created}
    assert exported == expected, (
        f"exported but not in the contract: {sorted(set(exported) - set(expected))}; "
        f"in the contract but not exported: {sorted(set(expected) - set(exported))}; "
        f"other type: {sorted(n for n in set(exported) & set(expected) if exported[n] != expected[n])}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)


def _check_live(prom: str, dash: dict[str, Any]) -> list[str]:
    at = time.time()
    problems: list[str] = []
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    values: dict[str, str] = {}
    for name in ("site", "allocator"):
        m = re.fullmatch(r"label_values\((\w+), (\w+)\)", variables[name]["definition"])
        assert m, variables[name]["definition"]
        url = f"{prom}/api/v1/label/{m.group(2)}/values?" + urllib.parse.urlencode(
            {"match[]": m.group(1), "start": f"{at - 900:.0f}", "end": f"{at:.0f}"})
        found = _get_json(url).get("data") or []
        if not found:
            problems.append(f"variable {name}: {variables[name]['definition']} has no values")
            continue
        values[f"${name}"] = "ai_sla" if name == "allocator" and "ai_sla" in found else sorted(found)[0]
    if problems:
        return problems
    assert values["$site"] != "_other"
    subst = {**LIVE_VARS, **values}

    for title, t in _dashboard_targets(dash):
        expr = _substitute(t["expr"], subst)
        site = values["$site"] if "$site" in t["expr"] else None
        problems += _check_result(f"panel {title!r} {t['refId']}", expr, _query(prom, expr, at),
                                  _template_labels(t.get("legendFormat", "")), site)
    for a in _annotations(dash):
        expr = _strip_comparison(_substitute(a["expr"], subst))
        labels = _template_labels(a.get("titleFormat", "") + a.get("textFormat", "")) | {
            k.strip() for k in a.get("tagKeys", "").split(",") if k.strip()}
        problems += _check_result(f"annotation {a['name']!r}", expr, _query(prom, expr, at), labels, None)

    for rule in _alert_rules():
        labels = _template_labels(rule["annotations"]["summary"] + rule["annotations"]["description"])
        operands, ops = _operands(rule["expr"])
        lhs = [_strip_comparison(o) for o in operands]
        for i, expr in enumerate(lhs):
            problems += _check_result(f"alert {rule['alert']} operand {i + 1}", expr, _query(prom, expr, at),
                                      labels, None)
        if len(set(ops)) == 1 and ops[0].startswith("and"):
            # The operands must also match each other, or the conjunction could never fire.
            joined = f" {ops[0]} ".join(f"({e})" for e in lhs)
            problems += _check_result(f"alert {rule['alert']} (operands joined)", joined,
                                      _query(prom, joined, at), labels, None)
    return problems
