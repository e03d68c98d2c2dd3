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
3. Overlays (--overlay DIR, e.g. deploy/kubernetes-tls): rendered here the
   way kustomize does for what they use (the base's resources plus JSON 6902
   patches), then held to the same schema and checks, and for TLS: the
   certificate files come from a mounted Secret and the probes are exec
   probes running `dfs health` over TLS with flags `dfs health` knows.
4. The Dockerfile (--dockerfile): runs as the pod's non-root user, exposes
   the container's ports, and its entrypoint is the binary the probes run.

Run by `make deploy-check`, inside the venv that target creates.
"""

import argparse
import copy
import pathlib
import re
import subprocess
import sys
import tempfile

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


def check_statefulset(sts, services, pdbs, node_env_vars, health_flags=None):
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

    tls = "DFS_TLS_CERT_FILE" in env
    if tls:
        check_tls(pod, container, env, health_flags)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if tls:
            continue  # exec probes, checked by check_tls
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


def secret_mounts(pod, container):
    """Mount path -> Secret name, for the container's Secret volumes."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return {
        m["mountPath"].rstrip("/") + "/": secrets[m["name"]]
        for m in container.get("volumeMounts", [])
        if m["name"] in secrets
    }


def check_tls(pod, container, env, health_flags):
    """TLS on the gRPC port: files from a Secret, probes over TLS."""
    mounts = secret_mounts(pod, container)

    def from_secret(path, what):
        if not any(path.startswith(m) for m in mounts):
            problem(f"{what} {path} is not in a mounted Secret ({', '.join(mounts) or 'none'})")
            return False
        return True

    files = [v for v in ("DFS_TLS_CERT_FILE", "DFS_TLS_KEY_FILE", "DFS_TLS_CLIENT_CA_FILE") if v in env]
    if "DFS_TLS_KEY_FILE" not in env:
        problem("DFS_TLS_CERT_FILE without DFS_TLS_KEY_FILE")
    if all([from_secret(env[v], v) for v in files]):
        print(f"ok   {', '.join(files)} come from a mounted Secret")
    mtls = "DFS_TLS_CLIENT_CA_FILE" in env
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = (container.get(probe) or {}).get("exec", {}).get("command", [])
        if command[:2] != [DFS_IN_IMAGE, "health"]:
            problem(f"{probe} must run `{DFS_IN_IMAGE} health` (native gRPC probes cannot speak TLS)")
            continue
        flags = {}
        it = iter(command[2:])
        for arg in it:
            flags[arg] = next(it, None)
        unknown = sorted(f for f in flags if health_flags is not None and f not in health_flags)
        if unknown:
            problem(f"{probe}: `dfs health` has no flag {', '.join(unknown)}")
        want = "" if probe == "readinessProbe" else "liveness"
        if flags.get("--service", "") != want:
            problem(f"{probe} asks health service {flags.get('--service', '')!r}, not {want!r}")
        needed = ["--ca-file"] + (["--cert-file", "--key-file"] if mtls else [])
        for flag in needed:
            if flag not in flags:
                problem(f"{probe} lacks {flag}" + (" (the node requires client certificates)" if mtls else ""))
            else:
                from_secret(flags[flag], f"{probe} {flag}")
        if (container[probe].get("timeoutSeconds") or 1) < 2:
            problem(f"{probe}: an exec probe starts a process; give it timeoutSeconds >= 2")
    print(f"ok   probes run `dfs health` over TLS{' with a client certificate' if mtls else ''}")


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


def health_flags_from(binary):
    helptext = subprocess.run(
        [binary, "health", "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", helptext))


# Where the image puts the binary (Dockerfile); exec probes name it in full.
DFS_IN_IMAGE = "/usr/local/bin/dfs"


def json_pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def apply_json_patch(doc, ops, where):
    """RFC 6902 add, replace, remove and test: what the overlays use."""
    for op in ops:
        *parents, last = json_pointer(op["path"])
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        kind = op["op"]
        if kind == "test":
            got = node[int(last)] if isinstance(node, list) else node.get(last)
            if got != op["value"]:
                problem(f"{where}: test {op['path']} == {op['value']!r} failed (found {got!r})")
        elif kind == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif kind in ("add", "replace"):
            if isinstance(node, list):
                node[int(last)] = copy.deepcopy(op["value"])
            else:
                if kind == "replace" and last not in node:
                    problem(f"{where}: replace of missing {op['path']}")
                node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            problem(f"{where}: op {kind} is not supported here")


