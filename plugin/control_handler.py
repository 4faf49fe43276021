"""Control-socket requests for a running server (placeholder until the namespace model
lands): `list` describes what is exported."""
import errno

from plugin.control import ControlError


def handler_for(registry, settings):
    def handle(req):
        op = req.get("op")
        if op == "list":
            return [{"dev": ns.name, "mode": ns.backend.mode if ns.backend else "raw",
                     "size": ns.backend.size if ns.backend else ns.size,
                     "state": "enabled" if ns.backend else "disabled"}
                    for ns in registry.namespaces.values()]
        raise ControlError(errno.EINVAL, f"unknown op {op!r}; valid: list")
    return handle
