#!/usr/bin/env python3
"""Checks every file in deploy/ without a cluster, a Docker engine or a running systemd.

Run by scripts/check-deploy.sh (which installs what this needs); see that script for the tools.
Each check prints `ok:` or `SKIPPED:` (a tool is missing here, and why); every failure is listed
at the end and makes the exit status 1.

  - YAML and JSON: every file under deploy/ parses.
  - Kubernetes (deploy/kubernetes/*/): every document has apiVersion, kind and metadata.name; the
    built-in kinds are validated field by field against the Kubernetes API types (the official
    Python client's models: an unknown or misspelt field, a wrong type or a missing required field
    fails); the CRDs (ServiceMonitor, CiliumNetworkPolicy) against their known fields; and the
    references between objects: Service and PodDisruptionBudget and NetworkPolicy selectors match
    pod labels, target ports and probe ports name container ports, mounted ConfigMaps, Secrets,
    PersistentVolumeClaims and ServiceAccounts exist (or are made by the bundle's script),
    container ports match the listen / admin_listen of the config the container loads, that config
    passes `cliqgate check`, and its routes are config/cliq.yaml's. `kubectl kustomize` builds each
    bundle where kubectl is installed.
  - Dockerfile: hadolint; multi-stage, distroless non-root final stage, `--locked`, a HEALTHCHECK
    on /healthz whose probe the build makes, every COPY source let through by the .dockerignore.
    The probe itself (deploy/docker/healthcheck.rs) is compiled and run against a live cliqgate.
  - Compose: bind-mounted files exist, the healthcheck runs the image's probe, the Prometheus
    config (promtool check config) loads the shared alerts, Grafana is provisioned with the dashboard.
  - Prometheus: promtool check rules and promtool test rules (deploy/prometheus/alerts_test.yml).
  - Grafana: the dashboard's panels (titles the issue asks for, unique ids, a grid without
    overlaps, the datasource variable), every query parses as PromQL (promtool), and every
    recording rule it reads is defined in alerts.yml.
  - systemd: systemd-analyze verify on the unit (with and without the credential drop-in) and
    systemd-analyze security, whose exposure must stay at or below MAX_EXPOSURE.
Which cliqgate_* metrics the dashboard and alerts name, and that /metrics has each, is
tests/deploy_metrics.rs (cargo test).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SHARED = ROOT.parent / "shared"

# systemd-analyze security's "exposure" (0 = locked down, 10 = not at all); 1.2 when written.
MAX_EXPOSURE = 2.0
# Upper bound on the binary logging its listeners, and on one probe run: far above a normal start.
START_TIMEOUT_S = 30
# Panels the issue asks the dashboard for (title substrings).
REQUIRED_PANELS = [
    "Calls by decision per route",
    "Queue depth",
    "Queue wait",
    "Upstream latency percentiles",
    "Throttles from Zoho",
    "Active locks",
    "Store errors",
]

failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")
    print(f"  FAIL: {where}: {message}")


def ok(message):
    print(f"  ok: {message}")


def skip(message):
    print(f"  SKIPPED: {message}")


def rel(path):
    return str(Path(path).resolve().relative_to(ROOT))


def run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# YAML / JSON


def load_all_yaml(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def check_parse():
    print("== deploy/: every YAML and JSON file parses")
    count = 0
    for path in sorted(DEPLOY.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            try:
                load_all_yaml(path)
                count += 1
            except yaml.YAMLError as e:
                fail(rel(path), f"does not parse as YAML: {e}")
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
                count += 1
            except json.JSONDecodeError as e:
                fail(rel(path), f"does not parse as JSON: {e}")
    ok(f"{count} files parse")


# ---------------------------------------------------------------------------------------------
# Kubernetes: schema


def k8s_client():
    try:
        import kubernetes.client  # noqa: F401

        return kubernetes.client
    except ImportError:
        return None


BUILTIN_GROUPS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1", "batch/v1"}


def validate_model(client, value, typ, path, errors):
    """Strictly walks `value` against the client's model type `typ`: unknown fields, wrong types."""
    if typ == "object":
        return
    if typ in ("str", "datetime", "date"):
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, found {value!r}")
        return
    if typ == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{path}: expected an integer, found {value!r}")
        return
    if typ == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(f"{path}: expected a number, found {value!r}")
        return
    if typ == "bool":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, found {value!r}")
        return
    m = re.fullmatch(r"[Ll]ist\[(.+)\]", typ)
    if m:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, found {value!r}")
            return
        for i, item in enumerate(value):
            validate_model(client, item, m.group(1), f"{path}[{i}]", errors)
        return
    m = re.fullmatch(r"[Dd]ict\((?:str), (.+)\)|[Dd]ict\[str, (.+)\]", typ)
    if m:
        inner = m.group(1) or m.group(2)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, found {value!r}")
            return
        for k, v in value.items():
            validate_model(client, v, inner, f"{path}.{k}", errors)
        return
    cls = getattr(client, typ, None)
    if cls is None:
        errors.append(f"{path}: unknown type {typ} in the Kubernetes client")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({typ}), found {value!r}")
        return
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    for key, item in value.items():
        attr = by_json.get(key)
        if attr is None:
            errors.append(f"{path}: unknown field {key!r} in {typ}")
            continue
        validate_model(client, item, cls.openapi_types[attr], f"{path}.{key}", errors)


