"""What `scripts/manifests-test` asks of a rendered kustomization beyond the schema.

The Kubernetes schema accepts a pod that runs as root, a probe on the wrong port or a Service
that selects nothing. These checks read the rendered manifests the way the cluster will, and
the oidc-edge configuration inside them the way the binary will, so that the manifests and the
config cannot drift apart (a listener port, the token path, the issuer host of the Ingress).

Run with the venv's python (PyYAML), by scripts/manifests-test:

  manifests-check.py check RENDERED OUT_DIR
      Checks every object; prints each failure and exits 1 if any. For every oidc-edge
      container, writes the mounted config directory to OUT_DIR/<n>/config/ (every key of the
      ConfigMap, as the pod sees it), its --config file name to OUT_DIR/<n>/config-file, and
      the files its projected token volumes and Secret volumes provide to
      OUT_DIR/<n>/pod-files ("token PATH", "ca PATH", "secret PATH"), so that
      `oidc-edge check-config` can be run on exactly what the pod gets.
  manifests-check.py break WHAT RENDERED OUT
      Writes a copy of RENDERED with one deliberate fault (see break_copy), for the test
      that proves the checks can fail, or, for WHAT = r2-keys or azure-sas, a documented edit
      (R2 or Azure Blob, with keys from a Secret) that the checks must accept.
  manifests-check.py enable-component KUSTOMIZATION RELPATH
      Adds a component to a (temporary copy of a) kustomization.yaml.
"""

import os
import posixpath
import sys
import tomllib

import yaml

# The image's defaults (Dockerfile: CMD, config path) and the in-cluster source's defaults
# (src/jwks/source/apiserver.rs: IN_CLUSTER_TOKEN, IN_CLUSTER_CA).
IMAGE_CONFIG = "/etc/oidc-edge/config.toml"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
DEFAULT_STATE_DIR = "/var/lib/oidc-edge"
# Where an edge takes pushes for an issuer, and so a push target's default URL and the token
# audience by convention (src/issuer/mod.rs: PUSH_SUFFIX).
PUSH_PATH = "/.oidc-edge/v1/jwks"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"

# A workload that runs until stopped, and one that runs to completion (`publish --once`).
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
RUN_ONCE_KINDS = {"Job", "CronJob"}

# Credentials a manifest must never spell out (they belong in a Secret).
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_TOKEN",
)
# The keys of a publish target that name a secret file (S3 keys, an Azure account key or SAS).
SECRET_FILE_KEYS = ("access_key_id_file", "secret_access_key_file", "account_key_file", "sas_token_file")

# The only role any binding may grant: reading the two discovery documents. A later workload
# that needs more must add it here, on purpose.
ALLOWED_CLUSTER_ROLES = {"system:service-account-issuer-discovery"}

# Where pods live, by kind: the path to the pod template's spec.
POD_TEMPLATES = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


def dig(obj, *path):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def name_of(obj):
    return f"{obj['kind'].lower()}/{obj['metadata']['name']}"


