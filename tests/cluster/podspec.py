"""Pure functions of the node agent: what a kubelet, a scheduler and cluster DNS compute from a pod's spec.

Nothing here talks to the API server or starts a process, so each rule is unit-tested on its own
(tests/unit/test_cluster_podspec.py): quantities, resource fit, taints and tolerations, node selectors,
choosing a node, the image -> command mapping, environment variables, the pod phase, and a pod's host
name and /etc/hosts.
"""

import base64
import fnmatch
import math
import re
from fractions import Fraction
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Quantities and resources

_SUFFIX = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+))?([a-zA-Z]*)")


def parse_quantity(value):
    """A Kubernetes quantity ('100m', '64Gi', '1e3', 2) as an exact Fraction."""
    match = _QUANTITY.fullmatch(str(value).strip())
    if not match or match.group(3) not in _SUFFIX:
        raise ValueError(f"invalid quantity {value!r}")
    number, exponent, suffix = match.groups()
    result = Fraction(number) * _SUFFIX[suffix]
    if exponent:
        result *= Fraction(10) ** int(exponent)
    return result


def container_requests(container):
    """Requests of one container; a resource with only a limit requests its limit (API defaulting)."""
    resources = container.get("resources") or {}
    merged = dict(resources.get("limits") or {})
    merged.update(resources.get("requests") or {})
    return {name: parse_quantity(q) for name, q in merged.items()}


def pod_requests(spec):
    """Effective requests: sum over containers, at least the largest init container, plus overhead."""
    total = {}
    for container in spec.get("containers", []):
        for name, q in container_requests(container).items():
            total[name] = total.get(name, 0) + q
    for container in spec.get("initContainers", []) or []:
        for name, q in container_requests(container).items():
            total[name] = max(total.get(name, 0), q)
    for name, q in (spec.get("overhead") or {}).items():
        total[name] = total.get(name, 0) + parse_quantity(q)
    total["pods"] = Fraction(1)
    return total


def insufficient_resources(requests, allocatable, used):
    """Names of resources the node cannot give (sorted); extended resources a node lacks count too."""
    short = []
    for name, want in requests.items():
        if want <= 0:
            continue
        have = parse_quantity(allocatable.get(name, 0)) - used.get(name, 0)
        if want > have:
            short.append(name)
    return sorted(short)


def add_requests(total, requests):
    for name, q in requests.items():
        total[name] = total.get(name, 0) + q
    return total


# ---------------------------------------------------------------------------------------------
# Scheduling: taints, tolerations, node selection


def tolerates(toleration, taint):
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return not toleration.get("key") or toleration["key"] == taint.get("key")
    return toleration.get("key") == taint.get("key") and (toleration.get("value") or "") == (taint.get("value") or "")


def untolerated_taints(tolerations, taints, effects=("NoSchedule", "NoExecute")):
    return [
        t
        for t in taints or []
        if t.get("effect") in effects and not any(tolerates(tol, t) for tol in tolerations or [])
    ]


def _match_expression(expr, values_by_key):
    key, op, values = expr["key"], expr["operator"], expr.get("values") or []
    present = key in values_by_key
    value = values_by_key.get(key)
    if op == "In":
        return present and value in values
    if op == "NotIn":
        return not present or value not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt"):
        try:
            number, bound = int(value), int(values[0])
        except (TypeError, ValueError, IndexError):
            return False
        return number > bound if op == "Gt" else number < bound
    return False


