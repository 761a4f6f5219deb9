"""What the dashboard and alert tests share: the shipped dashboards and rules, the PromQL they hold, and the
names of the metrics that hogwild and vLLM really export.

The project's names come from instantiating the real metric classes (`WorkerMetrics`, `OperatorMetrics`)
on fresh registries. vLLM's come from its installed source (`vllm/v1/metrics/loggers.py`), read as text
because building vLLM's stat logger needs a whole engine config; a test checks that the reading finds them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "hogwild"
DASHBOARD_DIR = CHART / "dashboards"
RULES_FILE = CHART / "rules" / "hogwild-alerts.yaml"
PROMTOOL_TESTS = ROOT / "tests" / "fixtures" / "promtool" / "hogwild-alerts.test.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


# ---- shipped files ----------------------------------------------------------------------------------------


def dashboard_names() -> list[str]:
    return sorted(path.stem for path in DASHBOARD_DIR.glob("*.json"))


@functools.cache
def dashboard(name: str) -> dict[str, Any]:
    return dict(json.loads((DASHBOARD_DIR / f"{name}.json").read_text()))


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard}/{self.panel}/{self.ref_id}"


def panel_queries(name: str) -> list[PanelQuery]:
    queries = []
    for panel in dashboard(name)["panels"]:
        for target in panel.get("targets", []):
            queries.append(PanelQuery(name, panel["title"], target["refId"], target["expr"]))
    return queries


def variable_queries(name: str) -> dict[str, str]:
    """Query variables' PromQL-ish definitions, e.g. `label_values(metric{...}, label)`."""
    found = {}
    for variable in dashboard(name)["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found[variable["name"]] = query["query"] if isinstance(query, dict) else query
    return found


LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def split_label_values(query: str) -> tuple[str, str]:
    """(series selector, label) of a Grafana `label_values(selector, label)` query."""
    match = LABEL_VALUES.match(query.strip())
    assert match, f"not a label_values query: {query}"
    return match.group("selector"), match.group("label")


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    labels: dict[str, str]
    annotations: dict[str, str]


@functools.cache
def alert_rules() -> tuple[AlertRule, ...]:
    rules = yaml.safe_load(RULES_FILE.read_text())
    return tuple(
        AlertRule(rule["alert"], rule["expr"], rule.get("labels", {}), rule.get("annotations", {}))
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    )


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables replaced the way Grafana would before sending the query."""
    for name, value in sorted(variables.items(), key=lambda item: -len(item[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


# ---- metric names in PromQL -------------------------------------------------------------------------------

KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and durations left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?[\w$]+", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isalnum() or before in "._$":
            continue  # part of a number (1e9) or a duration (5m)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group() not in KEYWORDS:
            names.add(match.group())
    return names


def selectors(expr: str) -> Iterator[str]:
    """The label-matcher bodies `{...}` of an expression."""
    yield from re.findall(r"\{([^}]*)\}", expr)


# ---- names that are really exported -----------------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def _names_of(registry: Any) -> set[str]:
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


@functools.cache
def project_metric_names() -> frozenset[str]:
    """Every series name hogwild's worker and operator export (their real classes, fresh registries)."""
    from hogwild.operator.metrics import OperatorMetrics
    from hogwild.worker.gpu_power import GpuReading
    from hogwild.worker.metrics import WorkerMetrics

    worker = WorkerMetrics()
    # The GPU gauges exist only with a reading (a CUDA worker with NVML): give this one a reading.
    worker.watch_gpu(lambda: GpuReading.from_nvml(1980, 300_000, 700_000, 0))
    return frozenset(_names_of(worker.registry) | _names_of(OperatorMetrics().registry))


VLLM_METRIC = re.compile(r"_(gauge|counter|histogram)_cls\(\s*name=\"(vllm:\w+)\"")


@functools.cache
def vllm_metric_names() -> frozenset[str]:
    """Series names vLLM's Prometheus stat logger registers, read from the installed vLLM source."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed in the test venv"
    source = (Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py").read_text()
    names = set()
    for kind, name in VLLM_METRIC.findall(source):
        # prometheus_client appends _total to counters; vLLM's names already end without it.
        names |= {name + suffix for suffix in SUFFIXES[kind] if suffix != "_created"}
    return frozenset(names)


def known_metric_names() -> frozenset[str]:
    return project_metric_names() | vllm_metric_names()


# ---- tools ------------------------------------------------------------------------------------------------


def system_tool(name: str) -> str:
    """A binary from the Debian `prometheus` package, which scripts/install_tools.py installs."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is missing: run `python3 scripts/dev.py venv` (install_tools.py)")
    return path


def venv_tool(name: str) -> Path:
    return Path(sys.prefix) / "bin" / name
