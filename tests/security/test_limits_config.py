"""The connection and stream limits as options and TOML keys, and their derived defaults."""

from __future__ import annotations

import subprocess

import pytest

from kite.errors import ConfigError
from kite.net.limits import (
    DEFAULT_BUFFER_BUDGET,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_STREAMS,
    DEFAULT_SLOW_READER_TIMEOUT,
)
from kite.relay.accept import default_max_connections, default_max_pending
from kite.relay.config import build_relay_config
from support import KITE, SECRET

GRANT = f"*:*.test.kite:{SECRET}"


def test_defaults():
    cfg = build_relay_config(kites=[GRANT])
    assert (cfg.max_connections, cfg.max_pending) == (None, None)  # derived at start
    assert cfg.max_streams == DEFAULT_MAX_STREAMS == 16384
    assert cfg.idle_timeout == DEFAULT_IDLE_TIMEOUT == 600
    assert cfg.buffer_budget == DEFAULT_BUFFER_BUDGET == 256 << 20
    assert cfg.slow_reader_timeout == DEFAULT_SLOW_READER_TIMEOUT == 30


@pytest.mark.parametrize("nofile, connections, pending", [
    (64, 48, 12), (1024, 896, 224), (20000, 19744, 4096), (1 << 20, (1 << 20) - 256, 4096),
])
def test_derived_defaults(nofile, connections, pending):
    assert default_max_connections(nofile) == connections
    assert default_max_pending(connections) == pending


def test_toml_keys_and_options(tmp_path):
    toml = tmp_path / "relay.toml"
    toml.write_text("max_connections = 1000\nmax_pending = 100\nmax_streams = 64\n"
                    "idle_timeout = 0\nbuffer_budget = 32\nslow_reader_timeout = 5\n"
                    f'[[kite]]\ndomain = "*.test.kite"\nsecret = "{SECRET}"\n')
    cfg = build_relay_config(config_file=str(toml))
    assert (cfg.max_connections, cfg.max_pending, cfg.max_streams) == (1000, 100, 64)
    assert cfg.idle_timeout is None  # 0: never
    assert cfg.buffer_budget == 32 << 20
    assert cfg.slow_reader_timeout == 5
    cfg = build_relay_config(config_file=str(toml), limits={"max_streams": 8,
                                                             "buffer_budget": 0})
    assert cfg.max_streams == 8 and cfg.buffer_budget is None  # options win; 0: no limit


@pytest.mark.parametrize("key, value", [("max_streams", 0), ("max_connections", "many"),
                                        ("idle_timeout", -1), ("max_pending", 1.5),
                                        ("buffer_budget", True)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        build_relay_config(kites=[GRANT], limits={key: value})
    assert err.value.key == key


def test_cli_options():
    out = subprocess.run([*KITE, "relay", "--help"], capture_output=True, text=True)
    for opt in ("--max-connections", "--max-pending", "--max-streams", "--idle-timeout",
                "--buffer-budget", "--slow-reader-timeout"):
        assert opt in out.stdout
    bad = subprocess.run([*KITE, "relay", "--kite", GRANT, "--max-streams", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-streams" in bad.stderr
