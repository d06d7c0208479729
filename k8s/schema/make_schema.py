"""Write rayjob-v1.json, a JSON Schema of KubeRay's RayJob (ray.io/v1), from KubeRay's CRD.

    git -C KUBERAY show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > crd.yaml
    python k8s/schema/make_schema.py crd.yaml v1.7.0 > k8s/schema/rayjob-v1.json

The CRD's openAPIV3Schema for version v1, made checkable by `jsonschema` and small:

- Objects with `properties` get `additionalProperties: false`: the API server rejects unknown
  fields under kubectl's default strict field validation, so the schema does too.
- A required field with a `default` is not required here: the API server fills in defaults
  before it checks `required` (minReplicas, maxReplicas).
- Kubernetes-only keywords (`x-kubernetes-*`, among them the CEL rules) are dropped: jsonschema
  cannot check them. `x-kubernetes-int-or-string` needs nothing more, as its `anyOf` stays.
- Subtrees that occur more than once (the head, worker and submitter pod templates, containers,
  env vars ...) are written once under `$defs` and referenced.
- The subtrees in TRIM and outside KEEP_ONLY, which rayjob.yaml does not use, and `status`
  (the operator's to write) keep their type and lose their inside: a trimmed node accepts
  whatever the CRD accepts there and more, never less.
"""
from __future__ import annotations

import hashlib
import json
import sys

import yaml

# Where a node sits (its property name, or "pod spec", "container", "volume" as told by its
# fields) -> its properties trimmed to their bare type. A pod template's `spec` is a "pod spec",
# so "spec" here is the RayJob's own.
TRIM = {
    "spec": {"deletionStrategy"},
    "rayClusterSpec": {"networkPolicy", "gcsFaultToleranceOptions", "historyServerOptions"},
    "headGroupSpec": {"headService"},                      # a whole corev1.Service
    "pod spec": {"affinity", "ephemeralContainers", "resourceClaims", "topologySpreadConstraints"},
    "container": {"lifecycle", "livenessProbe", "readinessProbe", "startupProbe"},
}
# ... or the only properties kept whole (a Volume has some 30 kinds of source).
KEEP_ONLY = {"volume": {"name", "emptyDir", "secret", "configMap", "persistentVolumeClaim"}}
ROOT_TRIM = {"status"}      # written by the operator, never by a manifest
MIN_SHARED = 400            # bytes: smaller repeated subtrees stay inline


def bare(node: dict) -> dict:
    out = {"type": node["type"]} if "type" in node else {}
    if node.get("type") == "array":
        out["items"] = {}
    return out | {"$comment": "trimmed"}


def convert(node, parent: str = ""):
    """JSON Schema for one CRD node; `parent` names what holds it (for TRIM)."""
    if isinstance(node, list):
        return [convert(x, parent) for x in node]
    if not isinstance(node, dict):
        return node
    props = node.get("properties")
    kind = parent
    if props is not None:
        if "containers" in props and "volumes" in props:
            kind = "pod spec"
        elif "image" in props and "name" in props and "volumeMounts" in props:
            kind = "container"
        elif "emptyDir" in props and "hostPath" in props:
            kind = "volume"
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "description":
            continue
        if key == "properties":
            trim = set(value) - KEEP_ONLY[kind] if kind in KEEP_ONLY else TRIM.get(kind, set())
            out[key] = {name: bare(child) if name in trim else convert(child, name)
                        for name, child in sorted(value.items())}
        elif key == "required":
            out[key] = [name for name in value if "default" not in props.get(name, {})]
        else:
            out[key] = convert(value, parent)
    if out.get("required") == []:
        del out["required"]
    if node.get("nullable"):
        out.pop("nullable")
        out["type"] = [out["type"], "null"]
    if props is not None and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


# Kubernetes' own type names for the shared subtrees, told apart by the fields they have
K8S_NAMES = [
    ("PodSpec", {"containers", "volumes"}),
    ("Container", {"image", "name", "volumeMounts"}),
    ("Volume", {"name", "emptyDir"}),
    ("PodSecurityContext", {"fsGroup"}),
    ("SecurityContext", {"allowPrivilegeEscalation"}),
    ("ResourceRequirements", {"limits", "requests"}),
    ("EnvVar", {"name", "valueFrom"}),
    ("EnvVarSource", {"secretKeyRef", "configMapKeyRef"}),
    ("EnvFromSource", {"secretRef", "configMapRef"}),
    ("SecretVolumeSource", {"secretName", "items"}),
    ("ConfigMapVolumeSource", {"name", "items", "defaultMode"}),
]


def k8s_name(node: dict) -> str | None:
    if node.get("type") == "array":
        inner = k8s_name(node.get("items", {}))
        return inner and f"{inner}List"
    if "spec" in node.get("properties", {}) and "metadata" in node["properties"]:
        return "PodTemplateSpec"
    fields = set(node.get("properties", {}))
    return next((name for name, has in K8S_NAMES if has <= fields), None)


def share(schema: dict) -> dict:
    """Move repeated subtrees into $defs, under Kubernetes' name for their type where k8s_name
    knows it, else after the property that first holds them."""
    def key(n):
        return hashlib.sha1(json.dumps(n, sort_keys=True).encode()).hexdigest()

    counts, names = {}, {}

    def count(n, name):
        if isinstance(n, dict):
            if n.get("type") in ("object", "array") and len(json.dumps(n)) >= MIN_SHARED:
                k = key(n)
                counts[k] = counts.get(k, 0) + 1
                names.setdefault(k, name)
            for c, v in n.items():
                if c == "properties":
                    for prop, child in v.items():
                        count(child, prop)
                else:       # items, additionalProperties, anyOf ...: named after their holder
                    count(v, f"{name}Item" if c == "items" else name)
        elif isinstance(n, list):
            for v in n:
                count(v, name)

    count(schema, "root")
    defs, used = {}, set()

    def replace(n, top=False):
        if isinstance(n, dict):
            k = key(n) if n.get("type") in ("object", "array") else None
            if not top and k and counts.get(k, 0) > 1:
                if k not in used:
                    used.add(k)
                    name = k8s_name(n) or names[k][0].upper() + names[k][1:]
                    while name in defs:
                        name += "_"
                    names[k] = name
                    defs[name] = replace(n, top=True)
                return {"$ref": f"#/$defs/{names[k]}"}
            return {c: replace(v) for c, v in n.items()}
        if isinstance(n, list):
            return [replace(v) for v in n]
        return n

    out = replace(schema, top=True)
    out["$defs"] = dict(sorted(defs.items()))
    return out


def main(crd_path: str, release: str) -> None:
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    raw = version["schema"]["openAPIV3Schema"]
    raw = raw | {"properties": {k: bare(v) if k in ROOT_TRIM else v for k, v in raw["properties"].items()}}
    schema = share(convert(raw))
    head = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (f"KubeRay {release}, ray-operator/config/crd/bases/ray.io_rayjobs.yaml "
                     "(github.com/ray-project/kuberay), version v1's openAPIV3Schema, converted by "
                     "k8s/schema/make_schema.py: unknown fields rejected, x-kubernetes-* keywords "
                     "(CEL rules included) dropped, fields with a default not required, repeated subtrees in $defs, subtrees marked "
                     "'trimmed' reduced to their type."),
        "title": "RayJob (ray.io/v1)",
    }
    json.dump(head | schema, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
