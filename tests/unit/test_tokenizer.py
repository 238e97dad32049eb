import pytest

from fm.tokenizer import Tokenizer


def test_special_ids(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 8000


@pytest.mark.parametrize("text", ["中国的首都是北京。", "Hello, world!\n\tdef f(x): return x", "😀 emoji ü", ""])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_eos_and_batch(tokenizer):
    ids = tokenizer.encode("abc", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.encode_batch(["abc", "中文"]) == [tokenizer.encode("abc"), tokenizer.encode("中文")]


def test_extra_special_tokens(tokenizer_path):
    tok = Tokenizer(tokenizer_path, extra_special_tokens=["<用户>", "<AI>"])
    ids = tok.encode("<用户>你好<AI>")
    assert ids[0] == tok.special_tokens["<用户>"]
    assert tok.special_tokens["<AI>"] in ids
    assert tok.encode_batch(["<AI>x"]) == [tok.encode("<AI>x")]
    with pytest.raises(ValueError, match="not in the tokenizer"):
        Tokenizer(tokenizer_path, extra_special_tokens=["<definitely-missing>"])


@pytest.mark.parametrize("specials", [(), ("<用户>", "<AI>")])
def test_encode_batch_arrays_equals_encode(tokenizer_path, specials):
    tok = Tokenizer(tokenizer_path, extra_special_tokens=specials)
    texts = ["<用户>你好<AI>hello", "", "plain text 中文", "x" * 300]
    arrays = tok.encode_batch_arrays(texts)
    assert [a.dtype.name for a in arrays] == ["int32"] * len(texts)
    assert [a.tolist() for a in arrays] == [tok.sp.encode(t) if not specials else tok.encode(t) for t in texts]
    assert [a.tolist() for a in tok.encode_batch_arrays(texts, threads=2)] == [a.tolist() for a in arrays]