def is_oidc_edge(image):
    """The oidc-edge image under any registry and tag (kustomize's images: rewrites both)."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[0] == "oidc-edge"


def listen_port(listen):
    host, _, port = listen.rpartition(":")
    return host, int(port)


def port_number(container, port):
    """A probe's or targetPort's port, by name or number, as a container port number."""
    if port is None:
        return None
    for p in container.get("ports") or []:
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


def under(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class Pod:
    def __init__(self, owner, template):
        self.owner = owner
        self.namespace = owner["metadata"].get("namespace")
        self.labels = dig(template, "metadata", "labels") or {}
        self.spec = template["spec"]
        self.where = name_of(owner)
        self.volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        # Filled by check_oidc_edge: (container, parsed config) per oidc-edge container, and
        # the command of one that binds no public listener (`publish` or `push`), if any.
        self.configs = []
        self.agent = None


def check_security(pod):
    spec, where = pod.spec, pod.where
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        fail(where, "securityContext.runAsNonRoot must be true")
    if psc.get("runAsUser") == 0:
        fail(where, "securityContext.runAsUser must not be 0")
    if dig(psc, "seccompProfile", "type") != "RuntimeDefault":
        fail(where, "securityContext.seccompProfile.type must be RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            fail(where, f"{key} must not be set")
    # The pod gets no token unless it asks for one (a projected volume, checked below).
    if spec.get("automountServiceAccountToken") is not False:
        fail(where, "automountServiceAccountToken must be false")
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(cw, "securityContext.allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(cw, "securityContext.readOnlyRootFilesystem must be true")
        if sc.get("privileged"):
            fail(cw, "securityContext.privileged must not be true")
        if "ALL" not in (dig(sc, "capabilities", "drop") or []):
            fail(cw, "securityContext.capabilities.drop must contain ALL")
        if dig(sc, "capabilities", "add"):
            fail(cw, "securityContext.capabilities.add must be empty")
        if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
            fail(cw, "must not run as root")
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if dig(c, "resources", kind, resource) is None:
                    fail(cw, f"resources.{kind}.{resource} must be set")


def token_volumes(pod):
    return {
        name
        for name, v in pod.volumes.items()
        if any("serviceAccountToken" in s for s in dig(v, "projected", "sources") or [])
    }


def mounted_file(pod, container, path):
    """The volume and its source that provide the file `path` in `container`, if any."""
    for m in container.get("volumeMounts") or []:
        if posixpath.dirname(path) != m["mountPath"].rstrip("/") or m.get("subPath"):
            continue
        volume = pod.volumes.get(m["name"]) or {}
        for source in dig(volume, "projected", "sources") or []:
            if dig(source, "serviceAccountToken", "path") == posixpath.basename(path):
                return m, source
            for item in dig(source, "configMap", "items") or []:
                if item["path"] == posixpath.basename(path):
                    return m, source
    return None, None


def secret_file(pod, container, path):
    """The mount that provides `path` from a Secret volume in `container`, if any."""
    for m in container.get("volumeMounts") or []:
        if m.get("subPath") or not under(path, m["mountPath"]) or path == m["mountPath"]:
            continue
        volume = pod.volumes.get(m["name"]) or {}
        sources = dig(volume, "projected", "sources") or []
        if "secret" in volume or any("secret" in s for s in sources):
            return m
    return None


def resolve(config_dir, path):
    """A path of the config as the binary resolves it: relative to the config's directory."""
    return path if posixpath.isabs(path) else posixpath.normpath(posixpath.join(config_dir, path))


def check_publisher(pod, c, cw, args, config, admin_port, state):
    """A container that runs `publish`: where it runs, what it exposes, where its state is."""
    pod.agent = "publish"
    once = "--once" in args
    kind = pod.owner["kind"]
    if not any(issuer.get("publish") for issuer in config.get("issuers", [])):
        fail(cw, "runs publish, but no issuer of its config has an [[issuers.publish]] target")
    if once and kind not in RUN_ONCE_KINDS:
        fail(cw, f"publish --once exits after one run: a {kind} would restart it in a loop (use a CronJob)")
    if not once and kind not in LONG_RUNNING_KINDS:
        fail(cw, f"publish runs until stopped: a {kind} never completes (use --once, or a Deployment)")
    # Only the admin listener is bound (and none with --once): any other port is a mistake.
    for p in c.get("ports") or []:
        if once or p["containerPort"] != admin_port:
            fail(cw, f"port {p.get('name', p['containerPort'])}: publish binds no public listener"
                 + (" (and none at all with --once)" if once else ", only the admin port"))
    if kind == "Deployment":
        if dig(pod.owner, "spec", "replicas") not in (None, 1):
            fail(pod.where, "replicas must be 1: two publishers keep their own rotation grace and overwrite each other")
        if dig(pod.owner, "spec", "strategy", "type") != "Recreate":
            fail(pod.where, "strategy.type must be Recreate: a rolling update runs two publishers at once")
    if once:
        # Each run is a new pod: only a claim carries the retained keys to the next one.
        if not any(
            under(state, m["mountPath"]) and "persistentVolumeClaim" in pod.volumes.get(m["name"], {})
            for m in c.get("volumeMounts") or []
        ):
            fail(cw, f"[state] dir {state} must be on a persistentVolumeClaim: every run is a new pod, "
                     "and an emptyDir would lose the keys kept for key_retention")
    if kind == "CronJob" and dig(pod.owner, "spec", "concurrencyPolicy") != "Forbid":
        fail(pod.where, "concurrencyPolicy must be Forbid: two runs would share the state and write the same objects")


