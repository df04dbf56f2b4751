"""Validate Trustweave's Kubernetes and Istio YAML offline, against the real schemas.

Core Kubernetes kinds are checked by `kubernetes-validate` in strict mode (unknown
fields fail). Custom resources are checked against the OpenAPI v3 schemas of the
real CRDs vendored in tests/manifests/schemas (Istio, spire-controller-manager), made strict the
same way: an object that declares `properties` and does not preserve unknown
fields rejects any other key.

Usage: python3 tests/manifests/validate.py FILE_OR_DIR... (exit 1 on any error)
"""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys
from typing import Iterator

import jsonschema
import kubernetes_validate
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "tests" / "manifests" / "schemas"
KUBERNETES_VERSION = "1.32"


def _strict(schema: dict) -> dict:
    """An OpenAPI v3 structural schema as strict JSON Schema."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
        if "properties" in node and not preserve and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(schema)
    props = schema.setdefault("properties", {})
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    props.setdefault("metadata", {"type": "object"})
    schema["additionalProperties"] = False
    return schema


def load_crd_schemas(directory: pathlib.Path = SCHEMAS) -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) → strict JSON Schema, from every CRD file in `directory`."""
    schemas = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served", True):
                    schemas[(group, version["name"], kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


def validate_document(doc: dict, crds: dict) -> list[str]:
    """Errors of one Kubernetes document (empty when valid)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["not a Kubernetes object (apiVersion and kind are required)"]
    api_version, kind = doc["apiVersion"], doc["kind"]
    group, _, version = api_version.rpartition("/")
    if (group, version, kind) in crds:
        validator = jsonschema.Draft7Validator(crds[(group, version, kind)])
        return [
            f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]
    if group.endswith(".istio.io") or group.endswith("spiffe.io"):
        return [f"no CRD schema for {api_version} {kind} in {SCHEMAS}"]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path) or "(root)"
        return [f"{path}: {_first_line(error.message)}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as error:
        return [f"{api_version} {kind}: {_first_line(str(error))}"]
    return []


def yaml_documents(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    """(`file#index`, document) for every Kubernetes document in a file."""
    for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
        if doc is not None:
            yield f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}#{index}", doc


def kubernetes_files(root: pathlib.Path) -> list[pathlib.Path]:
    """YAML files holding Kubernetes objects (kustomization files and Helm values excluded)."""
    files = [root] if root.is_file() else sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")])
    keep = []
    for f in files:
        if f.name in ("kustomization.yaml", "kustomization.yml") or {"values", "config"} & set(f.parts):
            continue
        keep.append(f)
    return keep


def render_overlay(overlay: pathlib.Path) -> list[dict]:
    """`kubectl kustomize` of one overlay, offline."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def main(argv: list[str]) -> int:
    crds = load_crd_schemas()
    failed = 0
    for arg in argv or ["manifests", "istio"]:
        for path in kubernetes_files(REPO / arg if not pathlib.Path(arg).is_absolute() else pathlib.Path(arg)):
            for where, doc in yaml_documents(path):
                for error in validate_document(doc, crds):
                    failed += 1
                    print(f"{where} ({doc.get('kind', '?')}): {error}")
    print(f"{'FAILED' if failed else 'ok'}: {failed} error(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
