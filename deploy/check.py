#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/kubernetes, offline.

1. Schema: every manifest is validated with kubernetes-validate (which ships
   the Kubernetes JSON schemas in its wheel; no network) in strict mode, so
   unknown fields fail too, against the oldest Kubernetes the manifests
   support and the newest the validator knows.
2. What a schema cannot see: the kustomization lists every manifest; the
   pod's termination grace outlasts the preStop pause plus the node's
   shutdown grace; probes and Services name ports the container has; every
   Service port carries an appProtocol; the disruption budget keeps a write
   quorum; the example Secret holds placeholders, not a key; and, given the
   dfs binary, every DFS_* variable is one `dfs node` reads.

Run by `make deploy-check`, inside the venv that target creates.
"""

import argparse
import pathlib
import re
import subprocess
import sys

import yaml

# Oldest supported: the preStop `sleep` action is on by default from 1.30
# (native gRPC probes from 1.27). Newest: the latest schema the pinned
# validator bundles.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]

problems = []


def problem(msg):
    problems.append(msg)
    print(f"FAIL {msg}")


def duration_seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    return int(m.group(1)) * scale


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def validate_schemas(validator, manifests):
    for version in KUBERNETES_VERSIONS:
        cmd = [validator, "--strict", "--quiet", "-k", version] + [str(m) for m in manifests]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(result.stdout + result.stderr)
        if result.returncode != 0:
            problem(f"schema validation against Kubernetes {version} failed")
        else:
            print(f"ok   {len(manifests)} manifests validate (strict) against Kubernetes {version}")


def check_kustomization(directory, manifests):
    kust = load_all(directory / "kustomization.yaml")[0]
    listed = set(kust.get("resources", []))
    for name in listed:
        if not (directory / name).is_file():
            problem(f"kustomization.yaml lists {name}, which does not exist")
    for m in manifests:
        if m.name != "secret.example.yaml" and m.name not in listed:
            problem(f"kustomization.yaml does not list {m.name}")
    if "secret.example.yaml" in listed:
        problem("kustomization.yaml must not ship the example Secret")


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def check_statefulset(sts, services, pdbs, node_env_vars):
    pod = sts["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "dfs"]
    env = env_of(container)
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}

    grace = duration_seconds(env.get("DFS_SHUTDOWN_GRACE") or "30s")
    pause = (
        container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    )
    pod_grace = pod.get("terminationGracePeriodSeconds", 30)
    if pod_grace <= grace + pause:
        problem(
            f"terminationGracePeriodSeconds {pod_grace} must exceed preStop {pause}s"
            f" + DFS_SHUTDOWN_GRACE {grace}s"
        )
    else:
        print(f"ok   pod grace {pod_grace}s > preStop {pause}s + shutdown grace {grace:g}s")

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if not spec or "grpc" not in spec:
            problem(f"{probe} must be a native gRPC probe")
        elif spec["grpc"]["port"] not in ports.values():
            problem(f"{probe} checks port {spec['grpc']['port']}, which the container does not expose")
        else:
            # A node cut off from its cluster is NOT_SERVING on "" (it cannot
            # take writes) but alive: restarting it would not help.
            want = "" if probe == "readinessProbe" else "liveness"
            got = spec["grpc"].get("service", "")
            if got != want:
                problem(f"{probe} asks health service {got!r}, not {want!r}")

    for var in ("DFS_GRPC_ADDR", "DFS_P2P_ADDR", "DFS_METRICS_ADDR"):
        value = env.get(var, "")
        port = int(value.rsplit(":", 1)[-1]) if ":" in value else None
        if port not in ports.values():
            problem(f"{var}={value!r} listens on a port the container does not declare")
    if not env.get("DFS_ADVERTISE_ADDR", "").startswith(f"$(POD_NAME).{sts['spec']['serviceName']}."):
        problem("DFS_ADVERTISE_ADDR must be the pod's stable name under the headless Service")
    if sts["spec"]["serviceName"] not in services:
        problem(f"serviceName {sts['spec']['serviceName']} has no Service manifest")
    elif services[sts["spec"]["serviceName"]]["spec"].get("clusterIP") != "None":
        problem("the StatefulSet's Service must be headless (clusterIP: None)")

    if node_env_vars is not None:
        unknown = sorted(v for v in env if v.startswith("DFS_") and v not in node_env_vars)
        if unknown:
            problem(f"`dfs node` reads no variable named {', '.join(unknown)}")
        else:
            print(f"ok   every DFS_* variable ({len([v for v in env if v.startswith('DFS_')])}) is a `dfs node` flag")

    for svc in services.values():
        for port in svc["spec"].get("ports", []):
            where = f"Service {svc['metadata']['name']} port {port.get('name')}"
            if not port.get("appProtocol"):
                problem(f"{where} has no appProtocol")
            target = port.get("targetPort")
            if isinstance(target, str) and target not in ports:
                problem(f"{where} targets {target}, which the container does not name")

    replicas = int(env.get("DFS_REPLICAS", "3"))
    majority = replicas // 2 + 1
    for pdb in pdbs:
        unavailable = pdb["spec"].get("maxUnavailable")
        if not isinstance(unavailable, int) or unavailable > replicas - majority:
            problem(
                f"PodDisruptionBudget {pdb['metadata']['name']}: maxUnavailable must be at most"
                f" {replicas - majority} to keep a write quorum of {majority} of R={replicas}"
            )
        else:
            print(f"ok   disruption budget keeps {replicas - unavailable} of R={replicas} nodes (quorum {majority})")


def check_secret_example(docs):
    for doc in docs:
        for key, value in (doc.get("stringData") or {}).items():
            if re.fullmatch(r"[0-9a-fA-F]{64}", str(value).strip()):
                problem(f"secret.example.yaml holds what looks like a real key in {key}")
        if doc.get("data"):
            problem("secret.example.yaml must use placeholders in stringData, not data")


def node_env_vars_from(binary):
    helptext = subprocess.run(
        [binary, "node", "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"\[env: (DFS_[A-Z0-9_]+)=", helptext))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--validator", default="kubernetes-validate")
    parser.add_argument("--dfs-bin", help="the dfs binary, to check DFS_* variable names")
    args = parser.parse_args()

    manifests = sorted(p for p in args.directory.glob("*.yaml") if p.name != "kustomization.yaml")
    validate_schemas(args.validator, manifests)
    check_kustomization(args.directory, manifests)

    by_kind = {}
    for m in manifests:
        for doc in load_all(m):
            by_kind.setdefault(doc["kind"], []).append(doc)
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    node_env_vars = node_env_vars_from(args.dfs_bin) if args.dfs_bin else None
    if node_env_vars is None:
        print("note DFS_* names not checked (no --dfs-bin)")
    statefulsets = by_kind.get("StatefulSet", [])
    if len(statefulsets) != 1:
        problem(f"expected one StatefulSet, found {len(statefulsets)}")
    for sts in statefulsets:
        check_statefulset(sts, services, by_kind.get("PodDisruptionBudget", []), node_env_vars)
    check_secret_example(load_all(args.directory / "secret.example.yaml"))

    if problems:
        print(f"deploy-check: {len(problems)} problem(s)")
        return 1
    print("deploy-check: manifests OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
