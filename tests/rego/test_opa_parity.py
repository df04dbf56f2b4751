"""Rego mode decides as OPA decides.

For each request, `trustweave-policy check --print-input` prints the input
document the filter builds and its decision; the real OPA engine (Go, through
`opa-golib-python-bindings`) evaluates the same modules, data and query on that
input. Where OPA's semantics are subtle (undefined vs false, `default`,
`some`/`every`, `in`, `split`/`startswith`) the expected answer is OPA's, stated
in the case.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
from opa_bindings import OpaEngine, OpaError, OpaUndefinedError

REPO = pathlib.Path(__file__).resolve().parents[2]
CLI = REPO / "target" / "debug" / "trustweave-policy"
EXAMPLES = REPO / "filter" / "examples"
WORKER = "spiffe://gcp.company.com/region/gcp-us-central1/worker-1"
ORCHESTRATOR = "spiffe://aws.company.com/region/aws-us-east-1/orchestrator"
CATALOG = "spiffe://aws.company.com/ns/shop/sa/catalog"
REPORTER = "spiffe://azure.company.com/ns/analytics/sa/reporter"
ONPREM = "spiffe://onprem.company.com/ns/x/sa/y"


def ours(config: pathlib.Path, principal: str | None, headers: dict[str, str], path: str = "/", local: str = WORKER,
         method: str = "GET"):
    args = [str(CLI), "check", str(config), "--print-input", "--local-principal", local, "--path", path,
            "--method", method]
    if principal:
        args += ["--principal", principal]
    for name, value in headers.items():
        args += ["--header", f"{name}={value}"]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    document = json.loads(lines["input"])
    reason = lines["reason"].strip()
    if "undefined" in reason:
        verdict = "undefined"
    else:
        verdict = lines["decision"].strip() == "ALLOW"
    return document, verdict


def opa(config: pathlib.Path, document: dict):
    rego = json.loads(config.read_text())["rego"]
    with OpaEngine() as engine:
        for name, text in rego["modules"].items():
            engine.add_policy(name, text)
        if rego.get("data"):
            engine.add_data(rego["data"])
        try:
            result = engine.eval_document(rego["query"].removeprefix("data."), input=document)
        except OpaUndefinedError:
            return "undefined"
    if isinstance(result, dict):
        return result.get("allowed") is True
    return result is True if isinstance(result, bool) else ("not a boolean", result)


AUTHZ = EXAMPLES / "rego-authz.json"
FEDERATED = EXAMPLES / "rego-federated.json"

GUIDE_CASES = [
    # agentweave.authz
    (AUTHZ, ORCHESTRATOR, {}, True),  # the AWS orchestrator may call GCP workers
    (AUTHZ, "spiffe://aws.company.com/region/aws-us-east-1/other", {}, False),
    (AUTHZ, "spiffe://gcp.company.com/region/gcp-us-central1/peer", {}, True),  # same region
    (AUTHZ, "spiffe://azure.company.com/region/azure-eastus/agent", {}, False),
    (AUTHZ, "spiffe://azure.company.com/region/azure-eastus/agent", {"x-trustweave-action": "ping"}, True),
    (AUTHZ, None, {"x-trustweave-action": "health_check"}, True),  # anyone, even without identity
    (AUTHZ, None, {"x-trustweave-action": "write"}, False),
    # agentweave.authz.federated
    (FEDERATED, "spiffe://gcp.company.com/ns/billing/sa/invoicer", {}, True),
    (FEDERATED, CATALOG, {"x-trustweave-action": "inventory.read"}, True),
    (FEDERATED, CATALOG, {"x-trustweave-action": "inventory.write"}, False),
    (FEDERATED, REPORTER, {"x-trustweave-action": "inventory.report"}, True),
    (FEDERATED, ONPREM, {"x-trustweave-action": "inventory.read"}, False),  # not a federated domain
    (FEDERATED, None, {"x-trustweave-action": "inventory.read"}, False),
]


@pytest.mark.parametrize("config,principal,headers,expected", GUIDE_CASES)
def test_guide_policies_decide_as_opa(config, principal, headers, expected):
    document, verdict = ours(config, principal, headers)
    assert verdict == expected
    assert opa(config, document) == expected


SEMANTICS = """package semantics
import rego.v1

headers := input.attributes.request.http.headers

# Undefined without the header, false with another value.
flag := headers["x-flag"] == "yes"

# `default` turns undefined into false.
default with_default := false
with_default if headers["x-flag"] == "yes"