def push_url(issuer, target):
    """Where a push target PUTs: its url, else the issuer's push URL (as the binary does)."""
    return target.get("url") or issuer["issuer"].rstrip("/") + PUSH_PATH


def check_pusher(pod, c, cw, args, config, admin_port, config_dir, pod_files, used_tokens):
    """A container that runs `push`: where it runs, what it exposes, the token the edge checks."""
    pod.agent = "push"
    once = "--once" in args
    kind = pod.owner["kind"]
    if not any(issuer.get("push") for issuer in config.get("issuers", [])):
        fail(cw, "runs push, but no issuer of its config has an [[issuers.push]] target")
    if once and kind not in RUN_ONCE_KINDS:
        fail(cw, f"push --once exits after one push: a {kind} would restart it in a loop (use a CronJob)")
    if not once and kind not in LONG_RUNNING_KINDS:
        fail(cw, f"push runs until stopped: a {kind} never completes (use --once, or a Deployment)")
    # It sends, it never takes: only the admin listener is bound (none with --once).
    for p in c.get("ports") or []:
        if once or p["containerPort"] != admin_port:
            fail(cw, f"port {p.get('name', p['containerPort'])}: push binds no public listener"
                 + (" (and none at all with --once)" if once else ", only the admin port"))
    if kind in ("Deployment", "StatefulSet") and dig(pod.owner, "spec", "replicas") not in (None, 1):
        fail(pod.where, "replicas must be 1: one agent pushes the cluster's keys, more only push them again")
    # The edge verifies every push's token: its audience the push URL (the edge's `audience`),
    # a lifetime the edge accepts (at most an hour; the apiserver issues 10 minutes at least).
    for i, issuer in enumerate(config.get("issuers", [])):
        for t, target in enumerate(issuer.get("push", [])):
            url = push_url(issuer, target)
            tw = f"{cw} issuers[{i}].push[{t}] ({url})"
            if "token_file" not in target:
                continue  # check-config names it
            path = resolve(config_dir, target["token_file"])
            m, token = mounted_file(pod, c, path)
            sat = (token or {}).get("serviceAccountToken")
            if sat is None:
                fail(tw, f"the push token {path} must come from a projected serviceAccountToken")
                continue
            used_tokens.add(m["name"])
            audience = sat.get("audience")
            if audience != url:
                has = f"the audience {audience!r}" if audience else "no audience: the apiserver's own"
                fail(tw, f"the push token must have the audience {url}, the push URL, which the edge's "
                         f"push source checks (it has {has})")
            if not 600 <= sat.get("expirationSeconds", 3600) <= 3600:
                fail(tw, "the push token must live at most an hour (expirationSeconds from 600 to 3600): "
                         "the edge refuses longer-lived tokens")
            if not m.get("readOnly"):
                fail(tw, f"the token mount at {m['mountPath']} must be readOnly")
            pod_files.append(("token", path))