def kustomize_resources(directory):
    """The documents a kustomization directory yields: its resources (files
    or other kustomization directories) with its JSON 6902 patches applied."""
    kust = load_all(directory / "kustomization.yaml")[0]
    docs = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        docs += kustomize_resources(path) if path.is_dir() else load_all(path)
    for patch in kust.get("patches", []):
        target = patch.get("target", {})
        matches = [
            d for d in docs
            if d["kind"] == target.get("kind") and d["metadata"]["name"] == target.get("name")
        ]
        where = f"{directory.name}/{patch['path']}"
        if len(matches) != 1:
            problem(f"{where}: target {target} matches {len(matches)} resources, not 1")
            continue
        apply_json_patch(matches[0], load_all(directory / patch["path"])[0], where)
    return docs


def check_dockerfile(path, sts):
    """The image and the manifests agree: user, ports, entrypoint."""
    text = path.read_text()
    before = len(problems)
    pod = sts["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "dfs"]
    user = re.search(r"^USER\s+(\d+)", text, re.M)
    if not user or int(user.group(1)) != pod["securityContext"]["runAsUser"]:
        problem(f"Dockerfile USER must be the pod's runAsUser {pod['securityContext']['runAsUser']}")
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.*)$", text, re.M) for p in line.split()}
    wanted = {p["containerPort"] for p in container["ports"] if p["name"] in ("grpc", "tcp-p2p")}
    if not wanted <= exposed:
        problem(f"Dockerfile EXPOSEs {sorted(exposed)}, not the container's {sorted(wanted)}")
    if f'ENTRYPOINT ["{DFS_IN_IMAGE}"]' not in text:
        problem(f"Dockerfile ENTRYPOINT must be {DFS_IN_IMAGE} (the manifests pass `node`; exec probes run it)")
    if not re.search(r"^HEALTHCHECK .*\n?.*dfs.*health", text, re.M):
        problem("Dockerfile has no HEALTHCHECK running `dfs health`")
    if len(problems) == before:
        print(f"ok   Dockerfile: user, ports {sorted(wanted)}, entrypoint and HEALTHCHECK agree with the manifests")


def check_overlay(overlay, validator, node_env_vars, health_flags):
    docs = kustomize_resources(overlay)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, doc in enumerate(docs):
            f = pathlib.Path(tmp) / f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
            f.write_text(yaml.safe_dump(doc))
            files.append(f)
        validate_schemas(validator, files)
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for sts in by_kind.get("StatefulSet", []):
        check_statefulset(sts, services, by_kind.get("PodDisruptionBudget", []), node_env_vars, health_flags)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--validator", default="kubernetes-validate")
    parser.add_argument("--dfs-bin", help="the dfs binary, to check DFS_* variable names")
    parser.add_argument("--overlay", action="append", default=[], type=pathlib.Path,
                        help="a kustomize overlay of DIRECTORY to render and check (repeatable)")
    parser.add_argument("--dockerfile", type=pathlib.Path, help="the image's Dockerfile")
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
    health_flags = health_flags_from(args.dfs_bin) if args.dfs_bin else None
    if node_env_vars is None:
        print("note DFS_* names not checked (no --dfs-bin)")
    statefulsets = by_kind.get("StatefulSet", [])
    if len(statefulsets) != 1:
        problem(f"expected one StatefulSet, found {len(statefulsets)}")
    for sts in statefulsets:
        check_statefulset(sts, services, by_kind.get("PodDisruptionBudget", []), node_env_vars)
    check_secret_example(load_all(args.directory / "secret.example.yaml"))
    if args.dockerfile and statefulsets:
        check_dockerfile(args.dockerfile, statefulsets[0])

    for overlay in args.overlay:
        print(f"--- overlay {overlay}")
        check_overlay(overlay, args.validator, node_env_vars, health_flags)

    if problems:
        print(f"deploy-check: {len(problems)} problem(s)")
        return 1
    print("deploy-check: manifests OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
