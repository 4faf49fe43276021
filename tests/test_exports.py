"""plugin/exports.py: the registry that keeps the served exports in step with the model."""
import errno

import pytest

from bttctl.namespace import call_offline
from control.verbs import handle
from nvdimm.errors import NdError
from nvdimm.labels import LabelArea
from plugin.exports import Registry

from conftest import MiB, pattern


def create(path, **req):
    reply = call_offline([path], {"op": "create-namespace", **req})
    assert reply["ok"], reply
    return reply["result"]


@pytest.fixture
def region_file(tmp_path):
    path = str(tmp_path / "region.img")
    LabelArea.create(path, 256 * MiB).close()
    create(path, size="64M", name="db")  # namespace0.0, sector mode
    create(path, size="32M", name="scratch", mode="raw", sector_size=512)  # namespace0.1
    return path


@pytest.fixture
def registry(region_file):
    reg = Registry({"durability": "strict"})
    with reg.lock:
        reg.add_region(region_file)
        assert reg.sync() == []
    yield reg
    reg.close_all()


def test_each_enabled_namespace_is_exported_under_its_name_and_alt_name(registry):
    assert sorted(registry.names) == ["db", "namespace0.0", "namespace0.1", "scratch"]
    db, scratch = registry.lookup("db"), registry.lookup("scratch")
    assert db is registry.lookup("namespace0.0") and db.backend.mode == "sector"
    assert scratch.backend.mode == "raw" and scratch.backend.sector_size == 512
    assert registry.default() == "namespace0.0"
    listed = dict(registry.list_exports())
    assert listed["db"].startswith("alias of namespace0.0: sector mode, 4096-byte sectors")
    assert listed["namespace0.1"] == f"raw mode, 512-byte sectors, {32 * MiB} bytes"


def test_disable_closes_the_backend_and_a_held_backend_fails(registry):
    exp = registry.lookup("db")
    held = exp.backend  # what an open connection keeps using
    buf = bytearray(4096)
    held.pwrite(pattern(1, 0, 4096), 0)
    with registry.lock:
        handle(registry, {"op": "disable-namespace", "namespace": "db"})
    assert exp.backend is None and "db" not in registry.names
    assert registry.lookup("namespace0.0") is None
    with pytest.raises(OSError) as e:
        held.pread(buf, 0)
    assert e.value.errno == errno.ESHUTDOWN
    with registry.lock:
        handle(registry, {"op": "enable-namespace", "namespace": "db"})
    registry.lookup("db").backend.pread(buf, 0)
    assert bytes(buf) == pattern(1, 0, 4096)


def test_a_shared_alt_name_is_exported_by_nobody(registry, region_file):
    with registry.lock:
        handle(registry, {"op": "disable-namespace", "namespace": "scratch"})
        registry.regions[0].set("namespace0.1/alt_name", "db")
        registry.sync()
    assert "db" not in registry.names and "namespace0.0" in registry.names
    with pytest.raises(NdError) as e:
        registry.namespace("db")
    assert e.value.errno == errno.EINVAL and "shared" in str(e.value)


def test_an_alt_name_that_looks_like_a_device_is_not_exported(registry):
    with registry.lock:
        handle(registry, {"op": "disable-namespace", "namespace": "scratch"})
        registry.regions[0].set("namespace0.1/alt_name", "namespace0.5")
        handle(registry, {"op": "enable-namespace", "namespace": "namespace0.1"})
    assert "namespace0.5" not in registry.names and "namespace0.1" in registry.names


def test_unknown_names(registry):
    assert registry.lookup("nope") is None
    with pytest.raises(NdError) as e:
        registry.namespace("nope")
    assert e.value.errno == errno.ENODEV and "namespace0.0" in str(e.value)
    with pytest.raises(NdError) as e:
        registry.region_of("namespace7.0")
    assert e.value.errno == errno.ENODEV and "region0" in str(e.value)


def test_forget_drops_the_export_and_its_names(registry):
    exp = registry.lookup("scratch")
    with registry.lock:
        registry.forget("namespace0.1")
    assert exp.backend is None
    assert "scratch" not in registry.names and "namespace0.1" not in registry.names


def test_offline_registry_opens_nothing(region_file):
    reg = Registry(serving=False)
    reg.add_region(region_file)
    assert reg.sync() == [] and reg.names == {}
    assert all(exp.backend is None for exp in reg.exports.values())