def check_credentials(pod, c, cw, config, config_dir, pod_files, used_tokens):
    """Every publish target's credentials, as the pod provides them."""
    env = {e["name"]: e for e in c.get("env") or []}
    for name in SECRET_ENV:
        if "value" in env.get(name, {}):
            fail(cw, f"env {name} is written into the manifest: use valueFrom.secretKeyRef (or the *_file keys)")

    def web_identity_token(where, path, audience):
        m, token = mounted_file(pod, c, path)
        sat = (token or {}).get("serviceAccountToken")
        if sat is None:
            fail(where, f"the web identity token {path} must come from a projected serviceAccountToken")
            return
        used_tokens.add(m["name"])
        if not sat.get("audience"):
            fail(where, f"the web identity token must have the audience of {audience}, "
                        "never the apiserver's own (no audience)")
        if not 600 <= sat.get("expirationSeconds", 3600) <= 3600:
            fail(where, "the web identity token must live at most an hour (expirationSeconds)")
        if not m.get("readOnly"):
            fail(where, f"the token mount at {m['mountPath']} must be readOnly")
        pod_files.append(("token", path))

    for i, issuer in enumerate(config.get("issuers", [])):
        for t, target in enumerate(issuer.get("publish", [])):
            tw = f"{cw} issuers[{i}].publish[{t}] ({target.get('to')})"
            azure = str(target.get("to", "")).startswith("az://")
            if "web_identity_token_file" in target:
                web_identity_token(tw, resolve(config_dir, target["web_identity_token_file"]),
                                   "the IAM OIDC provider (sts.amazonaws.com)")
            elif any(key in target for key in SECRET_FILE_KEYS):
                for key in SECRET_FILE_KEYS:
                    if key not in target:
                        continue  # check-config names a missing half
                    path = resolve(config_dir, target[key])
                    m = secret_file(pod, c, path)
                    if m is None:
                        fail(tw, f"{key} {path} must come from a Secret volume")
                    else:
                        if not m.get("readOnly"):
                            fail(tw, f"the Secret mount at {m['mountPath']} must be readOnly")
                        pod_files.append(("secret", path))
            # The environment, in the binary's order.
            elif azure and {"AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_TOKEN"} & env.keys():
                pass  # from a Secret (a literal secret fails above)
            elif azure and "value" in env.get("AZURE_FEDERATED_TOKEN_FILE", {}):
                web_identity_token(f"{tw} (env AZURE_FEDERATED_TOKEN_FILE)",
                                   env["AZURE_FEDERATED_TOKEN_FILE"]["value"],
                                   "the Entra ID federated credential (api://AzureADTokenExchange)")
            elif azure and pod.labels.get("azure.workload.identity/use") == "true":
                pass  # AKS's webhook adds the token and AZURE_* variables when the pod is created
            elif not azure and "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env:
                pass  # from a Secret (a literal secret fails above)
            elif not azure and "value" in env.get("AWS_WEB_IDENTITY_TOKEN_FILE", {}) and "AWS_ROLE_ARN" in env:
                web_identity_token(f"{tw} (env AWS_WEB_IDENTITY_TOKEN_FILE)",
                                   env["AWS_WEB_IDENTITY_TOKEN_FILE"]["value"],
                                   "the IAM OIDC provider (sts.amazonaws.com)")
            elif not any("secretRef" in e for e in c.get("envFrom") or []):
                fail(tw, "has no credentials: no key files, no web identity, and no credentials in "
                         "the container's environment (the publisher refuses to start)")
            if azure and "account" not in target and "AZURE_STORAGE_ACCOUNT_NAME" not in env \
                    and not c.get("envFrom"):
                fail(tw, "names no storage account: set account, or AZURE_STORAGE_ACCOUNT_NAME")


