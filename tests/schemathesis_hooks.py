"""schemathesis hooks for tests/schemathesis.sh: rules of the broker that JSON Schema cannot say."""

import schemathesis


def _host_ports_unique(body):
    ports = body.get("ports") if isinstance(body, dict) else None
    if not isinstance(ports, list):
        return True
    hosts = []
    for port in ports:
        if not isinstance(port, dict):
            return True
        host = port.get("host")
        hosts.append(port.get("container") if host is None else host)
    try:
        return len(set(hosts)) == len(hosts)
    except TypeError:  # unhashable values: a negative case, the server refuses it anyway
        return True


def _volumes_unique(body):
    volumes = body.get("volumes") if isinstance(body, dict) else None
    if not isinstance(volumes, list):
        return True
    for key in ("name", "path"):
        seen = [v.get(key) for v in volumes if isinstance(v, dict)]
        try:
            if len(set(seen)) != len(seen):
                return False
        except TypeError:  # unhashable values: a negative case, the server refuses it anyway
            return True
    return True


@schemathesis.hook
def filter_body(ctx, body):
    # POST /v1/workloads publishes each host port once (`host`, or `container` when `host` is
    # absent); the schema's uniqueItems only compares whole mappings
    op = ctx.operation
    if op is None or op.method.upper() != "POST" or op.path != "/v1/workloads":
        return True
    # and lists each volume's name and path once (uniqueItems compares whole volumes too)
    return _host_ports_unique(body) and _volumes_unique(body)
