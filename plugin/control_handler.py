"""What the control socket can ask a running server, over the label-less namespaces it
serves today. Field names follow `ndctl list`; refusals carry the kernel's errno.

  {"op": "list"}
  {"op": "disable-namespace", "namespace": "namespace0.0", "force": false}
  {"op": "enable-namespace",  "namespace": "namespace0.0"}
"""
import errno

from plugin.control import ControlError


def describe(ns) -> dict:
    b = ns.backend
    out = {"dev": ns.name, "mode": b.mode if b else "raw", "state": "enabled" if b else "disabled",
           "path": ns.path, "offset": ns.offset, "raw_size": ns.size, "clients": ns.clients}
    if b:
        out.update(size=b.size, sector_size=b.sector_size)
        if b.mode == "sector":
            out.update(uuid=b.uuid, holder=f"btt{ns.name[len('namespace'):]}")
    if ns.alt_name:
        out["name"] = ns.alt_name
    return out


def handler_for(registry, settings):
    def namespace(req):
        name = req.get("namespace")
        ns = registry.get(name) if isinstance(name, str) else None
        if ns is None:
            raise ControlError(errno.ENODEV, f"no namespace {name!r}; namespaces: "
                               f"{', '.join(registry.namespaces) or 'none'}")
        return ns

    def op_list(req):
        return [describe(ns) for ns in registry.namespaces.values()]

    def op_disable(req):
        ns = namespace(req)
        with registry.lock:  # no connection may open while we decide
            if ns.clients and not req.get("force"):
                raise ControlError(errno.EBUSY, f"{ns.name} has {ns.clients} connected "
                                   "client(s); disconnect them or force")
            ns.disable()
        return describe(ns)

    def op_enable(req):
        ns = namespace(req)
        with registry.lock:
            ns.enable(readonly=False, durability=settings["durability"],
                      zero_flag=settings["zero-flag"] == "on",
                      commit_ms=int(settings["commit-ms"]))
        return describe(ns)

    ops = {"list": op_list, "disable-namespace": op_disable, "enable-namespace": op_enable}

    def handle(req):
        op = req.get("op")
        if op not in ops:
            raise ControlError(errno.EINVAL, f"unknown op {op!r}; valid: {', '.join(ops)}")
        return ops[op](req)

    return handle