def check_oidc_edge(pod, configmaps, out_dir, index):
    """Each oidc-edge container against its own config file. Returns the next index."""
    for c in pod.spec["containers"]:
        if not is_oidc_edge(c["image"]):
            continue
        cw = f"{pod.where} container {c['name']}"
        args = c.get("args") or ["serve", "--config", IMAGE_CONFIG]
        if c.get("command"):
            fail(cw, "must keep the image's entrypoint (no command)")
        config_path = args[args.index("--config") + 1] if "--config" in args else IMAGE_CONFIG
        config_dir = posixpath.dirname(config_path)
        mount = next(
            (m for m in c.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == config_dir),
            None,
        )
        volume = pod.volumes.get(mount["name"]) if mount else None
        cm_name = dig(volume, "configMap", "name")
        cm = configmaps.get((pod.namespace, cm_name))
        if cm is None or posixpath.basename(config_path) not in (cm.get("data") or {}):
            fail(cw, f"{config_path} must come from a ConfigMap of this kustomization mounted at {config_dir}")
            continue
        if not mount.get("readOnly"):
            fail(cw, f"the config mount at {config_dir} must be readOnly")
        text = cm["data"][posixpath.basename(config_path)]
        config = tomllib.loads(text)
        pod.configs.append((c, config))

        # The files `check-config` needs, as this pod provides them.
        target = os.path.join(out_dir, str(index))
        index += 1
        os.makedirs(os.path.join(target, "config"))
        for key, value in cm["data"].items():
            with open(os.path.join(target, "config", key), "w") as f:
                f.write(value)
        with open(os.path.join(target, "config-file"), "w") as f:
            f.write(posixpath.basename(config_path) + "\n")
        pod_files = []
        used_tokens = set()

        # Listeners against the container's ports and probes.
        http = config.get("http", {}).get("listen")
        if http is not None and port_number(c, "http") != listen_port(http)[1]:
            fail(cw, f"the container port named http must be {listen_port(http)[1]} ([http] listen = {http!r})")
        admin = config.get("admin", {})
        admin_host, admin_port = listen_port(admin.get("listen", DEFAULT_ADMIN_LISTEN))
        # `serve`, `publish` and `push` run until stopped, with the admin listener; with
        # `--once` they bind nothing and exit.
        long_running = args[0] == "serve" or (args[0] in ("publish", "push") and "--once" not in args)
        if long_running and admin_host not in ("0.0.0.0", "[::]"):
            fail(cw, "[admin] listen must be 0.0.0.0 or [::]: the kubelet probes the pod's IP")
        if long_running:
            for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
                get = dig(c, probe, "httpGet") or {}
                if get.get("path") != path or port_number(c, get.get("port")) != admin_port:
                    fail(cw, f"{probe} must GET {path} on the admin port {admin_port}")

        # The state directory must be writable: the root filesystem is not.
        state = config.get("state", {}).get("dir", DEFAULT_STATE_DIR)
        if not any(
            under(state, m["mountPath"])
            and not m.get("readOnly")
            and ({"emptyDir", "persistentVolumeClaim", "ephemeral"} & set(pod.volumes.get(m["name"], {})))
            for m in c.get("volumeMounts") or []
        ):
            fail(cw, f"[state] dir {state} must be on a writable emptyDir or volume claim")
        if args[0] == "publish":
            check_publisher(pod, c, cw, args, config, admin_port, state)

        # The in-cluster source's token and CA, from a projected volume: a short-lived token for
        # the apiserver's own audience, and the cluster CA.
        in_cluster = [
            s
            for issuer in config.get("issuers", [])
            for s in issuer.get("sources", [])
            if s.get("kind") == "in-cluster"
        ]
        for source in in_cluster:
            token_path = source.get("token_file", IN_CLUSTER_TOKEN)
            ca_path = source.get("ca_file", IN_CLUSTER_CA)
            m, token = mounted_file(pod, c, token_path)
            sat = (token or {}).get("serviceAccountToken")
            if sat is None:
                fail(cw, f"the in-cluster token {token_path} must come from a projected serviceAccountToken")
            else:
                if "audience" in sat:
                    fail(cw, "the in-cluster token must have the apiserver's own audience (no audience)")
                if not 600 <= sat.get("expirationSeconds", 3600) <= 3600:
                    fail(cw, "the in-cluster token must live at most an hour (expirationSeconds)")
                if not m.get("readOnly"):
                    fail(cw, f"the token mount at {m['mountPath']} must be readOnly")
                used_tokens.add(m["name"])
                pod_files.append(("token", token_path))
            _, ca = mounted_file(pod, c, ca_path)
            if dig(ca, "configMap", "name") != "kube-root-ca.crt":
                fail(cw, f"the in-cluster CA {ca_path} must come from the ConfigMap kube-root-ca.crt")
            else:
                pod_files.append(("ca", ca_path))
        if args[0] == "push":
            check_pusher(pod, c, cw, args, config, admin_port, config_dir, pod_files, used_tokens)
        check_credentials(pod, c, cw, config, config_dir, pod_files, used_tokens)
        with open(os.path.join(target, "pod-files"), "w") as f:
            f.writelines(f"{kind} {path}\n" for kind, path in pod_files)

        # A token only where the config reads it: the in-cluster source, a web identity, a push.
        mounted_tokens = {m["name"] for m in c.get("volumeMounts") or []} & token_volumes(pod)
        for name in sorted(mounted_tokens - used_tokens):
            fail(cw, f"mounts the service-account token volume {name}, which its config does not read")
    # Containers that are not oidc-edge never get the token.
    for c in (pod.spec.get("initContainers") or []) + pod.spec["containers"]:
        if not any(c is own for own, _ in pod.configs):
            if {m["name"] for m in c.get("volumeMounts") or []} & token_volumes(pod):
                fail(f"{pod.where} container {c['name']}", "must not mount the service-account token")
    return index


