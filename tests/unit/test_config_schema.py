"""config.json's schema compiled once per schema version and kept in the state directory (no VM)."""

import json
import os
import shutil

import pytest

from kata_py.errors import ConfigError
from kata_py.oci import config_schema
from kata_py.oci.spec import SCHEMA_DIR, default_spec, validate_config

pytestmark = pytest.mark.skipif(not (SCHEMA_DIR / "config-schema.json").exists(),
                                reason="the OCI runtime-spec schemas are installed by ci/setup.sh")


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("KATA_PY_STATE_DIR", str(tmp_path / "state"))
    config_schema._validator.cache_clear()
    yield tmp_path / "state" / "oci-schema"
    config_schema._validator.cache_clear()


def error(config) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return str(info.value)


def bad_uid() -> dict:
    config = default_spec()
    config["process"]["user"]["uid"] = "zero"
    return config


def test_compiled_once_and_loaded_from_the_cache(state):
    validate_config(default_spec())
    sources, codes = list(state.glob("*.py")), list(state.glob("*.code"))
    assert len(sources) == 1 and len(codes) == 1
    assert "import fastjsonschema" not in sources[0].read_text()  # it runs without the package
    assert "from fastjsonschema" not in sources[0].read_text()
    stamp = codes[0].stat().st_mtime_ns
    config_schema._validator.cache_clear()
    assert error(bad_uid()) == "config.json /process/user/uid: 'zero' is not of type 'integer'"
    assert codes[0].stat().st_mtime_ns == stamp, "a second validation must not compile again"


def test_another_schema_version_gets_its_own_module(state, tmp_path, monkeypatch):
    validate_config(default_spec())
    changed = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, changed)
    defs = json.loads((changed / "defs.json").read_text())
    defs["definitions"]["uint32"]["maximum"] = 1000  # a schema version with a smaller uid range
    (changed / "defs.json").write_text(json.dumps(defs))
    config = default_spec()
    config["process"]["user"]["uid"] = 5000
    assert config_schema.first_fault(config, changed) == (["process", "user", "uid"],
                                                          "5000 is greater than the maximum of 1000")
    assert config_schema.first_fault(config, SCHEMA_DIR) is None
    assert len(list(state.glob("*.code"))) == 2


def test_a_damaged_or_foreign_cache_is_not_run(state):
    validate_config(default_spec())
    code = next(state.glob("*.code"))
    code.write_bytes(code.read_bytes()[:100])  # cut short
    config_schema._validator.cache_clear()
    assert error(bad_uid()).startswith("config.json /process/user/uid:")
    assert code.stat().st_size > 100, "made again"
    os.chmod(code, 0o666)  # writable by anyone: not trusted, compiled afresh
    code.write_bytes(b"garbage")
    config_schema._validator.cache_clear()
    assert error(bad_uid()).startswith("config.json /process/user/uid:")


def test_a_state_directory_that_takes_nothing_still_validates(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KATA_PY_STATE_DIR", str(tmp_path / "file"))  # cannot hold a directory
    config_schema._validator.cache_clear()
    try:
        validate_config(default_spec())
        assert error(bad_uid()).startswith("config.json /process/user/uid:")
    finally:
        config_schema._validator.cache_clear()


def test_missing_schemas_say_which_package(tmp_path):
    assert "golang-github-opencontainers-specs-dev" in pytest.raises(
        ConfigError, config_schema.first_fault, default_spec(), tmp_path).value.args[0]


@pytest.mark.parametrize("annotations,path", [
    ({"a.b": "c", "a": {"b": 1}}, ["annotations", "a"]),         # 'a.b' is also a key, but valid
    ({"a": "c", "a.b": 1}, ["annotations", "a.b"]),
    ({"io.k8s.x[0]": 1}, ["annotations", "io.k8s.x[0]"]),
])
def test_keys_holding_dots_and_brackets_are_placed_right(state, annotations, path):
    config = default_spec()
    config["annotations"] = annotations
    assert config_schema.first_fault(config, SCHEMA_DIR)[0] == path


def test_a_one_branch_any_of_reports_the_branch_fault(state):
    config = default_spec()
    config["linux"]["namespaces"] = [{"type": "pid"}, {"path": "/proc/1/ns/net"}]
    assert error(config) == "config.json /linux/namespaces/1/type: required, but missing"


def test_locate_walks_lists_and_dicts():
    document = {"a": [{"b.c": {"d": 5}}]}
    target = document["a"][0]["b.c"]["d"]
    assert config_schema.locate(document, "data.a[0].b.c.d", target) == ["a", 0, "b.c", "d"]
    assert config_schema.locate(document, "data", document) == []
    assert config_schema.locate(document, "data.a[7]", None) == []
