import os
import stat

import pytest

from shoal.errors import ConfigError
from shoal.net.identity import Identity, PeerID


def test_peer_id_text_round_trip():
    ident = Identity.from_seed(b"a" * 32)
    text = ident.peer_id.to_string()
    assert text.startswith("sh")
    assert PeerID.from_string(text) == ident.peer_id


@pytest.mark.parametrize("text", ["", "sh", "xx" + "a" * 52, "sh!!!!", "sh" + "a" * 10])
def test_peer_id_parse_rejects_garbage(text):
    with pytest.raises(ValueError):
        PeerID.from_string(text)


def test_sign_verify_and_forgery():
    alice, mallory = Identity.from_seed(b"alice"), Identity.from_seed(b"mallory")
    sig = alice.sign(b"hello")
    assert alice.peer_id.verify(sig, b"hello")
    assert not alice.peer_id.verify(sig, b"hellO")
    assert not alice.peer_id.verify(mallory.sign(b"hello"), b"hello")
    assert not alice.peer_id.verify(sig[:-1], b"hello")


def test_key_persisted_with_mode_0600(tmp_path):
    path = tmp_path / "data" / "identity.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load_or_create(path).peer_id == first.peer_id


def test_key_file_errors(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="corrupt"):
        Identity.load_or_create(path)
    Identity.load_or_create(tmp_path / "k2")
    os.chmod(tmp_path / "k2", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load_or_create(tmp_path / "k2")
