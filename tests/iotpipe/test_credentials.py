"""iotpipe.credentials: fresh passwords and the amqtt / Mosquitto password files (pure file work;
the logins themselves are tried on real brokers in test_device_cli.py and tests/edge/test_flash.py)."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from iotpipe.credentials import (
    PasswordFormat,
    list_users,
    mosquitto_hash,
    new_password,
    remove_user,
    set_password,
)
from iotpipe.errors import ConfigError


def test_fresh_passwords_are_long_random_and_url_safe() -> None:
    """Each password is 32 URL-safe characters (192 bits), and no two are alike."""
    made = {new_password() for _ in range(200)}
    assert len(made) == 200
    for password in made:
        assert len(password) == 32
        assert len(base64.urlsafe_b64decode(password)) == 24


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_mosquitto_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    """With mosquitto_passwd's salt and iterations, our $7$ hash is byte-identical to its own."""
    path = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(path), "home/pi-1", "s3cret:pw"],
        check=True,
        capture_output=True,
    )
    user, _, theirs = path.read_text().strip().partition(":")
    _, seven, iterations, salt, _digest = theirs.split("$")
    assert (user, seven) == ("home/pi-1", "7")
    ours = mosquitto_hash("s3cret:pw", salt=base64.b64decode(salt), iterations=int(iterations))
    assert ours == theirs
    assert mosquitto_hash("s3cret:pw") != theirs  # a fresh salt each time


@pytest.mark.parametrize("kind", list(PasswordFormat))
def test_set_replace_remove_and_list_keep_other_lines(tmp_path: Path, kind: PasswordFormat) -> None:
    """Lines are added, replaced in place and removed; comments and other users stay; mode 0600."""
    path = tmp_path / "passwd"
    path.write_text("# site passwords\nbridge:$7$101$x$y\n")
    assert set_password(path, "home/pi-1", "one", kind)
    assert set_password(path, "home/pi-2", "two", kind)
    first = path.read_text().splitlines()[2]
    assert not set_password(path, "home/pi-1", "three", kind)
    lines = path.read_text().splitlines()
    assert lines[0] == "# site passwords"
    assert lines[2].startswith("home/pi-1:")
    assert lines[2] != first
    prefix = "$7$101$" if kind is PasswordFormat.MOSQUITTO else "$argon2id$"
    assert lines[2].partition(":")[2].startswith(prefix)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert list_users(path) == ["bridge", "home/pi-1", "home/pi-2"]

    assert remove_user(path, "home/pi-1")
    assert list_users(path) == ["bridge", "home/pi-2"]
    before = path.read_bytes()
    assert not remove_user(path, "home/pi-1")
    assert path.read_bytes() == before
    assert path.read_text().startswith("# site passwords\n")


def test_unusable_names_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    """A name with ':' or spaces, an empty password, a missing file: one ConfigError each."""
    with pytest.raises(ConfigError, match="username"):
        set_password(tmp_path / "p", "home/pi 1", "pw")
    with pytest.raises(ConfigError, match="must not be empty"):
        set_password(tmp_path / "p", "home/pi", "")
    with pytest.raises(ConfigError, match=r"--mosquitto-password-file=.*no such file"):
        list_users(tmp_path / "nope", field="--mosquitto-password-file")
    assert not (tmp_path / "p").exists()