def matches_node_selector(spec, node):
    """nodeSelector and required node affinity (terms are ORed, expressions ANDed)."""
    labels = node.get("metadata", {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if not required:
        return True
    fields = {"metadata.name": node["metadata"]["name"]}
    for term in required.get("nodeSelectorTerms") or []:
        if all(_match_expression(e, labels) for e in term.get("matchExpressions") or []) and all(
            _match_expression(e, fields) for e in term.get("matchFields") or []
        ):
            return True
    return False


def taint_text(taint):
    return f"{{{taint.get('key')}: {taint.get('value') or ''}}}"


def unschedulable_reasons(pod, node, used):
    """Why `pod` does not fit `node` ([] when it fits), in kube-scheduler's words and filter order.

    `used`: the summed requests of the non-terminal pods already bound to the node.
    """
    spec = pod["spec"]
    if node.get("spec", {}).get("unschedulable") and untolerated_taints(
        spec.get("tolerations"), [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]
    ):
        return ["node(s) were unschedulable"]
    taints = untolerated_taints(spec.get("tolerations"), node.get("spec", {}).get("taints"))
    if taints:
        return [f"node(s) had untolerated taint {taint_text(taints[0])}"]
    if not matches_node_selector(spec, node):
        return ["node(s) didn't match Node selector"]
    allocatable = node.get("status", {}).get("allocatable") or {}
    short = insufficient_resources(pod_requests(spec), allocatable, used)
    if "pods" in short:
        return ["Too many pods"]
    return [f"Insufficient {name}" for name in short]


def unschedulable_message(reasons, nodes=1):
    """'0/1 nodes are available: 1 Insufficient nvidia.com/gpu.' (every node failing for the same reasons)."""
    return f"0/{nodes} nodes are available: " + ", ".join(f"{nodes} {r}" for r in reasons) + "."


def fit_error(reasons_by_node):
    """kube-scheduler's FitError text for {node name: reasons}: each reason counted over the nodes, the
    '<count> <reason>' strings sorted, e.g. '0/2 nodes are available: 1 Insufficient memory, 1 node(s) had
    untolerated taint {node.kubernetes.io/unreachable: }.'"""
    counts = {}
    for reasons in reasons_by_node.values():
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
    histogram = sorted(f"{count} {reason}" for reason, count in counts.items())
    return f"0/{len(reasons_by_node)} nodes are available: " + ", ".join(histogram) + "."


def least_allocated_score(requests, allocatable, used):
    """kube-scheduler's default NodeResourcesFit score (LeastAllocated, cpu and memory weighted equally):
    the mean free fraction of cpu and memory once the pod is placed, so pods spread over emptier nodes."""
    fractions = []
    for name in ("cpu", "memory"):
        capacity = parse_quantity(allocatable.get(name, 0))
        if capacity > 0:
            taken = used.get(name, 0) + requests.get(name, 0)
            fractions.append(max(capacity - taken, 0) / capacity)
    return sum(fractions) / len(fractions) if fractions else 0


def choose_node(pod, nodes, used_by_node):
    """(node name, None) for the best node that fits `pod`, else (None, the FitError message).

    `nodes`: Node objects; `used_by_node`: {node name: summed requests of its non-terminal pods}. Among the
    nodes that fit, the least allocated wins (ties: the first by name, where kube-scheduler picks at random).
    """
    reasons_by_node, scores = {}, []
    requests = pod_requests(pod["spec"])
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        used = used_by_node.get(name, {})
        reasons = unschedulable_reasons(pod, node, used)
        if reasons:
            reasons_by_node[name] = reasons
        else:
            allocatable = node.get("status", {}).get("allocatable") or {}
            scores.append((-least_allocated_score(requests, allocatable, used), name))
    if scores:
        return min(scores)[1], None
    if not reasons_by_node:
        return None, "0/0 nodes are available."
    return None, fit_error(reasons_by_node)


# ---------------------------------------------------------------------------------------------
# Host names and cluster DNS

MAX_HOSTNAME = 63  # a DNS label


def pod_hostname(pod):
    """The host name a pod's containers get: spec.hostname, else the pod name cut to a DNS label (kubelet's
    GeneratePodHostNameAndDomain)."""
    spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
    if spec.get("hostname"):
        return spec["hostname"]
    return meta.get("name", "")[:MAX_HOSTNAME].rstrip("-.")


def dns_names(hostname, subdomain, namespace, cluster_domain):
    """The names cluster DNS answers for a pod of a headless Service: its FQDN first, then the shorter forms
    a pod's resolv.conf search path (<ns>.svc.<domain>, svc.<domain>, <domain>) completes."""
    stem = f"{hostname}.{subdomain}"
    return [f"{stem}.{namespace}.svc.{cluster_domain}", f"{stem}.{namespace}.svc", f"{stem}.{namespace}", stem]


def _selects(service, pod):
    selector = (service.get("spec") or {}).get("selector") or {}
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _published(pod, pod_ip, service):
    """Whether the EndpointSlice controller lists the pod for `service` and DNS publishes it: running (not
    finished) with an IP, and ready and not terminating unless the Service publishes not-ready addresses."""
    status = pod.get("status") or {}
    if not pod_ip or status.get("phase") in ("Succeeded", "Failed"):
        return False
    if (service.get("spec") or {}).get("publishNotReadyAddresses"):
        return True
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ready and not (pod.get("metadata") or {}).get("deletionTimestamp")


def pod_dns_records(pods, services, namespace, subdomain, cluster_domain, ips=None):
    """[(ip, names)] of the pods with a host name in `subdomain` of `namespace`, as cluster DNS answers them:
    only under a headless Service of that name that selects them (one record per host name: the newest pod).
    `ips`: pod IPs known better than status.podIP (the pods this node runs), by uid."""
    ips = ips or {}
    service = next(
        (
            s
            for s in services
            if s["metadata"]["namespace"] == namespace
            and s["metadata"]["name"] == subdomain
            and (s.get("spec") or {}).get("clusterIP") == "None"
        ),
        None,
    )
    if service is None:
        return []
    latest = {}
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        spec, meta = pod.get("spec") or {}, pod["metadata"]
        if meta.get("namespace") != namespace or spec.get("subdomain") != subdomain or not spec.get("hostname"):
            continue
        ip = ips.get(meta.get("uid")) or (pod.get("status") or {}).get("podIP")
        if _selects(service, pod) and _published(pod, ip, service):
            latest[spec["hostname"]] = ip
    return [(ip, dns_names(host, subdomain, namespace, cluster_domain)) for host, ip in sorted(latest.items())]


def hosts_file(pod, pod_ip, pods=(), services=(), cluster_domain="cluster.local", ips=None):
    """The /etc/hosts of a pod: the kubelet's (localhost, the pod's own name, hostAliases), then what cluster
    DNS would answer for the pod's subdomain (the agent has no DNS server; resolv.conf search paths do not
    apply to /etc/hosts, so every short form is written out)."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    hostname, subdomain = pod_hostname(pod), spec.get("subdomain")
    own = f"{hostname}.{subdomain}.{meta['namespace']}.svc.{cluster_domain}\t{hostname}" if subdomain else hostname
    lines = [
        "# Kubernetes-managed hosts file.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
        f"{pod_ip}\t{own}",
    ]
    aliases = spec.get("hostAliases") or []
    if aliases:
        lines.append("# Entries added by HostAliases.")
        lines += [f"{a['ip']}\t" + "\t".join(a.get("hostnames") or []) for a in aliases]
    if subdomain:
        records = pod_dns_records(pods, services, meta["namespace"], subdomain, cluster_domain, ips)
        if records:
            lines.append(f"# Cluster DNS (test node agent): the pods of headless Service {subdomain}.")
            lines += [f"{ip}\t" + "\t".join(names) for ip, names in records]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Images and commands

# (pattern on the full image reference, default entrypoint). First match wins. Entrypoints run
# with the test environment's virtualenv bin first on PATH, so console scripts resolve there.
DEFAULT_IMAGES = (
    ("*hostile-trainer*", ["lora-train"]),  # its own lora-train: IMAGE_BIN_DIRS
    ("*lora-operator*trainer*", ["lora-train"]),
    ("*lora-operator*", ["lora-operator"]),
    ("python", ["python"]),
    ("python:*", ["python"]),
    ("python@*", ["python"]),
    ("*/python", ["python"]),
    ("*/python:*", ["python"]),
    ("*/python@*", ["python"]),
    ("busybox", ["sh"]),
    ("busybox:*", ["sh"]),
    ("*/busybox", ["sh"]),
    ("*/busybox:*", ["sh"]),
)


# Images whose own programs shadow the test environment's: (pattern, folder put first on PATH).
IMAGE_BIN_DIRS = (("*hostile-trainer*", Path(__file__).resolve().parents[1] / "e2e" / "hostile_image" / "bin"),)


def image_bin_dirs(image):
    """The folders of an image's own programs, searched before the test environment's."""
    return [str(folder) for pattern, folder in IMAGE_BIN_DIRS if fnmatch.fnmatchcase(image or "", pattern)]


def image_entrypoint(image, images=DEFAULT_IMAGES):
    """The default command for an image, or None for an image the agent cannot 'pull'."""
    for pattern, entrypoint in images:
        if fnmatch.fnmatchcase(image or "", pattern):
            return list(entrypoint)
    return None


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text, env):
    """Kubernetes $(VAR) expansion: defined vars are replaced, $$ escapes, the rest stays as-is."""

    def replace(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(replace, text)


def container_argv(container, entrypoint, env):
    """command + args, or the image's entrypoint + args when the pod gives no command."""
    command = container.get("command") or entrypoint or []
    return [expand(part, env) for part in list(command) + list(container.get("args") or [])]


# ---------------------------------------------------------------------------------------------
# Environment


class ConfigError(Exception):
    """A container cannot start yet: CreateContainerConfigError, with the kubelet's message."""


def field_value(pod, path, pod_ip, host_ip):
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    values = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path not in values:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return values[path]


def _resource_field(container, ref, node_allocatable):
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(name)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(name)
    if raw is None:
        raw = node_allocatable.get(name, 0)
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(raw) / divisor))


