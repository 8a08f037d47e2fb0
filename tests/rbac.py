"""Azure RBAC, read without Azure: the roles infra/ grants (from the Bicep text) and Microsoft's
built-in role definitions (tests/data/rbac/builtin-roles.json, copied from Microsoft's docs).

`grants()` follows main.bicep into its modules, so each role assignment comes out as
(principal, role, scope) in words the permissions matrix uses:

- principal: who holds it ("app" is the Function App's user-assigned identity);
- scope: a path, parent first ("rg/data", "rg/data/finetune-data", "ws/workspace"); a grant on a
  path covers the paths below it, as Azure RBAC scopes inherit downward.

Only what the templates actually say counts: a role assignment whose principal or scope the tables
below cannot name fails the test that reads it, so a new one must be placed here first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
ROLES_FILE = ROOT / "tests" / "data" / "rbac" / "builtin-roles.json"

#: Principal expressions (as main.bicep or a module writes them) -> who that is.
PRINCIPALS = {
    "identity.properties.principalId": "app",
    "userPrincipalId": "user",
    "workspace.outputs.gpuClusterPrincipalId": "gpu-cluster",
    "gpuCluster.identity.principalId": "gpu-cluster",
    "computePrincipalId": "gpu-cluster",  # an existing workspace's cluster, given as a parameter
    "newWorkspace.identity.principalId": "workspace",
    "storageTopic.identity.principalId": "storage-topic",
    "workspace.outputs.systemTopicPrincipalId": "workspace-topic",
}

#: (module file, resource symbol a role assignment is scoped to) -> scope path.
SCOPES = {
    ("storage.bicep", "data"): "rg/data",
    ("storage.bicep", "host"): "rg/host",
    ("data-reader.bicep", "data::blobs::target"): "rg/data/{container}",
    ("deadletter-roles.bicep", "data::blobs::container"): "rg/data/{deadLetterContainer}",
    ("keyvault.bicep", "vault"): "rg/keyvault",
    ("monitoring.bicep", "appInsights"): "rg/appinsights",
    ("workspace.bicep", "existingWorkspace"): "ws/workspace",
    ("workspace-new.bicep", "newWorkspace"): "ws/workspace",
    ("workspace-new.bicep", "wsStorage"): "ws/workspace-storage",
}


@dataclass(frozen=True)
class Grant:
    principal: str
    role: str  # role definition id (GUID)
    scope: str
    where: str  # file and resource symbol, for messages


def _blocks(text: str, header: str):
    """(match, body) of every top-level declaration whose first line matches ``header``."""
    for match in re.finditer(header, text, re.M):
        start = match.end()
        end = re.search(r"^\}\]?\s*$", text[start:], re.M)
        yield match, text[start:start + (end.start() if end else len(text))]


def _guids(text: str) -> dict[str, object]:
    """Role variables: `var x = 'guid'`, `var roles = { key: 'guid' }`, `var xs = [roles.a, b]`."""
    found: dict[str, object] = {}
    for name, guid in re.findall(r"^var (\w+) = '([0-9a-f-]{36})'", text, re.M):
        found[name] = guid
    for name, body in re.findall(r"^var (\w+) = \{\n(.*?)^\}", text, re.S | re.M):
        for key, guid in re.findall(r"^\s*(\w+): '([0-9a-f-]{36})'", body, re.M):
            found[f"{name}.{key}"] = guid
    for name, items in re.findall(r"^var (\w+) = \[([^\]]*)\]", text, re.M):
        found[name] = [found[item.strip()] for item in items.split(",") if item.strip()]
    return found


def _params(body: str) -> dict[str, str]:
    match = re.search(r"^  params: \{\n(.*?)^  \}", body, re.S | re.M)
    pairs = re.findall(r"^    (\w+): (.+)$", match.group(1), re.M) if match else []
    return {key: value.strip() for key, value in pairs}


def _resolve(expression: str, env: dict[str, str]) -> str:
    """A module parameter's expression as its caller wrote it (followed up the module chain)."""
    seen = set()
    while expression in env and expression not in seen:
        seen.add(expression)
        expression = env[expression]
    return expression