def check(rendered, out_dir):
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if not docs:
        fail(rendered, "renders no object")
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    configmaps = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in by_kind.get("ConfigMap", [])}
    accounts = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in by_kind.get("ServiceAccount", [])}

    for ns in by_kind.get("Namespace", []):
        if dig(ns, "metadata", "labels", "pod-security.kubernetes.io/enforce") != "restricted":
            fail(name_of(ns), "must enforce the restricted Pod Security Standard")
    for sa in accounts.values():
        if sa.get("automountServiceAccountToken") is not False:
            fail(name_of(sa), "automountServiceAccountToken must be false")

    # RBAC: only the built-in issuer-discovery role, bound to service accounts defined here.
    for kind in ("Role", "ClusterRole"):
        for d in by_kind.get(kind, []):
            fail(name_of(d), "no role of our own: bind the built-in system:service-account-issuer-discovery")
    bound = set()
    for d in by_kind.get("ClusterRoleBinding", []) + by_kind.get("RoleBinding", []):
        ref = d["roleRef"]
        if ref["kind"] != "ClusterRole" or ref["name"] not in ALLOWED_CLUSTER_ROLES:
            fail(name_of(d), f"binds {ref['kind']} {ref['name']}, not one of {sorted(ALLOWED_CLUSTER_ROLES)}")
        for s in d.get("subjects") or []:
            key = (s.get("namespace"), s["name"])
            if s["kind"] != "ServiceAccount" or key not in accounts:
                fail(name_of(d), f"subject {s['kind']} {key} is not a ServiceAccount of this kustomization")
            bound.add((ref["name"], key))

    pods = []
    index = 0
    for kind, path in POD_TEMPLATES.items():
        for d in by_kind.get(kind, []):
            pod = Pod(d, dig(d, *path))
            pods.append(pod)
            check_security(pod)
            sa = pod.spec.get("serviceAccountName", "default")
            if (pod.namespace, sa) not in accounts:
                fail(pod.where, f"serviceAccountName {sa} must be a ServiceAccount of this kustomization")
            index = check_oidc_edge(pod, configmaps, out_dir, index)
            needs_discovery = any(
                s.get("kind") == "in-cluster"
                for _, config in pod.configs
                for issuer in config.get("issuers", [])
                for s in issuer.get("sources", [])
            )
            if needs_discovery and ("system:service-account-issuer-discovery", (pod.namespace, sa)) not in bound:
                fail(pod.where, f"its in-cluster source needs {sa} bound to system:service-account-issuer-discovery")

    # Services: select a pod of this kustomization and reach its public port, never admin.
    services = {}
    for svc in by_kind.get("Service", []):
        selector = dig(svc, "spec", "selector") or {}
        selected = [
            p for p in pods
            if p.namespace == svc["metadata"].get("namespace")
            and selector
            and selector.items() <= p.labels.items()
        ]
        if not selected:
            fail(name_of(svc), "selects no pod of this kustomization")
        for p in selected:
            if p.agent:
                serves = {"publish": "the bucket", "push": "the edge it pushes to"}[p.agent]
                fail(name_of(svc), f"selects {p.where}, which runs {p.agent}: it has no public listener, {serves} serves")
        selected = [p for p in selected if not p.agent]
        for sp in svc["spec"]["ports"]:
            for p in selected:
                for c, config in p.configs:
                    target = port_number(c, sp.get("targetPort", sp["port"]))
                    admin_port = listen_port(config.get("admin", {}).get("listen", DEFAULT_ADMIN_LISTEN))[1]
                    http = config.get("http", {}).get("listen")
                    if target == admin_port:
                        fail(name_of(svc), f"port {sp.get('name', sp['port'])} exposes the admin listener")
                    elif http is None or target != listen_port(http)[1]:
                        fail(name_of(svc), f"port {sp.get('name', sp['port'])} does not reach [http] listen of {p.where}")
        services[(svc["metadata"].get("namespace"), svc["metadata"]["name"])] = (svc, selected)

    # Ingresses: Traefik's (k3s), HTTPS only, every host with TLS, and every host and path an
    # issuer that the pods behind the Service serve (and every issuer of those pods routed).
    for ing in by_kind.get("Ingress", []):
        where = name_of(ing)
        ns = ing["metadata"].get("namespace")
        if dig(ing, "spec", "ingressClassName") != "traefik":
            fail(where, "ingressClassName must be traefik (k3s's)")
        if dig(ing, "metadata", "annotations", "traefik.ingress.kubernetes.io/router.entrypoints") != "websecure":
            fail(where, "must be on Traefik's websecure entry point only")
        tls_hosts = {h for t in dig(ing, "spec", "tls") or [] if t.get("secretName") for h in t.get("hosts") or []}
        routed = {}
        for rule in ing["spec"].get("rules") or []:
            host = rule.get("host")
            if host not in tls_hosts:
                fail(where, f"host {host} has no TLS secret")
            for path in dig(rule, "http", "paths") or []:
                backend = dig(path, "backend", "service") or {}
                svc, selected = services.get((ns, backend.get("name")), (None, []))
                port = backend.get("port", {})
                if svc is None or not any(
                    port.get("name", object()) == sp.get("name") or port.get("number") == sp["port"]
                    for sp in svc["spec"]["ports"]
                ):
                    fail(where, f"backend {backend} is not a Service port of this kustomization")
                    continue
                for p in selected:
                    routed.setdefault(p.where, []).append((host, path.get("path", "/")))
        for p in pods:
            if p.where not in routed:
                continue
            for _, config in p.configs:
                for issuer in config.get("issuers", []):
                    url = issuer["issuer"]
                    issuer_host = url.split("://", 1)[1].split("/", 1)[0]
                    issuer_path = "/" + url.split("://", 1)[1].partition("/")[2]
                    if not any(
                        h == issuer_host and (prefix == "/" or under(issuer_path, prefix))
                        for h, prefix in routed[p.where]
                    ):
                        fail(where, f"does not route issuer {url} to {p.where}")
            for host, _ in routed[p.where]:
                hosts = {i["issuer"].split("://", 1)[1].split("/", 1)[0] for _, c in p.configs for i in c.get("issuers", [])}
                if host not in hosts:
                    fail(where, f"host {host} is no issuer host of {p.where} ({sorted(hosts)})")

    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print(f"{rendered}: {len(docs)} objects, {index} oidc-edge container(s) checked")