def _key_ref(kind, ref, namespace, lookup):
    data = lookup(kind, namespace, ref["name"])
    label = "secret" if kind == "Secret" else "configmap"
    if data is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f'{label} "{ref["name"]}" not found')
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
    return data[ref["key"]]


def decode_secret(secret):
    """A Secret's data as text (values are base64 in the API); None for a missing secret."""
    if secret is None:
        return None
    data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def container_env(pod, container, lookup, pod_ip, host_ip="127.0.0.1", base=None, node_allocatable=None):
    """The environment a container's process gets.

    `lookup(kind, namespace, name)` returns a ConfigMap's or Secret's data as {key: text}, or None
    when it does not exist. Order as in the kubelet: base (the 'image' env), envFrom, then env with
    $(VAR) expansion against what is defined so far. Raises ConfigError like the kubelet would.
    """
    namespace = pod["metadata"]["namespace"]
    env = dict(base or {})
    for source in container.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        )
        data = lookup(kind, namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{"secret" if kind == "Secret" else "configmap"} "{ref["name"]}" not found')
        prefix = source.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items() if re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", prefix + k)})
    for var in container.get("env") or []:
        source = var.get("valueFrom")
        if source is None:
            value = expand(var.get("value", ""), env)
        elif "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "resourceFieldRef" in source:
            value = _resource_field(container, source["resourceFieldRef"], node_allocatable or {})
        elif "secretKeyRef" in source:
            value = _key_ref("Secret", source["secretKeyRef"], namespace, lookup)
        elif "configMapKeyRef" in source:
            value = _key_ref("ConfigMap", source["configMapKeyRef"], namespace, lookup)
        else:
            raise ConfigError(f"unsupported valueFrom in env {var['name']}")
        if value is not None:
            env[var["name"]] = value
    return env


# ---------------------------------------------------------------------------------------------
# Pod phase


def pod_phase(restart_policy, statuses):
    """The pod phase from container statuses, by the kubelet's rules (getPhase).

    A container waiting after it has run (lastState.terminated) counts as stopped, not pending.
    """
    waiting = running = stopped = succeeded = 0
    for status in statuses:
        state = status.get("state", {})
        if "running" in state:
            running += 1
        elif "terminated" in state:
            stopped += 1
            succeeded += state["terminated"].get("exitCode") == 0
        elif "terminated" in status.get("lastState", {}):
            stopped += 1
            succeeded += status["lastState"]["terminated"].get("exitCode") == 0
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    return "Running" if restart_policy == "OnFailure" else "Failed"
