"""SPIRE HCL configuration: parsing into plain data, and the documented keys."""

from __future__ import annotations

import hcl2


def _clean(value):
    """python-hcl2 keeps quotes and block markers; strip them to plain data."""
    if isinstance(value, str):
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items() if k not in ("__is_block__", "__comments__", "__inline_comments__")}
    return value


def parse(text: str) -> dict:
    """Parses SPIRE HCL; blocks become lists of dicts, as python-hcl2 shapes them."""
    return _clean(hcl2.loads(text))


def block(data: dict, name: str) -> dict:
    """The single block `name` of `data` (SPIRE allows one of each top-level block)."""
    blocks = data.get(name, [])
    if len(blocks) != 1:
        raise ValueError(f"expected exactly one {name} block, found {len(blocks)}")
    return blocks[0]


# Keys documented in SPIRE's server and agent configuration references that Trustweave uses or allows.
SERVER_KEYS = {
    "bind_address", "bind_port", "trust_domain", "data_dir", "log_level", "log_format",
    "ca_ttl", "default_x509_svid_ttl", "default_jwt_svid_ttl", "ca_key_type", "ca_subject",
    "jwt_issuer", "socket_path", "federation", "audit_log_enabled", "agent_ttl",
}
CA_SUBJECT_KEYS = {"country", "organization", "common_name"}
FEDERATION_KEYS = {"bundle_endpoint", "federates_with"}
BUNDLE_ENDPOINT_KEYS = {"address", "port", "refresh_hint", "acme", "profile"}
FEDERATES_WITH_KEYS = {"bundle_endpoint_url", "bundle_endpoint_profile"}
HTTPS_SPIFFE_KEYS = {"endpoint_spiffe_id"}
AGENT_KEYS = {
    "data_dir", "log_level", "log_format", "server_address", "server_port", "socket_path",
    "trust_bundle_path", "trust_bundle_url", "trust_bundle_format", "trust_domain",
    "insecure_bootstrap", "join_token", "admin_socket_path", "authorized_delegates", "sds",
    "retry_bootstrap",
}
HEALTH_KEYS = {"listener_enabled", "bind_address", "bind_port", "live_path", "ready_path"}
TOP_LEVEL_SERVER = {"server", "plugins", "health_checks", "telemetry"}
TOP_LEVEL_AGENT = {"agent", "plugins", "health_checks", "telemetry"}
SERVER_PLUGINS = {"DataStore", "NodeAttestor", "KeyManager", "Notifier", "UpstreamAuthority", "BundlePublisher"}
AGENT_PLUGINS = {"KeyManager", "NodeAttestor", "WorkloadAttestor", "SVIDStore"}


def unknown_keys(config: dict, kind: str) -> list[str]:
    """Keys not in the documented sets, as dotted paths."""
    errors = []

    def check(where: str, data: dict, allowed: set) -> None:
        for key in data:
            if key not in allowed:
                errors.append(f"{where}.{key}")

    if kind == "server":
        check("(top)", config, TOP_LEVEL_SERVER)
        server = block(config, "server")
        check("server", server, SERVER_KEYS)
        for subject in server.get("ca_subject", []):
            check("server.ca_subject", subject, CA_SUBJECT_KEYS)
        for federation in server.get("federation", []):
            check("server.federation", federation, FEDERATION_KEYS)
            for endpoint in federation.get("bundle_endpoint", []):
                check("server.federation.bundle_endpoint", endpoint, BUNDLE_ENDPOINT_KEYS)
            for peers in federation.get("federates_with", []):
                for td, peer in peers.items():
                    check(f"server.federation.federates_with.{td}", peer, FEDERATES_WITH_KEYS)
                    for profiles in peer.get("bundle_endpoint_profile", []):
                        for name, profile in profiles.items():
                            if name not in ("https_spiffe", "https_web"):
                                errors.append(f"server.federation.federates_with.{td}.bundle_endpoint_profile.{name}")
                            if name == "https_spiffe":
                                check(f"…{td}.https_spiffe", profile, HTTPS_SPIFFE_KEYS)
        plugins_allowed = SERVER_PLUGINS
    else:
        check("(top)", config, TOP_LEVEL_AGENT)
        check("agent", block(config, "agent"), AGENT_KEYS)
        plugins_allowed = AGENT_PLUGINS
    for health in config.get("health_checks", []):
        check("health_checks", health, HEALTH_KEYS)
    for plugins in config.get("plugins", []):
        for plugin_type in plugins:
            if plugin_type not in plugins_allowed:
                errors.append(f"plugins.{plugin_type}")
    return errors