def break_copy(what, rendered, out):
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    # The first workload (serve's or publish's Deployment, publish's CronJob) and its pod.
    workload = next(d for d in docs if d["kind"] in POD_TEMPLATES)
    pod = dig(workload, *POD_TEMPLATES[workload["kind"]])
    container = pod["spec"]["containers"][0]
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    namespace = workload["metadata"]["namespace"]

    def config_edit(edit):
        for cm in (d for d in docs if d["kind"] == "ConfigMap"):
            if "config.toml" in (cm.get("data") or {}):
                cm["data"]["config.toml"] = edit(cm["data"]["config.toml"])

    # The projected token with an audience of its own: STS's for a publisher, the push URL's
    # for a push agent.
    def web_identity_token():
        return next(
            src["serviceAccountToken"]
            for v in volumes.values()
            for src in dig(v, "projected", "sources") or []
            if "audience" in src.get("serviceAccountToken", {})
        )

    if what == "unknown-field":
        container["imagePullPolicyy"] = "Always"
    elif what == "writable-root":
        container["securityContext"]["readOnlyRootFilesystem"] = False
    elif what == "admin-exposed":
        service = next(d for d in docs if d["kind"] == "Service")
        service["spec"]["ports"][0]["targetPort"] = "admin"
    elif what == "probe-on-http":
        container["livenessProbe"]["httpGet"]["port"] = "http"
    elif what == "host-mismatch":
        ingress = next(d for d in docs if d["kind"] == "Ingress")
        ingress["spec"]["rules"][0]["host"] = "other.example.com"
        ingress["spec"]["tls"][0]["hosts"] = ["other.example.com"]
    elif what == "automount":
        pod["spec"]["automountServiceAccountToken"] = True
    elif what == "extra-role":
        binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
        binding["roleRef"]["name"] = "cluster-admin"
    elif what == "unknown-kind":
        # A kind with no schema: the validator only warns about it.
        docs.append({
            "apiVersion": "traefik.io/v1alpha1",
            "kind": "Middleware",
            "metadata": {"name": "headers", "namespace": namespace},
            "spec": {"headers": {"customResponseHeaders": {"X-Test": "1"}}},
        })
    # Publisher faults (from publish's Deployment, or its CronJob where named so).
    elif what == "token-audience":
        del web_identity_token()["audience"]
    elif what == "unread-token":
        config_edit(lambda t: "\n".join(
            line for line in t.splitlines()
            if not line.lstrip().startswith(("role_arn", "web_identity_token_file"))
        ) + "\n")
    elif what == "literal-secret":
        container["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI"}]
    elif what in ("publisher-service", "pusher-service"):
        docs.append({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": workload["metadata"]["name"], "namespace": namespace},
            "spec": {"selector": dict(pod["metadata"]["labels"]),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        })
    elif what in ("publisher-replicas", "pusher-replicas"):
        workload["spec"]["replicas"] = 2
    elif what == "publisher-rolling":
        workload["spec"]["strategy"] = {"type": "RollingUpdate"}
    elif what == "once-in-deployment":
        container["args"].insert(1, "--once")
    # Push agent faults (from push's Deployment).
    elif what == "pusher-port":
        container["ports"].append({"name": "http", "containerPort": 8080, "protocol": "TCP"})
    elif what == "push-token-audience":
        # The apiserver's own audience, as a token copied from the in-cluster volume would have.
        del web_identity_token()["audience"]
    elif what == "push-token-lifetime":
        # A day: the edge refuses tokens that live over an hour.
        web_identity_token()["expirationSeconds"] = 86400
    elif what == "push-token-unread":
        config_edit(lambda t: t.replace("/var/run/secrets/oidc-edge/push/token", "/etc/oidc-edge/push-token"))
    elif what == "cronjob-emptydir":
        volumes["state"].pop("persistentVolumeClaim")
        volumes["state"]["emptyDir"] = {}
    elif what == "cronjob-concurrency":
        workload["spec"]["concurrencyPolicy"] = "Allow"
    # Not faults: the edits the README gives for R2 (keys from a Secret in place of the web
    # identity token) and for an Azure static website (a SAS from a Secret), which must pass
    # every check.
    elif what in ("r2-keys", "azure-sas"):
        if what == "r2-keys":
            name, mount = "r2-keys", "/var/run/secrets/oidc-edge/r2"
            lines = {
                "region": ['endpoint = "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com"',
                           'region = "auto"'],
                "role_arn": [f'access_key_id_file = "{mount}/access_key_id"'],
                "web_identity_token_file": [f'secret_access_key_file = "{mount}/secret_access_key"'],
            }
        else:
            name, mount = "azure-sas", "/var/run/secrets/oidc-edge/azure"
            lines = {
                "to": ['to = "az://$web"'],
                "region": ['account = "oidcexample"'],
                "role_arn": [f'sas_token_file = "{mount}/sas_token"'],
                "web_identity_token_file": [],
            }

        def edit(text):
            out = []
            for line in text.splitlines():
                indent = line[: len(line) - len(line.lstrip())]
                key = line.lstrip().split(" ", 1)[0]
                if key in lines:
                    out.extend(indent + new for new in lines[key])
                else:
                    out.append(line)
            return "\n".join(out) + "\n"

        config_edit(edit)
        aws = next(n for n, v in volumes.items() if any(
            "audience" in src.get("serviceAccountToken", {}) for src in dig(v, "projected", "sources") or []))
        pod["spec"]["volumes"] = [v for v in pod["spec"]["volumes"] if v["name"] != aws] + [
            {"name": name, "secret": {"secretName": f"oidc-edge-{name}", "defaultMode": 0o440}}
        ]
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != aws] + [
            {"name": name, "mountPath": mount, "readOnly": True}
        ]
    else:
        sys.exit(f"unknown fault {what}")
    with open(out, "w") as f:
        yaml.safe_dump_all(docs, f)


def enable_component(kustomization, relpath):
    with open(kustomization) as f:
        k = yaml.safe_load(f)
    k["components"] = (k.get("components") or []) + [relpath]
    with open(kustomization, "w") as f:
        yaml.safe_dump(k, f)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"check": check, "break": break_copy, "enable-component": enable_component}[command](*rest)