def validate_builtin(client, doc, where):
    kind = doc["kind"]
    typ = f"V1{kind}"
    if getattr(client, typ, None) is None:
        fail(where, f"no Kubernetes API type for {doc['apiVersion']} {kind}")
        return
    errors = []
    validate_model(client, doc, typ, kind, errors)
    for e in errors:
        fail(where, e)
    if errors:
        return
    # Required fields (and the models' own checks): build the model from the document.
    try:
        client.ApiClient()._ApiClient__deserialize(doc, typ)
    except Exception as e:  # the client raises ValueError or pydantic's ValidationError
        fail(where, f"{kind} {doc['metadata']['name']}: {str(e).splitlines()[0:3]}")


# The custom resources shipped under optional/: the fields used, as their CRDs define them.
CRD_FIELDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "spec": {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
                 "podTargetLabels", "sampleLimit"},
        "spec.endpoints[]": {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                             "honorLabels", "relabelings", "metricRelabelings", "params"},
    },
    ("cilium.io/v2", "CiliumNetworkPolicy"): {
        "spec": {"endpointSelector", "ingress", "egress", "ingressDeny", "egressDeny",
                 "description", "labels"},
        "spec.egress[]": {"toEndpoints", "toFQDNs", "toPorts", "toCIDR", "toCIDRSet",
                          "toEntities", "toServices", "toGroups", "toRequires"},
        "spec.egress[].toPorts[]": {"ports", "rules", "terminatingTLS", "originatingTLS",
                                    "listener", "serverNames"},
        "spec.egress[].toFQDNs[]": {"matchName", "matchPattern"},
    },
}


def validate_crd(doc, where):
    fields = CRD_FIELDS.get((doc["apiVersion"], doc["kind"]))
    if fields is None:
        fail(where, f"unknown kind {doc['apiVersion']} {doc['kind']}: add it to the checks")
        return False
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        fail(where, f"unknown top-level fields {sorted(unknown)}")

    def walk(value, path):
        if isinstance(value, list):
            for item in value:
                walk(item, path + "[]")
        elif isinstance(value, dict) and path in fields:
            for key in value:
                if key not in fields[path]:
                    fail(where, f"{doc['kind']}: unknown field {key!r} in {path}")
            for key, item in value.items():
                walk(item, f"{path}.{key}")

    walk(doc.get("spec"), "spec")
    return True


# ---------------------------------------------------------------------------------------------
# Kubernetes: references between objects


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_specs(docs):
    """(doc, pod template metadata, pod spec) of every workload."""
    out = []
    for _, doc in docs:
        if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = doc["spec"]["template"]
            out.append((doc, template.get("metadata", {}), template["spec"]))
        elif doc.get("kind") == "Pod":
            out.append((doc, doc["metadata"], doc["spec"]))
    return out


def containers_of(spec):
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def ns_of(doc, default_ns):
    return doc.get("metadata", {}).get("namespace", default_ns)


def script_secrets(bundle):
    """Secrets (name -> keys) that a script in the bundle creates with kubectl."""
    made = {}
    for script in bundle.glob("*.sh"):
        text = script.read_text()
        for m in re.finditer(r"create secret generic (\S+)((?:\\\n|[^\n])*)", text):
            keys = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", m.group(2)))
            made[m.group(1)] = (keys, script)
    return made


