"""`kata-py spec` writes a starting config.json, as `runc spec` does."""

import json

from kata_py.cli.main import main
from kata_py.oci.spec import validate_config


def test_spec_writes_a_valid_config_once(tmp_path, capsys):
    assert main(["spec", "--bundle", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    validate_config(config)
    assert config["root"]["path"] == "rootfs" and config["process"]["args"]
    assert main(["spec", "--bundle", str(tmp_path)]) == 1
    assert "exists" in capsys.readouterr().err


def test_spec_refuses_rootless(tmp_path, capsys):
    assert main(["spec", "--rootless", "--bundle", str(tmp_path)]) == 1
    assert "rootless" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()
