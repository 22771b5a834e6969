"""Every PromQL expression the shipped dashboards and alert rules evaluate, ready for a Prometheus.

A live test can send each expression to Prometheus' HTTP API (``/api/v1/query``) while it scrapes a
running sparkserve and require data back, so no misspelt metric or label survives:

    from promql_exprs import all_exprs          # or load this file by path
    for e in all_exprs(rate_interval="30s"):
        query(e.expr)                           # e.source says where it came from

Dashboards: each panel target's ``expr`` and each query variable's ``label_values(<selector>, label)``
selector, with Grafana's variables substituted (``$__rate_interval`` -> ``rate_interval``, the
dashboard variables -> ``.*``, i.e. "All"). Alerts: each rule's ``expr`` without its threshold
comparison (``X > 0.95`` -> ``X``), since the comparison filters everything out on a healthy server.

Run as a script to print them: ``python deploy/promql_exprs.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

DEPLOY_DIR = Path(__file__).resolve().parent
DASHBOARDS_DIR = DEPLOY_DIR / "grafana" / "dashboards"
ALERTS_FILE = DEPLOY_DIR / "prometheus" / "alerts.yml"

_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_NUMBER = re.compile(r"^\s*(?:bool\s+)?[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*$")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)


@dataclass(frozen=True)
class PromQLExpr:
    """One expression: ``source`` names its origin (file, panel / rule, target), ``expr`` is PromQL."""

    source: str
    expr: str


def strip_threshold(expr: str) -> str:
    """``X <op> <number>`` -> ``X`` for the last comparison outside brackets and strings.

    An expression without a top-level comparison is returned unchanged; a top-level comparison whose
    right side is not a number literal raises ValueError (alerts must be ``<expr> <op> <threshold>``).
    """
    position = _last_top_level_comparison(expr)
    if position is None:
        return expr.strip()
    start, op = position
    if not _NUMBER.match(expr[start + len(op) :]):
        raise ValueError(f"comparison {op!r} does not compare against a number literal: {expr!r}")
    return expr[:start].strip()


def _last_top_level_comparison(expr: str) -> tuple[int, str] | None:
    """(index, operator) of the last comparison at bracket depth 0, outside string literals."""
    depth, quote, found, i = 0, "", None, 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op is not None:
                found = (i, op)
                i += len(op)
                continue
        i += 1
    return found


def substitute_variables(expr: str, rate_interval: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana variables; raises KeyError naming any variable left without a value."""
    values = {"__rate_interval": rate_interval, "__interval": rate_interval, **variables}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def _panels(panels: list[dict]) -> Iterator[dict]:
    """Panels in order, descending into rows (collapsed rows keep their panels inside)."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs(
    dashboards_dir: Path = DASHBOARDS_DIR,
    rate_interval: str = "1m",
    variables: Mapping[str, str] | None = None,
) -> list[PromQLExpr]:
    """Expressions of every panel target and query variable of every dashboard JSON file.

    Args:
        rate_interval: the window substituted for ``$__rate_interval`` (>= 4 scrape intervals).
        variables: values of dashboard variables; default: every query variable -> ``.*`` ("All").
    """
    found: list[PromQLExpr] = []
    for path in sorted(dashboards_dir.glob("*.json")):
        board = json.loads(path.read_text())
        template = [v for v in board.get("templating", {}).get("list", []) if v.get("type") == "query"]
        values = {v["name"]: ".*" for v in template} | dict(variables or {})
        for var in template:
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.match(query)
            if match:
                expr = substitute_variables(match.group(1), rate_interval, values)
                found.append(PromQLExpr(f"{path.name} variable ${var['name']}", expr))
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                source = (
                    f"{path.name} panel {panel['id']} {panel.get('title', '')!r} target {target['refId']}"
                )
                found.append(PromQLExpr(source, substitute_variables(target["expr"], rate_interval, values)))
    return found


def alert_exprs(rules_file: Path = ALERTS_FILE) -> list[PromQLExpr]:
    """Every alerting and recording rule's expression, alerts without their threshold comparison."""
    found: list[PromQLExpr] = []
    for group in yaml.safe_load(rules_file.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            expr = strip_threshold(rule["expr"]) if "alert" in rule else rule["expr"].strip()
            found.append(PromQLExpr(f"{rules_file.name} {name}", expr))
    return found


def all_exprs(rate_interval: str = "1m") -> list[PromQLExpr]:
    """Dashboards and alert rules shipped in deploy/."""
    return dashboard_exprs(rate_interval=rate_interval) + alert_exprs()


if __name__ == "__main__":
    for e in all_exprs():
        print(f"{e.source}\n    {e.expr}")