every_segment_short if {
  every seg in input.parsed_path { count(seg) < 6 }
}

some_segment_admin if {
  some seg in input.parsed_path
  seg == "admin"
}

action_in_list if input.action in ["read", "write"]

second_starts_with_b if {
  parts := split(headers["x-list"], ",")
  startswith(parts[1], "b")
}
"""

SEMANTIC_CASES = [
    ("flag", {}, "/", "undefined"),
    ("flag", {"x-flag": "no"}, "/", False),
    ("flag", {"x-flag": "yes"}, "/", True),
    ("with_default", {}, "/", False),
    ("every_segment_short", {}, "/api/admin", True),
    ("every_segment_short", {}, "/api/toolong1", "undefined"),
    ("every_segment_short", {}, "/", True),  # every over nothing holds
    ("some_segment_admin", {}, "/api/admin", True),
    ("some_segment_admin", {}, "/api/user", "undefined"),
    ("action_in_list", {"x-trustweave-action": "write"}, "/", True),
    ("action_in_list", {"x-trustweave-action": "delete"}, "/", "undefined"),
    ("second_starts_with_b", {"x-list": "a,bee,c"}, "/", True),
    ("second_starts_with_b", {"x-list": "a"}, "/", "undefined"),
]


@pytest.mark.parametrize("rule,headers,path,expected", SEMANTIC_CASES)
def test_subtle_semantics_match_opa(tmp_path, rule, headers, path, expected):
    config = tmp_path / f"{rule}.json"
    config.write_text(json.dumps({
        "placement": "sidecar",
        "layer": "http",
        "action_header": "x-trustweave-action",
        "rego": {"modules": {"semantics.rego": SEMANTICS}, "query": f"data.semantics.{rule}"},
    }))
    document, verdict = ours(config, "spiffe://gcp.company.com/ns/a/sa/b", headers, path)
    assert opa(config, document) == expected, "OPA's documented answer"
    assert verdict == expected


# One rule per builtin group the Rego module enables (docs/filter.md, "Rego mode: builtins"), on request data.
BUILTINS = """
package builtins
import rego.v1

headers := input.attributes.request.http.headers

regex_group if regex.match(`^v[0-9]+$`, headers["x-v"])
glob_group if glob.match("*.company.com", ["."], headers["x-host"])
time_group if time.parse_rfc3339_ns(headers["x-t"]) < time.parse_rfc3339_ns("2030-01-01T00:00:00Z")
encoding_group if {
  base64.decode(headers["x-b64"]) == "hello"
  hex.decode(headers["x-hex"]) == "hi"
  urlquery.decode(headers["x-q"]) == "a b&c"
  base64url.encode("hi?") == "aGk_"
}
net_group if net.cidr_contains("10.0.0.0/8", headers["x-ip"])
semver_group if semver.compare(headers["x-ver"], "1.2.0") >= 0
json_group if json.unmarshal(headers["x-json"]).a == 1
yaml_group if yaml.unmarshal(headers["x-yaml"]).a == 1
jsonpatch_group if json.patch({"a": 1}, [{"op": "add", "path": "/b", "value": 2}]).b == 2
graph_group if "c" in graph.reachable({"a": ["b"], "b": ["c"], "c": []}, [headers["x-node"]])
count_empty if strings.count(headers["x-s"], "") == 4
range_group if count(numbers.range(1, to_number(headers["x-n"]))) == 3
"""

BUILTIN_CASES = [
    ("regex_group", {"x-v": "v12"}, True),
    ("regex_group", {"x-v": "12"}, "undefined"),
    ("glob_group", {"x-host": "api.company.com"}, True),
    ("glob_group", {"x-host": "a.b.company.com"}, "undefined"),
    ("time_group", {"x-t": "2026-12-02T10:00:00Z"}, True),
    ("time_group", {"x-t": "2031-01-01T00:00:00Z"}, "undefined"),
    ("encoding_group", {"x-b64": "aGVsbG8=", "x-hex": "6869", "x-q": "a%20b%26c"}, True),
    ("net_group", {"x-ip": "10.1.2.3"}, True),
    ("net_group", {"x-ip": "192.168.0.1"}, "undefined"),
    ("semver_group", {"x-ver": "1.10.0"}, True),
    ("semver_group", {"x-ver": "1.1.9"}, "undefined"),
    ("json_group", {"x-json": '{"a":1}'}, True),
    ("yaml_group", {"x-yaml": "a: 1"}, True),
    ("jsonpatch_group", {}, True),
    ("graph_group", {"x-node": "a"}, True),
    ("graph_group", {"x-node": "c"}, True),
    ("graph_group", {"x-node": "z"}, "undefined"),
    ("count_empty", {"x-s": "abc"}, True),
    ("range_group", {"x-n": "3"}, True),
]


@pytest.mark.parametrize("rule,headers,expected", BUILTIN_CASES)
def test_builtin_groups_decide_as_opa(tmp_path, rule, headers, expected):
    config = tmp_path / f"{rule}.json"
    config.write_text(json.dumps({
        "placement": "sidecar",
        "layer": "http",
        "rego": {"modules": {"builtins.rego": BUILTINS}, "query": f"data.builtins.{rule}"},
    }))
    document, verdict = ours(config, "spiffe://gcp.company.com/ns/a/sa/b", headers)
    assert opa(config, document) == expected, "OPA's answer"
    assert verdict == expected


# Policies in the shape OPA-Envoy's published examples use (its Istio quick start's
# basic-auth roles, object results, parsed_path/parsed_query), written for these tests:
# they read only OPA-Envoy's input fields, so a user's OPA-Envoy policy runs unchanged.
OPA_ENVOY_STYLE = """
package envoy.authz

