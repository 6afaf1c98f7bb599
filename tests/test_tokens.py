import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.tokens import encode_example, pack


@given(n=st.integers(2, 400), block=st.integers(1, 64))
@settings(max_examples=60, deadline=None)
def test_pack_predicts_every_token_once(n, block):
    ids = np.arange(n, dtype=np.int64) + 10
    blocks = pack(ids, np.ones(n, dtype=bool), block, pad_id=0)
    assert blocks.ids.shape[1] == block + 1
    targets = blocks.ids[:, 1:][blocks.mask[:, 1:]]
    assert sorted(targets.tolist()) == ids[1:].tolist()  # each token after the first, exactly once
    # inputs line up with targets: the token before each target is its predecessor
    inputs = blocks.ids[:, :-1][blocks.mask[:, 1:]]
    assert (targets - inputs == 1).all()


class _Tok:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_prompt_tokens_are_not_targets():
    ids, mask = encode_example({"prompt": "ab", "completion": "cd"}, _Tok())
    assert ids == [97, 98, 99, 100, 0]
    assert mask == [False, False, True, True, True]


def test_text_gets_eos_once():
    ids, mask = encode_example({"text": "hi"}, _Tok())
    assert ids == [104, 105, 0] and all(mask)


def test_pack_rejects_empty():
    with pytest.raises(ValueError):
        pack(np.array([1]), np.array([True]), 4, 0)


def test_book_pieces_join_with_a_paragraph_break_not_eos():
    ids, mask = encode_example({"text": "hi"}, _Tok(), joiner=[10, 10])
    assert ids == [104, 105, 10, 10] and all(mask)
    # records (prompt/completion) still end in EOS
    ids, _ = encode_example({"prompt": "a", "completion": "b"}, _Tok(), joiner=[10, 10])
    assert ids[-1] == 0


def test_read_text_file_decodes_utf16_and_names_what_it_cannot_read(tmp_path):
    from tunesmith.errors import TunesmithError
    from tunesmith.tokens import read_text_file

    (tmp_path / "u.txt").write_bytes("\ufeffCaf\u00e9 au lait".encode("utf-16-le"))
    assert read_text_file(tmp_path / "u.txt") == "Caf\u00e9 au lait"
    (tmp_path / "b.bin").write_bytes(b"ab\x00\x01\x02\x03\xff\xfe\x00")
    with pytest.raises(TunesmithError, match="binary"):
        read_text_file(tmp_path / "b.bin")
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    with pytest.raises(TunesmithError, match="symlink loop"):
        read_text_file(tmp_path / "loop.txt")