def check_bundle(bundle, client, binary):
    name = rel(bundle)
    print(f"== {name}: Kubernetes manifests")
    docs = []
    kustomization = None
    for path in sorted(bundle.rglob("*.yaml")):
        for doc in load_all_yaml(path):
            if path.name == "kustomization.yaml":
                kustomization = (path, doc)
                continue
            where = rel(path)
            missing = [k for k in ("apiVersion", "kind") if not isinstance(doc.get(k), str)]
            if missing or not isinstance(doc.get("metadata", {}).get("name"), str):
                fail(where, f"a document without {missing or ['metadata.name']}")
                continue
            docs.append((path, doc))
            if doc["apiVersion"] in BUILTIN_GROUPS:
                if client is not None:
                    validate_builtin(client, doc, where)
            else:
                validate_crd(doc, where)
    if client is None:
        skip("field-by-field validation: the kubernetes Python client is not installed")
    ok(f"{len(docs)} objects: apiVersion, kind, metadata.name" +
       (", fields against the Kubernetes API types" if client else ""))

    default_ns = (kustomization[1].get("namespace") if kustomization else None) or "default"
    by_kind = {}
    for path, doc in docs:
        by_kind.setdefault(doc["kind"], []).append((path, doc))

    def named(kind, obj_name, ns):
        return [d for _, d in by_kind.get(kind, [])
                if d["metadata"]["name"] == obj_name and ns_of(d, default_ns) == ns]

    secrets_made = script_secrets(bundle)
    workloads = pod_specs(docs)
    refs = 0

    # Namespaces: one per bundle, the kustomization's.
    if kustomization and kustomization[1].get("namespace"):
        for path, doc in docs:
            ns = doc["metadata"].get("namespace")
            if doc["kind"] != "Namespace" and path.parent == bundle and ns not in (None, default_ns):
                fail(rel(path), f"{doc['kind']} {doc['metadata']['name']} in namespace {ns}, "
                                f"the kustomization sets {default_ns}")

    for wdoc, meta, spec in workloads:
        where = f"{name}: {wdoc['kind']} {wdoc['metadata']['name']}"
        ns = ns_of(wdoc, default_ns)
        labels = meta.get("labels", {})
        if wdoc["kind"] != "Pod" and not matches(wdoc["spec"]["selector"].get("matchLabels"), labels):
            fail(where, "spec.selector does not match the pod template's labels")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            refs += 1
            if "configMap" in v and not named("ConfigMap", v["configMap"]["name"], ns):
                fail(where, f"volume {v['name']}: no ConfigMap {v['configMap']['name']}")
            if "secret" in v:
                s = v["secret"]["secretName"]
                if not named("Secret", s, ns) and s not in secrets_made:
                    fail(where, f"volume {v['name']}: no Secret {s}, and no script makes it")
            if "persistentVolumeClaim" in v:
                c = v["persistentVolumeClaim"]["claimName"]
                if not named("PersistentVolumeClaim", c, ns):
                    fail(where, f"volume {v['name']}: no PersistentVolumeClaim {c}")
        sa = spec.get("serviceAccountName")
        if sa and not named("ServiceAccount", sa, ns):
            fail(where, f"no ServiceAccount {sa}")
        for c in containers_of(spec):
            cwhere = f"{where} container {c['name']}"
            port_names = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            port_numbers = set(port_names.values())
            for m in c.get("volumeMounts", []):
                refs += 1
                if m["name"] not in volumes:
                    fail(cwhere, f"mounts volume {m['name']}, which the pod does not have")
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                if action is None:
                    continue
                refs += 1
                port = action["port"]
                if isinstance(port, str) and port not in port_names:
                    fail(cwhere, f"{probe_name} uses port {port!r}, not a port of the container")
                if isinstance(port, int) and port not in port_numbers:
                    fail(cwhere, f"{probe_name} uses port {port}, not a port of the container")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs += 1
                    made = secrets_made.get(ref["name"])
                    if not named("Secret", ref["name"], ns) and not (made and ref["key"] in made[0]):
                        fail(cwhere, f"env {env['name']}: no Secret {ref['name']} with key {ref['key']}")
            if c.get("image", "").split(":")[0] == "cliqgate" or c["name"] == "cliqgate":
                check_cliqgate_container(bundle, where, wdoc, meta, spec, c, volumes, docs,
                                         secrets_made, binary, ns, named)
        if kustomization:
            image_names = {i["name"] for i in kustomization[1].get("images", [])}
            for c in containers_of(spec):
                base = c["image"].split(":")[0]
                if base == "cliqgate" and base not in image_names:
                    fail(where, "image cliqgate has no `images:` entry in kustomization.yaml")

    def pods_matching(selector, ns):
        return [(w, m, s) for w, m, s in workloads
                if ns_of(w, default_ns) == ns and matches(selector, m.get("labels", {}))]

    for path, svc in by_kind.get("Service", []):
        where = f"{rel(path)}: Service {svc['metadata']['name']}"
        ns = ns_of(svc, default_ns)
        targets = pods_matching(svc["spec"].get("selector"), ns)
        refs += 1
        if not targets:
            fail(where, "its selector matches no pod template in the bundle")
            continue
        for port in svc["spec"]["ports"]:
            refs += 1
            target = port.get("targetPort", port["port"])
            for _, _, spec in targets:
                ports = [p for c in containers_of(spec) for p in c.get("ports", [])]
                if not any(p.get("name") == target or p["containerPort"] == target for p in ports):
                    fail(where, f"targetPort {target!r} is no container port of the selected pods")

    for path, pdb in by_kind.get("PodDisruptionBudget", []):
        refs += 1
        if not pods_matching(pdb["spec"]["selector"].get("matchLabels"), ns_of(pdb, default_ns)):
            fail(f"{rel(path)}: PodDisruptionBudget", "its selector matches no pod template")

    namespaces_here = {ns_of(w, default_ns) for w, _, _ in workloads}
    for path, pol in by_kind.get("NetworkPolicy", []):
        where = f"{rel(path)}: NetworkPolicy {pol['metadata']['name']}"
        ns = ns_of(pol, default_ns)
        if ns not in namespaces_here:
            # A policy for another namespace (optional/app-egress.yaml): its peers are checked.
            pass
        else:
            selector = pol["spec"]["podSelector"].get("matchLabels")
            selected = pods_matching(selector, ns) if selector else workloads
            refs += 1
            if selector and not selected:
                fail(where, f"podSelector {selector} matches no pod template")
            for rule in pol["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    if isinstance(port.get("port"), str):
                        refs += 1
                        if not any(p.get("name") == port["port"] for _, _, s in selected
                                   for c in containers_of(s) for p in c.get("ports", [])):
                            fail(where, f"ingress port {port['port']!r} names no port of its pods")
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for rule in pol["spec"].get(direction, []):
                for peer in rule.get(key, []):
                    sel = peer.get("podSelector", {}).get("matchLabels")
                    nsel = peer.get("namespaceSelector", {}).get("matchLabels", {})
                    peer_ns = nsel.get("kubernetes.io/metadata.name") if "namespaceSelector" in peer else ns
                    if not sel or peer_ns not in namespaces_here:
                        continue  # a peer outside the bundle (kube-dns, the monitoring namespace)
                    refs += 1
                    peers = pods_matching(sel, peer_ns)
                    if not peers:
                        fail(where, f"{direction} peer {sel} matches no pod template")
                    for port in rule.get("ports", []):
                        if direction == "egress" and isinstance(port.get("port"), str):
                            if not any(p.get("name") == port["port"] for _, _, s in peers
                                       for c in containers_of(s) for p in c.get("ports", [])):
                                fail(where, f"egress port {port['port']!r} names no port of {sel}")

    for path, sm in by_kind.get("ServiceMonitor", []):
        where = f"{rel(path)}: ServiceMonitor {sm['metadata']['name']}"
        services = [d for _, d in by_kind.get("Service", [])
                    if matches(sm["spec"]["selector"].get("matchLabels"), d["metadata"].get("labels", {}))]
        refs += 1
        if not services:
            fail(where, "its selector matches no Service's labels")
        for ep in sm["spec"]["endpoints"]:
            refs += 1
            if not any(p.get("name") == ep.get("port") for s in services for p in s["spec"]["ports"]):
                fail(where, f"endpoint port {ep.get('port')!r} is no port name of the Service")

    for path, cnp in by_kind.get("CiliumNetworkPolicy", []):
        where = f"{rel(path)}: CiliumNetworkPolicy {cnp['metadata']['name']}"
        refs += 1
        if not pods_matching(cnp["spec"]["endpointSelector"].get("matchLabels"), ns_of(cnp, default_ns)):
            fail(where, "its endpointSelector matches no pod template")
        names = {f["matchName"] for rule in cnp["spec"].get("egress", [])
                 for f in rule.get("toFQDNs", []) if "matchName" in f}
        api = SHARED / "cliq-api.md"
        if api.exists():
            m = re.search(r"Data centres: ([^\n]+(?:\n[^\n-][^\n]*)*)", api.read_text())
            text = m.group(1) if m else ""
            hosts = set(re.findall(r"cliq\.zoho[a-z]*(?:\.[a-z]+)+", text))
            # "cliq.zoho.com, .eu, .in, ...": the short forms are cliq.zoho + suffix.
            hosts |= {"cliq.zoho" + s for s in re.findall(r"(?<![a-z])(\.[a-z]+(?:\.[a-z]+)?)(?=[,\s]|$)", text)}
            hosts = {h.rstrip(".") for h in hosts}
            if names != hosts:
                fail(where, f"toFQDNs {sorted(names)} differ from the Cliq hosts of cliq-api.md {sorted(hosts)}")
            else:
                ok(f"CiliumNetworkPolicy names exactly the {len(hosts)} Cliq hosts of cliq-api.md")
        else:
            skip(f"the Cilium policy's hosts: {api} is not here to compare with")

    if kustomization:
        kpath, k = kustomization
        listed = set(k.get("resources", []))
        for res in listed:
            refs += 1
            if not (bundle / res).exists():
                fail(rel(kpath), f"resource {res} does not exist")
        for path in bundle.glob("*.yaml"):
            if path.name != "kustomization.yaml" and path.name not in listed:
                fail(rel(kpath), f"{path.name} is not in resources (put optional files in optional/)")
        kubectl = shutil.which("kubectl")
        if kubectl:
            out = run([kubectl, "kustomize", str(bundle)])
            if out.returncode != 0:
                fail(rel(kpath), f"kubectl kustomize failed: {out.stderr.strip()}")
            else:
                built = [d for d in yaml.safe_load_all(out.stdout) if d]
                ok(f"kubectl kustomize builds {len(built)} objects")
        else:
            skip("kubectl kustomize: kubectl is not installed (not in Debian)")
    ok(f"{refs} references between objects resolve")


def check_cliqgate_container(bundle, where, wdoc, meta, spec, c, volumes, docs, secrets_made,
                             binary, ns, named):
    """The config a cliqgate container loads: valid, and agreeing with the manifest's ports."""
    args = c.get("args", [])
    if "--config" not in args:
        fail(where, "the cliqgate container has no --config argument")
        return
    config_path = Path(args[args.index("--config") + 1])
    mount = next((m for m in c.get("volumeMounts", []) if Path(m["mountPath"]) == config_path.parent), None)
    if mount is None:
        fail(where, f"no volume is mounted at {config_path.parent} for --config {config_path}")
        return
    volume = volumes.get(mount["name"], {})
    text = None
    if "configMap" in volume:
        cms = named("ConfigMap", volume["configMap"]["name"], ns)
        if cms:
            text = cms[0].get("data", {}).get(config_path.name)
            if text is None:
                fail(where, f"ConfigMap {volume['configMap']['name']} has no key {config_path.name}")
                return
    elif "secret" in volume:
        made = secrets_made.get(volume["secret"]["secretName"])
        if made is None:
            return
        keys, script = made
        if config_path.name not in keys:
            fail(where, f"{rel(script)} puts no key {config_path.name} in the Secret")
            return
        out = run([str(script), "--render"], env={**os.environ, "REDIS_PASSWORD": "0" * 32,
                                                    "ADMIN_TOKEN": "1" * 32})
        if out.returncode != 0:
            fail(rel(script), f"--render failed: {out.stderr.strip()}")
            return
        text = out.stdout
    if text is None:
        return
    config = yaml.safe_load(text)
    source = f"the config {config_path} of {where}"

    def port_of(key, default):
        value = config.get(key, default)
        return value.rsplit(":", 1)[0], int(value.rsplit(":", 1)[1])

    admin_host, admin_port = port_of("admin_listen", "127.0.0.1:9090")
    listen_host, listen_port = port_of("listen", "0.0.0.0:8080")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if admin_host in ("127.0.0.1", "::1", "[::1]", "localhost"):
        fail(where, f"{source}: admin_listen {admin_host} cannot be probed or scraped from outside the pod")
    if ports.get("admin") != admin_port:
        fail(where, f"container port admin {ports.get('admin')} != admin_listen port {admin_port}")
    if "http" in ports and ports["http"] != listen_port:
        fail(where, f"container port http {ports['http']} != listen port {listen_port}")
    annotations = meta.get("annotations", {})
    if "prometheus.io/port" in annotations and int(annotations["prometheus.io/port"]) != admin_port:
        fail(where, f"prometheus.io/port {annotations['prometheus.io/port']} != admin_listen port {admin_port}")
    # Other containers of the pod that point at cliqgate on loopback use the listen port.
    for other in containers_of(spec):
        for env in other.get("env", []):
            m = re.match(r"https?://(?:127\.0\.0\.1|localhost):(\d+)", str(env.get("value", "")))
            if m and int(m.group(1)) != listen_port:
                fail(where, f"container {other['name']} env {env['name']} uses port {m.group(1)}, "
                            f"cliqgate listens on {listen_port}")
    # A state file lives on a mounted, writable volume.
    state_file = (config.get("store") or {}).get("state_file")
    if state_file:
        state_dir = Path(state_file).parent
        m = next((m for m in c.get("volumeMounts", []) if Path(m["mountPath"]) == state_dir), None)
        if m is None or m.get("readOnly"):
            fail(where, f"state_file {state_file}: no writable volume is mounted at {state_dir}")
    # The routes are the shipped ones.
    shipped = yaml.safe_load((ROOT / "config" / "cliq.yaml").read_text())
    for key in ("defaults", "routes"):
        if config.get(key) != shipped.get(key):
            fail(where, f"{source}: `{key}` differs from config/cliq.yaml (copy it from there)")
    # And cliqgate itself accepts it (a state file's directory must exist: use a temporary one).
    with tempfile.TemporaryDirectory() as tmp:
        if state_file:
            text = text.replace(state_file, str(Path(tmp) / "state.json"))
        path = Path(tmp) / "cliqgate.yaml"
        path.write_text(text)
        out = run([binary, "check", "--config", str(path)])
        if out.returncode != 0:
            fail(where, f"`cliqgate check` refuses {source}:\n{out.stderr.strip()}")
        else:
            ok(f"{source}: `cliqgate check` accepts it; ports, state volume and routes agree")


# ---------------------------------------------------------------------------------------------
# Docker


def dockerfile_stages(text):
    # Join continuation lines, drop comments.
    lines = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    args = {}
    stages = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif instr == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
            stages.append({"base": base, "from": rest, "lines": []})
        elif stages:
            stages[-1]["lines"].append((instr, rest))
    return stages


def dockerignore_allows(patterns, path):
    """Docker's rule: the last pattern that matches decides; `!` re-includes."""
    allowed = True
    for p in patterns:
        negate = p.startswith("!")
        p = p.lstrip("!").strip("/")
        if p == "*" or path == p or path.startswith(p + "/"):
            allowed = negate
    return allowed


def check_docker(binary):
    print("== deploy/docker: the Dockerfile and its healthcheck probe")
    dockerfile = DEPLOY / "docker" / "Dockerfile"
    text = dockerfile.read_text()
    hadolint = shutil.which("hadolint")
    if hadolint:
        out = run([hadolint, str(dockerfile)])
        if out.returncode != 0:
            fail(rel(dockerfile), f"hadolint:\n{out.stdout}{out.stderr}")
        else:
            ok("hadolint finds nothing")
    else:
        skip("hadolint is not installed (scripts/check-deploy.sh installs it from PyPI)")
    stages = dockerfile_stages(text)
    where = rel(dockerfile)
    if len(stages) < 2:
        fail(where, "not a multi-stage build")
        return
    final = stages[-1]
    if "distroless" not in final["base"] and "slim" not in final["base"]:
        fail(where, f"final stage {final['base']} is neither distroless nor slim")
    users = [rest for instr, rest in final["lines"] if instr == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        fail(where, "the final stage does not switch to a non-root USER")
    build_text = " ".join(rest for s in stages[:-1] for _, rest in s["lines"])
    if "cargo build" not in build_text or "--locked" not in build_text:
        fail(where, "cargo build without --locked")
    health = [rest for instr, rest in final["lines"] if instr == "HEALTHCHECK"]
    probe = None
    if not health or "/healthz" not in health[0]:
        fail(where, "no HEALTHCHECK on /healthz")
    else:
        cmd = json.loads(health[0][health[0].index("CMD") + 3:].strip())
        probe = cmd[0]
        if f"/out{probe}" not in build_text:
            fail(where, f"the HEALTHCHECK runs {probe}, which no build stage makes under /out")
    entry = [rest for instr, rest in final["lines"] if instr == "ENTRYPOINT"]
    if not entry or f"/out{json.loads(entry[0])[0]}" not in build_text:
        fail(where, "the ENTRYPOINT is not the binary the build stage installs")
    exposed = {int(p) for instr, rest in final["lines"] if instr == "EXPOSE" for p in rest.split()}
    egress = yaml.safe_load((ROOT / "config" / "egress.yaml").read_text())
    wanted = {int(egress["listen"].rsplit(":", 1)[1]), int(egress["admin_listen"].rsplit(":", 1)[1])}
    if exposed != wanted:
        fail(where, f"EXPOSE {sorted(exposed)} != the default config's ports {sorted(wanted)}")
    ignore = DEPLOY / "docker" / "Dockerfile.dockerignore"
    patterns = [l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
    for s in stages:
        for instr, rest in s["lines"]:
            if instr in ("COPY", "ADD") and "--from" not in rest:
                for src in rest.split()[:-1]:
                    if not dockerignore_allows(patterns, src.rstrip("/")):
                        fail(rel(ignore), f"excludes {src}, which the Dockerfile copies")
                    elif not (ROOT / src).exists():
                        fail(where, f"copies {src}, which does not exist")
    ok("multi-stage, non-root distroless final stage, --locked, HEALTHCHECK on /healthz, "
       "EXPOSE matches config/egress.yaml, .dockerignore lets every COPY through")
    if probe:
        check_probe(binary)
    return probe


def check_probe(binary):
    """Compiles deploy/docker/healthcheck.rs as the Dockerfile does and runs it against cliqgate."""
    rustc = shutil.which("rustc")
    if not rustc:
        skip("the healthcheck probe: rustc is not installed")
        return
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "cliqgate-healthcheck"
        out = run([rustc, "--edition", "2021", "-C", "opt-level=s", "-C", "strip=symbols",
                   "-C", "panic=abort", "-o", str(probe), str(DEPLOY / "docker" / "healthcheck.rs")])
        if out.returncode != 0:
            fail("deploy/docker/healthcheck.rs", f"does not compile:\n{out.stderr}")
            return
        config = Path(tmp) / "cliqgate.yaml"
        config.write_text(
            'listen: "127.0.0.1:0"\nadmin_listen: "127.0.0.1:0"\nupstream: "http://127.0.0.1:9"\n'
            'log:\n  format: json\n  level: "info"\n')
        proc = subprocess.Popen([binary, "--config", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            admin = None
            deadline = time.monotonic() + START_TIMEOUT_S
            while admin is None and time.monotonic() < deadline:
                line = proc.stderr.readline()
                if not line:
                    break
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("message") == "cliqgate listening":
                    admin = event["admin_addr"]
            if admin is None:
                fail("deploy/docker/healthcheck.rs", "cliqgate did not start for the probe test")
                return
            cases = [(f"http://{admin}/healthz", 0), (f"http://{admin}/readyz", 0),
                     (f"http://{admin}/nothing-here", 1)]
            # A port nobody listens on: bind one, note it, close it.
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                closed = s.getsockname()[1]
            cases.append((f"http://127.0.0.1:{closed}/healthz", 1))
            for url, expected in cases:
                got = run([str(probe), url], timeout=START_TIMEOUT_S).returncode
                if got != expected:
                    fail("deploy/docker/healthcheck.rs", f"{url}: exit {got}, expected {expected}")
            ok("the HEALTHCHECK probe compiles and answers 0 for /healthz and /readyz of a live "
               "cliqgate, 1 for a 404 and for a closed port")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------------------------------
# Compose, Prometheus, Grafana


def check_compose(probe):
    print("== deploy/compose: the stack's files and Prometheus config")
    compose_dir = DEPLOY / "compose"
    compose = yaml.safe_load((compose_dir / "compose.yaml").read_text())
    where = "deploy/compose/compose.yaml"
    mounts = {}
    for svc_name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[0], vol.split(":")[1]
            mounts.setdefault(svc_name, {})[dst] = src
            if src.startswith("."):
                if not (compose_dir / src).exists():
                    fail(where, f"{svc_name} mounts {src}, which does not exist")
        build = svc.get("build")
        if build:
            ctx = compose_dir / build["context"]
            if not (ctx / build["dockerfile"]).exists():
                fail(where, f"{svc_name} builds {build['dockerfile']}, which does not exist")
    test = compose["services"]["cliqgate"]["healthcheck"]["test"]
    if probe and (test[0] != "CMD" or test[1] != probe or "/healthz" not in test[-1]):
        fail(where, f"the cliqgate healthcheck {test} does not run the image's probe {probe} on /healthz")
    prom = yaml.safe_load((compose_dir / "prometheus.yml").read_text())
    rule_mounts = mounts.get("prometheus", {})
    for rf in prom.get("rule_files", []):
        if rule_mounts.get(rf) != "../prometheus/alerts.yml":
            fail("deploy/compose/prometheus.yml", f"rule file {rf} is not deploy/prometheus/alerts.yml")
    jobs = [j["job_name"] for j in prom["scrape_configs"]]
    if not any(re.fullmatch(r"cliqgate.*", j) for j in jobs):
        fail("deploy/compose/prometheus.yml", "no scrape job named cliqgate*, which the alerts select")
    promtool = shutil.which("promtool")
    if promtool:
        with tempfile.TemporaryDirectory() as tmp:
            text = (compose_dir / "prometheus.yml").read_text()
            text = text.replace("/etc/prometheus/alerts.yml", str(DEPLOY / "prometheus" / "alerts.yml"))
            (Path(tmp) / "prometheus.yml").write_text(text)
            out = run([promtool, "check", "config", str(Path(tmp) / "prometheus.yml")])
            if out.returncode != 0:
                fail("deploy/compose/prometheus.yml", f"promtool check config:\n{out.stdout}{out.stderr}")
            else:
                ok("promtool check config accepts prometheus.yml with deploy/prometheus/alerts.yml")
    grafana = mounts.get("grafana", {})
    dash_dst = next((d for d, s in grafana.items() if s == "../grafana/cliqgate.json"), None)
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cliqgate.yaml").read_text())
    if dash_dst is None or Path(dash_dst).parent != Path(provider["providers"][0]["options"]["path"]):
        fail(where, "Grafana's dashboard provider does not read the mounted cliqgate.json")
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    url = ds["datasources"][0]["url"]
    host = re.match(r"https?://([^:/]+)", url).group(1)
    if host not in compose["services"]:
        fail("deploy/grafana/provisioning", f"data source {url}: no compose service {host}")
    ok("bind mounts exist; healthcheck, rules, scrape job and Grafana provisioning agree")
    haproxy = shutil.which("haproxy")
    if haproxy:
        out = run([haproxy, "-c", "-f", str(compose_dir / "haproxy.cfg")])
        # Docker's DNS resolver is not here; only a parse error counts.
        if out.returncode != 0 and "parsing" in out.stderr.lower():
            fail("deploy/compose/haproxy.cfg", out.stderr)


def promql_identifiers(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))


def check_prometheus():
    print("== deploy/prometheus: rules and alerts")
    promtool = shutil.which("promtool")
    alerts = DEPLOY / "prometheus" / "alerts.yml"
    if not promtool:
        fail("deploy/prometheus", "promtool is missing (Debian package prometheus)")
        return
    out = run([promtool, "check", "rules", str(alerts)])
    if out.returncode != 0:
        fail(rel(alerts), f"promtool check rules:\n{out.stdout}{out.stderr}")
    else:
        ok(f"promtool check rules: {out.stdout.strip().splitlines()[-1].strip()}")
    out = run([promtool, "test", "rules", "alerts_test.yml"], cwd=alerts.parent)
    if out.returncode != 0:
        fail("deploy/prometheus/alerts_test.yml", f"promtool test rules:\n{out.stdout}{out.stderr}")
    else:
        ok("promtool test rules: every alert fires when it should and stays quiet otherwise")
    rules = [r for g in yaml.safe_load(alerts.read_text())["groups"] for r in g["rules"]]
    exprs = " ".join(r["expr"] for r in rules if "alert" in r)
    for what, needle in [("a Zoho throttle", "cliqgate_upstream_throttled_total"),
                         ("queue timeouts", "queue_timeout"),
                         ("store errors", "cliqgate_store_errors_total"),
                         ("the proxy down", "up{")]:
        if needle not in exprs:
            fail(rel(alerts), f"no alert on {what} ({needle})")


def check_grafana():
    print("== deploy/grafana: the dashboard")
    path = DEPLOY / "grafana" / "cliqgate.json"
    where = rel(path)
    dash = json.loads(path.read_text())
    panels = dash.get("panels", [])
    titles = [p.get("title", "") for p in panels]
    for wanted in REQUIRED_PANELS:
        if not any(wanted in t for t in titles):
            fail(where, f"no panel titled {wanted!r}")
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids):
        fail(where, "panel ids are not unique")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        fail(where, "no `datasource` variable")
    cells = {}
    for p in panels:
        g = p.get("gridPos", {})
        if g.get("x", -1) < 0 or g.get("x", 0) + g.get("w", 0) > 24 or g.get("h", 0) <= 0:
            fail(where, f"panel {p.get('title')!r}: gridPos {g} is outside the 24-column grid")
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (x, y) in cells:
                    fail(where, f"panels {cells[(x, y)]!r} and {p.get('title')!r} overlap")
                    break
                cells[(x, y)] = p.get("title")
        if p.get("datasource", {}).get("uid") != "${datasource}":
            fail(where, f"panel {p.get('title')!r} does not use the datasource variable")
        if not p.get("targets"):
            fail(where, f"panel {p.get('title')!r} has no query")
    # Every query parses as PromQL once Grafana's variables are filled in: promtool checks them as
    # recording rules. Recording rules they read must be defined in alerts.yml.
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    recorded = {r["record"] for g in alerts["groups"] for r in g["rules"] if "record" in r}
    queries = []
    for p in panels:
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            queries.append((p.get("title"), expr))
            for ident in promql_identifiers(expr):
                if ":" in ident and ident not in recorded:
                    fail(where, f"panel {p.get('title')!r} reads {ident}, which alerts.yml does not record")
    for v in variables.values():
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q or "")
        if m:
            queries.append((f"variable {v['name']}", m.group(1)))
    promtool = shutil.which("promtool")
    if promtool:
        def fill(expr):
            expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")
            return re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:query:{i}", "expr": fill(e)} for i, (_, e) in enumerate(queries)]}]}
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump(rules, f)
            f.flush()
            out = run([promtool, "check", "rules", f.name])
            if out.returncode != 0:
                fail(where, f"a query does not parse as PromQL:\n{out.stdout}{out.stderr}")
            else:
                ok(f"{len(panels)} panels; all {len(queries)} queries parse as PromQL (promtool)")
    png = DEPLOY / "grafana" / "dashboard.png"
    if not png.exists():
        fail(where, "deploy/grafana/dashboard.png (the README's picture) is missing")


# ---------------------------------------------------------------------------------------------
# systemd


def check_systemd(binary):
    print("== deploy/systemd: the unit")
    unit = DEPLOY / "systemd" / "cliqgate.service"
    text = unit.read_text()
    for needle in ("DynamicUser=yes", "ProtectSystem=strict", "ExecReload=/bin/kill -HUP $MAINPID"):
        if needle not in text:
            fail(rel(unit), f"missing {needle}")
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        skip("systemd-analyze is not installed here (Debian package systemd)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        # The unit names /usr/local/bin/cliqgate, which verify requires to exist: use the build.
        copy = Path(tmp) / "cliqgate.service"
        copy.write_text(text.replace("/usr/local/bin/cliqgate", str(Path(binary).resolve())))
        env = {**os.environ, "SYSTEMD_LOG_COLOR": "0"}
        out = run([analyze, "verify", str(copy)], env=env)
        if out.returncode != 0 or out.stderr.strip() or out.stdout.strip():
            fail(rel(unit), f"systemd-analyze verify:\n{out.stdout}{out.stderr}")
        else:
            ok("systemd-analyze verify: no complaint")
        out = run([analyze, "security", "--offline=true", "--no-pager", str(copy)], env=env)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
        if not m:
            skip(f"systemd-analyze security gave no exposure level: {out.stderr.strip()}")
        elif float(m.group(1)) > MAX_EXPOSURE:
            fail(rel(unit), f"systemd-analyze security: exposure {m.group(1)} > {MAX_EXPOSURE}")
        else:
            ok(f"systemd-analyze security: exposure {m.group(1)} (at most {MAX_EXPOSURE})")
        dropin = DEPLOY / "systemd" / "cliqgate-credential.conf"
        (Path(tmp) / "cliqgate.service.d").mkdir()
        (Path(tmp) / "cliqgate.service.d" / "credential.conf").write_text(
            dropin.read_text().replace("/usr/local/bin/cliqgate", str(Path(binary).resolve())))
        out = run([analyze, "verify", str(copy)], env=env)
        if out.returncode != 0 or out.stderr.strip() or out.stdout.strip():
            fail(rel(dropin), f"systemd-analyze verify with the drop-in:\n{out.stdout}{out.stderr}")
        else:
            ok("systemd-analyze verify with cliqgate-credential.conf: no complaint")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", required=True, help="a built cliqgate, for `check` and the probe")
    args = parser.parse_args()
    binary = str(Path(args.binary).resolve())
    client = k8s_client()
    check_parse()
    for bundle in sorted((DEPLOY / "kubernetes").iterdir()):
        if bundle.is_dir():
            check_bundle(bundle, client, binary)
    probe = check_docker(binary)
    check_compose(probe)
    check_prometheus()
    check_grafana()
    check_systemd(binary)
    if failures:
        print(f"\ncheck-deploy: {len(failures)} problem(s):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("\ncheck-deploy: every deployment file checks out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