import input.attributes.request.http as http_request
import input.parsed_path

default allow := false

allow if {
    parsed_path[0] == "health"
    http_request.method == "GET"
}

allow if {
    some role in roles_of[user]
    some grant in grants[role]
    grant.method == http_request.method
    grant.path == http_request.path
}

user := name if {
    [_, encoded] := split(http_request.headers.authorization, " ")
    [name, _] := split(base64url.decode(encoded), ":")
}

roles_of := {"carol": ["viewer"], "dave": ["operator"]}

grants := {
    "viewer": [{"method": "GET", "path": "/orders"}],
    "operator": [{"method": "GET", "path": "/orders"}, {"method": "POST", "path": "/api/v1/orders"}],
}

# OPA-Envoy's object result: allowed, headers, status.
decision := {"allowed": allow, "headers": {"x-ext-authz": "opa-style"}, "http_status": status}
status := 200 if allow
status := 403 if not allow

# parsed_query: keys to lists of decoded values.
english if input.parsed_query.lang == ["en"]
"""


def basic(user: str) -> str:
    import base64
    return "Basic " + base64.urlsafe_b64encode(f"{user}:secret".encode()).decode()


OPA_ENVOY_CASES = [
    ("allow", "GET", "/health/live", {}, True),
    ("allow", "POST", "/health/live", {}, False),
    ("allow", "GET", "/orders", {"authorization": basic("carol")}, True),
    ("allow", "POST", "/api/v1/orders", {"authorization": basic("carol")}, False),
    ("allow", "POST", "/api/v1/orders", {"authorization": basic("dave")}, True),
    # Not base64url: the bindings evaluate with strict builtin errors and fail; OPA-Envoy's
    # default (non-strict) makes the call undefined, so `default allow := false`. Deny either way.
    ("allow", "GET", "/orders", {"authorization": "Bearer x"}, "error"),
    ("allow", "GET", "/orders", {}, False),
    ("decision", "GET", "/orders", {"authorization": basic("carol")}, True),
    ("decision", "GET", "/admin", {"authorization": basic("carol")}, False),
    ("english", "GET", "/p?lang=en", {}, True),
    ("english", "GET", "/p?lang=en&lang=fr", {}, "undefined"),
    ("english", "GET", "/p?lang=%65n", {}, True),
]


@pytest.mark.parametrize("rule,method,path,headers,expected", OPA_ENVOY_CASES)
def test_opa_envoy_style_policies_decide_as_opa(tmp_path, rule, method, path, headers, expected):
    config = tmp_path / f"{rule}.json"
    config.write_text(json.dumps({
        "placement": "sidecar",
        "layer": "http",
        "rego": {"modules": {"authz.rego": OPA_ENVOY_STYLE}, "query": f"data.envoy.authz.{rule}"},
    }))
    document, verdict = ours(config, CATALOG, headers, path=path, method=method)
    if expected == "error":
        with pytest.raises(OpaError, match="base64url.decode"):
            opa(config, document)
        assert verdict is False, "an evaluation error denies"
        return
    assert opa(config, document) == expected, "OPA's answer"
    assert verdict == expected