def _literal(expression: str, env: dict[str, str], text: str) -> str:
    """The string a scope placeholder (a container name parameter) stands for."""
    value = _resolve(expression, env)
    match = re.fullmatch(r"'([^']*)'", value) or re.search(rf"^var {re.escape(value)} = '([^']*)'", text, re.M)
    return match.group(1) if match else value


def grants(path: Path = INFRA / "main.bicep", env: dict[str, str] | None = None, main_text: str = "") -> list[Grant]:
    """Every role assignment reachable from ``path``, with principals and scopes named."""
    env = env or {}
    text = path.read_text()
    main_text = main_text or text
    roles = _guids(text)
    found: list[Grant] = []
    header = r"^resource (\w+) 'Microsoft\.Authorization/roleAssignments@[^']+' = (?:\[for (\w+) in (\w+): )?(?:if \(.*\) )?\{\n"
    for match, body in _blocks(text, header):
        symbol, loop_var, loop_list = match.groups()
        scope_symbol = re.search(r"^  scope: (\S+)$", body, re.M).group(1)
        role_expr = re.search(r"roleDefinitions', (\S+?)\)", body).group(1)
        principal_expr = re.search(r"^    principalId: (\S+)$", body, re.M).group(1)
        role_ids = roles[loop_list] if loop_var == role_expr else [roles[role_expr]]
        if loop_var == principal_expr:  # one assignment per principal of a list parameter
            listed = _resolve(loop_list, env).strip("[]")
            principal_exprs = [item.strip() for item in listed.split(",") if item.strip()]
        else:
            principal_exprs = [principal_expr]
        where = f"{path.name}:{symbol}"
        template = SCOPES.get((path.name, scope_symbol))
        if template is None:
            raise KeyError(f"{where}: scope {scope_symbol!r} is not in tests/rbac.py SCOPES")
        scope = re.sub(r"\{(\w+)\}", lambda m: _literal(m.group(1), env, main_text), template)
        for expr in principal_exprs:
            resolved = _resolve(expr, env)
            if resolved not in PRINCIPALS:
                raise KeyError(f"{where}: principal {resolved!r} is not in tests/rbac.py PRINCIPALS")
            found += [Grant(PRINCIPALS[resolved], role, scope, where) for role in role_ids]
    for match, body in _blocks(text, r"^module (\w+) '([^']+)' = (?:if \(.*\) )?\{\n"):
        child = {key: _resolve(value, env) for key, value in _params(body).items()}
        found += grants(path.parent / match.group(2), child, main_text)
    return found


def covers(scope: str, target: str) -> bool:
    """A grant at ``scope`` applies to ``target`` (RBAC scopes inherit downward)."""
    return target == scope or target.startswith(scope + "/")


def _pattern(permission: str) -> re.Pattern:
    """A role's permission string as a regex. Case-insensitive ("Permission strings are
    case-insensitive": Microsoft's custom-roles page). `*` matches anything; a `/*/` in the middle may
    also match nothing, as AzureML Data Scientist's NotActions (workspaces/write, workspaces/delete
    beside its Actions workspaces/*/write, workspaces/*/delete) show Microsoft reads it."""
    parts = [re.escape(part) for part in permission.split("/*/")]
    body = "/(?:.*/)?".join(part.replace(r"\*", ".*") for part in parts)
    return re.compile(f"^{body}$", re.I)


@dataclass(frozen=True)
class Role:
    name: str
    actions: tuple[str, ...]
    not_actions: tuple[str, ...]
    data_actions: tuple[str, ...]
    not_data_actions: tuple[str, ...]

    def allows(self, action: str, data: bool) -> bool:
        allowed, denied = (self.data_actions, self.not_data_actions) if data else (self.actions, self.not_actions)
        return any(_pattern(p).match(action) for p in allowed) and not any(_pattern(p).match(action) for p in denied)


def builtin_roles() -> dict[str, Role]:
    """Role definition id -> Role, from Microsoft's published definitions."""
    data = json.loads(ROLES_FILE.read_text())["roles"]
    return {r["id"]: Role(name, tuple(r["actions"]), tuple(r["notActions"]), tuple(r["dataActions"]),
                          tuple(r["notDataActions"])) for name, r in data.items()}
